"""What one `single` weight step keeps alive for its backward pass, JAX host engine against the PyTorch baseline.

    python scripts/probe_residuals.py [--batch 128] [--precisions fp32,bf16]

The `original` network (C0=32, L=4, the comparison's network), synthetic batches, on whatever device is there
(the CPU is fine: what a step saves for backward does not depend on the backend). JAX: the residuals of the stem
and block programs of `asose_jax/single_path.py` (the leaves of the vjp closures they return, which stay alive
until the backward pass reaches them), unique buffers. PyTorch: the tensors autograd saves in the forward pass
(`torch.autograd.graph.saved_tensors_hooks`), unique storages. Each configuration fixes one op for every row
(the same architecture on both sides), one weight step per op. Prints one JSON line per framework and precision:
MiB saved per op, and their mean.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from compare_pytorch import N_BATCHES, batches_u8, jax_setup

MIB = 2 ** 20


def jax_residuals(batch: int, precision: str) -> dict[str, float]:
    """MiB of unique residual buffers of one weight step of the host-dispatched `single` engine, per op (every
    row choosing that op)."""
    import jax
    import numpy as np

    from asose_jax import single_path

    spec, x, y, perm, state, engine = jax_setup("single", precision, batch, dispatch="host")
    seen: dict[int, int] = {}
    originals = {name: getattr(single_path, name) for name in ("_stem_fwd", "_block_fwd")}

    def recording(fn, vjp_at):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            for leaf in jax.tree.leaves(out[vjp_at]):
                if isinstance(leaf, jax.Array):  # one device buffer may come back as several Array objects
                    seen[leaf.unsafe_buffer_pointer()] = leaf.nbytes
            return out
        return wrapped

    single_path._stem_fwd = recording(originals["_stem_fwd"], 2)  # (h, stats, vjp, y)
    single_path._block_fwd = recording(originals["_block_fwd"], 1)  # ((h, stats), vjp)
    try:
        per_op = {}
        for o, op in enumerate(spec.ops):
            choice = engine.sample(state)
            choice = {**choice, "idx": np.full_like(choice["idx"], o)}
            seen.clear()
            state = engine.weight_step(state, x, y, perm, o % N_BATCHES, choice)
            per_op[op] = sum(seen.values()) / MIB
    finally:
        for name, fn in originals.items():
            setattr(single_path, name, fn)
    return per_op


def torch_saved(batch: int) -> dict[str, float]:
    """MiB of unique tensor storages autograd saves in one `single` weight step of the PyTorch baseline (fp32),
    per op (every row choosing that op)."""
    import torch
    import torch.nn.functional as F

    from asose_jax.baseline import torch_asose as ta

    torch.manual_seed(0)
    net = ta.TorchASOSE(32, 4, mode="single")
    opt_w, _ = ta.make_optimizers(net)
    xs, ys = batches_u8(batch, None)
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    per_op = {}
    rows, n_ops = net.alpha.shape
    for o, op in enumerate(ta.PRIMITIVES):
        net.sample = lambda tau=None, o=o: F.one_hot(torch.full((rows,), o), n_ops).float()
        b = o % N_BATCHES
        xb = torch.from_numpy(xs[b * batch:(b + 1) * batch]).permute(0, 3, 1, 2).float() / 255
        yb = torch.from_numpy(ys[b * batch:(b + 1) * batch]).long()
        seen.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ta.weight_step(net, opt_w, xb, yb)
        per_op[op] = sum(seen.values()) / MIB
    return per_op


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--precisions", default="fp32,bf16", help="JAX precisions (the PyTorch baseline is fp32)")
    args = ap.parse_args()
    runs = [("torch", "fp32", torch_saved(args.batch))]
    runs += [("jax", p, jax_residuals(args.batch, p)) for p in args.precisions.split(",")]
    for framework, precision, per_op in runs:
        print(json.dumps({"framework": framework, "precision": precision, "batch": args.batch,
                          "saved_mib_mean": round(statistics.mean(per_op.values()), 1),
                          "saved_mib": {op: round(v, 1) for op, v in per_op.items()}}))


if __name__ == "__main__":
    main()
