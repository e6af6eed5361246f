"""``python -m asose_jax.train``: train the derived (discrete) network of a genotype on all 50k images.

The derived network holds exactly one op per path (the genotype's argmax op), with no switch and no
parameters for unused ops. Skeleton (``final.skeleton``):

* ``resnet``: stem 3x3 conv-BN-ReLU; every block ``y = h + sum_p path_scale[p] * op_p(h)``, where ``h`` is
  the block input, or a 3x3 conv-BN-ReLU of it (stride 2 at downsampling, or whenever the channels
  change); the ops run at stride 1. Global average pool, linear head.
* ``original``: the ASO-SE chain: a 1x1 conv-BN-ReLU where the shape changes, ops at the block stride,
  no residual (``path_scale`` only on blocks with several paths).

Widths come from the genotype's blocks, or with ``final.width > 0`` the stem gets ``width`` channels and
each stride-2 block doubles them (searched widths from widen growth are then not used).

Recipe: SGD (Nesterov) with L2 weight decay on conv / linear weights only (not BN affine parameters,
path scales or biases), linear warm-up then cosine (or linear) decay to 0 stepped per step, label
smoothing, random crop + flip (+ optional cutout) on device, optional EMA of the weights (evaluated with
the live model's BN statistics), bf16 compute with fp32 master weights when ``precision=bf16``. Data is
the ``train`` and ``arch_val`` splits concatenated (uint8 on device); the test split is used once at the
end, without and with test-time augmentation (``final.tta``, see ``tta_logits``: ``flip`` averages the
logits of x and of its mirror image, ``flip_translate`` also those of both at two one-pixel shifts).

With ``final.eval_every=N`` the test accuracy is also measured every N epochs, for an accuracy-vs-time
curve in the docs; no choice depends on it (no early stop, no model selection).

Outputs in the workdir: ``final_metrics.jsonl`` (one ``final_epoch`` row per epoch), ``final.json``,
``final_checkpoints/`` (Orbax, one per epoch; a re-run resumes from the newest) and, from the CLI,
``final_summary.md``. Bad input ends with one line on stderr and exit code 2 (``--debug``: traceback).

Test hook: with ``ASOSE_STOP_AFTER_EPOCH=n`` in the environment, training raises KeyboardInterrupt right
after the checkpoint of epoch ``n`` is written (used by the resume test; the CLI then exits 130).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from asose_jax.arch import GenotypeError, load_genotype
from asose_jax.config import TTA_MODES, Config, ConfigError, tta_label
from asose_jax.data import Dataset, augment_batch, epoch_permutation, normalize
from asose_jax.model import apply_head, conv_bn_relu, count_params, init_conv_bn, init_head
from asose_jax.ops import OP_REGISTRY
from asose_jax.steps import compute_dtype, cross_entropy, padded_batches

logger = logging.getLogger("asose_jax")
LOG_EVERY = 50  # steps between progress-bar refreshes (each one is a host sync)
EVAL_BATCH = 1000
EPOCH_ID_OFFSET = 10_000  # epoch order: epoch_permutation(seed, EPOCH_ID_OFFSET + epoch, ...)
STOP_AFTER_EPOCH_ENV = "ASOSE_STOP_AFTER_EPOCH"
FINAL_JSON_KEYS = ("test_acc", "test_acc_tta", "epochs", "wall_s", "params", "device")


# ---------------------------------------------------------------------------------------------- the derived network

@dataclass(frozen=True)
class DerivedBlock:
    c_in: int
    c_out: int
    stride: int
    input_conv: int  # kernel of the input conv-BN-ReLU (0 = none)
    op_stride: int
    residual: bool
    ops: tuple[str, ...]  # one fixed op per path

    @property
    def path_scale(self) -> bool:
        return self.residual or len(self.ops) > 1


@dataclass(frozen=True)
class DerivedSpec:
    skeleton: str
    stem_channels: int
    blocks: tuple[DerivedBlock, ...]
    num_classes: int = 10
    in_channels: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_genotype(genotype: dict, known_ops=tuple(OP_REGISTRY), where: str = "genotype") -> None:
    """Raise :class:`GenotypeError` (one line) unless ``genotype`` describes a buildable chain."""
    if not isinstance(genotype, dict):
        raise GenotypeError(f"{where}: expected a JSON object")
    ops, blocks = genotype.get("ops"), genotype.get("blocks")
    if not isinstance(ops, list) or not ops:
        raise GenotypeError(f"{where} has no 'ops' list")
    if not isinstance(blocks, list):
        raise GenotypeError(f"{where} has no 'blocks' list")
    if len(ops) != len(blocks):
        raise GenotypeError(f"{where} has {len(ops)} ops for {len(blocks)} blocks; they must match")
    stem = genotype.get("stem_channels", blocks[0].get("c_in") if blocks and isinstance(blocks[0], dict) else None)
    if not _is_int(stem) or stem < 1:
        raise GenotypeError(f"{where}: stem_channels must be a positive integer, got {stem!r}")
    c = stem
    for i, (row, b) in enumerate(zip(ops, blocks)):
        names = row if isinstance(row, list) else [row]
        if not names or not all(isinstance(n, str) for n in names):
            raise GenotypeError(f"{where}: block {i} needs an op name or a non-empty list of op names, got {row!r}")
        for name in names:
            if name not in known_ops:
                raise GenotypeError(f"{where}: unknown op {name!r} in block {i} (known: {', '.join(known_ops)})")
        if not isinstance(b, dict) or not all(_is_int(b.get(k)) for k in ("c_in", "c_out", "stride")):
            raise GenotypeError(f"{where}: block {i} needs integer c_in, c_out and stride, got {b!r}")
        if b["stride"] not in (1, 2) or b["c_out"] < 1:
            raise GenotypeError(f"{where}: block {i} has stride {b['stride']} and c_out {b['c_out']} "
                                f"(allowed: stride 1 or 2, c_out >= 1)")
        if b["c_in"] != c:
            raise GenotypeError(f"{where}: block {i} takes {b['c_in']} channels but receives {c}")
        c = b["c_out"]
    nc = genotype.get("num_classes", 10)
    if not _is_int(nc) or nc < 2:
        raise GenotypeError(f"{where}: num_classes must be an integer >= 2, got {nc!r}")


def derived_spec(genotype: dict, skeleton: str = "resnet", width: int = 0) -> DerivedSpec:
    """The discrete network of ``genotype`` on ``skeleton``; ``width > 0`` replaces the searched widths."""
    validate_genotype(genotype)
    blocks_in = genotype["blocks"]
    stem = width if width > 0 else genotype.get("stem_channels", blocks_in[0]["c_in"])
    blocks, c = [], stem
    for row, b in zip(genotype["ops"], blocks_in):
        ops = tuple(row) if isinstance(row, list) else (row,)
        stride = b["stride"]
        c_out = (c * 2 if stride == 2 else c) if width > 0 else b["c_out"]
        changes = c_out != c or stride != 1
        if skeleton == "resnet":
            blocks.append(DerivedBlock(c, c_out, stride, 3 if changes else 0, 1, True, ops))
        elif skeleton == "original":
            blocks.append(DerivedBlock(c, c_out, stride, 1 if changes else 0, stride, False, ops))
        else:
            raise ConfigError(f"final.skeleton={skeleton!r} is out of range: allowed original | resnet")
        c = c_out
    return DerivedSpec(skeleton, stem, tuple(blocks), genotype.get("num_classes", 10))


def init_derived(key: jax.Array, spec: DerivedSpec, path_scale_init: float = 1.0) -> tuple[dict, dict]:
    """Weights and BN statistics: stem, per block (input conv, one op per path, path scales), head."""
    k_stem, k_blocks, k_head_w, k_head_b = jax.random.split(key, 4)
    c0 = spec.stem_channels
    stem_params, stem_stats = init_conv_bn(k_stem, 3, spec.in_channels, c0)
    params: dict[str, Any] = {"stem": stem_params}
    stats: dict[str, Any] = {"stem": stem_stats}
    params["blocks"], stats["blocks"] = [], []
    for block, kb in zip(spec.blocks, jax.random.split(k_blocks, len(spec.blocks))):
        k_in, k_paths = jax.random.split(kb)
        bp: dict[str, Any] = {}
        bs: dict[str, Any] = {}
        if block.input_conv:
            bp["input_conv"], bs["input_conv"] = init_conv_bn(k_in, block.input_conv, block.c_in, block.c_out)
        paths = [OP_REGISTRY[op].init(kp, block.c_out, block.op_stride)
                 for op, kp in zip(block.ops, jax.random.split(k_paths, len(block.ops)))]
        bp["paths"], bs["paths"] = [p for p, _ in paths], [s for _, s in paths]
        if block.path_scale:
            bp["path_scale"] = jnp.full((len(block.ops),), path_scale_init, jnp.float32)
        params["blocks"].append(bp)
        stats["blocks"].append(bs)
    c_last = spec.blocks[-1].c_out if spec.blocks else c0
    params["head"] = init_head(k_head_w, k_head_b, c_last, spec.num_classes)
    return params, stats


def apply_derived(spec: DerivedSpec, params: dict, stats: dict, x: jax.Array, train: bool,
                  dtype=jnp.float32) -> tuple[jax.Array, dict]:
    """Logits ``[N, classes]`` (float32) and updated BN statistics for normalised images ``[N, H, W, 3]``."""
    h, stem_stats = conv_bn_relu(params["stem"], stats["stem"], x.astype(dtype), 1, train)
    new_stats: dict[str, Any] = {"stem": stem_stats, "blocks": []}
    for block, bp, bs in zip(spec.blocks, params["blocks"], stats["blocks"]):
        ns: dict[str, Any] = {}
        if block.input_conv:
            h, ns["input_conv"] = conv_bn_relu(bp["input_conv"], bs["input_conv"], h, block.stride, train)
        y = h if block.residual else None
        ns["paths"] = []
        for p, op in enumerate(block.ops):
            out, s = OP_REGISTRY[op].apply(bp["paths"][p], bs["paths"][p], h, block.op_stride, train)
            ns["paths"].append(s)
            if block.path_scale:
                out = bp["path_scale"][p].astype(out.dtype) * out
            y = out if y is None else y + out
        h = y
        new_stats["blocks"].append(ns)
    return apply_head(params["head"], h), new_stats


# ---------------------------------------------------------------------------------------------- optimizer, state

def lr_schedule(cfg: Config, steps_per_epoch: int) -> Callable:
    """LR at optimizer step ``t``: linear warm-up over ``final.warmup_epochs`` to ``final.lr``, then cosine
    (or linear, ``final.schedule``) decay to 0 at the last step of ``final.epochs``."""
    f = cfg.final
    total = f.epochs * steps_per_epoch
    warm = min(int(round(f.warmup_epochs * steps_per_epoch)), total - 1)
    span = max(total - warm, 1)

    def schedule(t):
        t = jnp.asarray(t, jnp.float32)
        frac = jnp.clip((t - warm) / span, 0.0, 1.0)
        decay = 0.5 * (1.0 + jnp.cos(jnp.pi * frac)) if f.schedule == "cosine" else 1.0 - frac
        if warm <= 0:
            return f.lr * decay
        return jnp.where(t < warm, f.lr * (t + 1.0) / warm, f.lr * decay)
    return schedule


def decay_mask(params) -> Any:
    """True for conv and linear weights (rank >= 2): the leaves that get weight decay."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def final_optimizer(cfg: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum and PyTorch-style L2 on conv/linear weights, LR stepped per step."""
    f = cfg.final
    return optax.chain(optax.add_decayed_weights(f.weight_decay, mask=decay_mask),
                       optax.trace(decay=f.momentum, nesterov=f.nesterov),
                       optax.scale_by_learning_rate(lr_schedule(cfg, steps_per_epoch)))


@flax.struct.dataclass
class FinalState:
    params: Any  # float32 master weights
    batch_stats: Any
    opt_state: Any
    ema: Any  # EMA of params ({} when final.ema_decay == 0)
    key: jax.Array  # per-step keys are fold_in(key, step)
    step: jax.Array  # int32
    sums: Any  # this epoch's device-side loss / correct / count sums


def zero_sums() -> dict:
    return {"loss": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32), "count": jnp.zeros((), jnp.int32)}


def tta_logits(apply: Callable, x: jnp.ndarray, mode: str) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(logits of x, test-time-augmented logits)`` for a batch ``x`` [N, H, W, C] (normalised images).

    ``apply`` maps images to logits [N, classes]. ``flip``: the sum of the logits of x and of its mirror image
    (left-right). ``flip_translate``: that pair at weight 1/2, plus the same pair for x shifted by one pixel
    up-left and by one pixel down-right (reflect padding) at 1/4 each, as fast CIFAR-10 trainers
    (airbench) evaluate. Only the argmax of the result is used, so its scale does not matter.
    """
    def pair(v):
        return apply(v), apply(v[:, :, ::-1, :])
    logits, logits_flip = pair(x)
    out = logits + logits_flip
    if mode == "flip_translate":
        h, w = x.shape[1], x.shape[2]
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        for view in (padded[:, :h, :w], padded[:, 2:, 2:]):
            out = out + 0.5 * sum(pair(view))
    elif mode != "flip":
        raise ValueError(f"final.tta must be one of {TTA_MODES}, got {mode!r}")
    return logits, out


@dataclass(frozen=True)
class FinalSteps:
    init: Callable  # () -> FinalState
    train_step: Callable  # (state, x_all_u8, y_all, perm, i) -> state   (state donated)
    eval_batch: Callable  # (params, stats, x_u8, y, mask) -> (correct, correct_tta)
    lr: Callable


@functools.lru_cache(maxsize=8)
def make_final_steps(spec: DerivedSpec, cfg: Config, steps_per_epoch: int) -> FinalSteps:
    """Jitted init / train step / eval for one derived network and config (cached: re-runs don't recompile)."""
    f, d = cfg.final, cfg.data
    dtype = compute_dtype(cfg)
    tx = final_optimizer(cfg, steps_per_epoch)
    schedule = lr_schedule(cfg, steps_per_epoch)

    def init() -> FinalState:
        # weights from an "rbg" key: far cheaper to compile than threefry (one kernel per leaf) on CPU
        k_net = jax.random.key(cfg.seed, impl="rbg")
        k_run = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0xF1A1)
        params, stats = init_derived(k_net, spec, f.path_scale_init)
        ema = jax.tree.map(jnp.copy, params) if f.ema_decay > 0 else {}
        return FinalState(params=params, batch_stats=stats, opt_state=tx.init(params), ema=ema, key=k_run,
                          step=jnp.zeros((), jnp.int32), sums=zero_sums())

    def train_step(state: FinalState, x_all, y_all, perm, i) -> FinalState:
        idx = jax.lax.dynamic_index_in_dim(perm, i, keepdims=False)
        x = augment_batch(jax.random.fold_in(state.key, state.step), x_all[idx], d.crop, d.flip, f.cutout)
        y = y_all[idx]

        def loss_fn(params):
            logits, stats = apply_derived(spec, params, state.batch_stats, x, True, dtype)
            return cross_entropy(logits, y, f.label_smoothing), (logits, stats)
        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if f.ema_decay > 0:  # warm-up of the decay (1 + t) / (10 + t) so early EMA is not stuck at init
            t = state.step.astype(jnp.float32)
            decay = jnp.minimum(f.ema_decay, (1.0 + t) / (10.0 + t))
            ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
        sums = {"loss": state.sums["loss"] + loss * y.shape[0],
                "correct": state.sums["correct"] + jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.int32),
                "count": state.sums["count"] + y.shape[0]}
        return state.replace(params=params, batch_stats=stats, opt_state=opt_state, ema=ema,
                             step=state.step + 1, sums=sums)

    def eval_batch(params, stats, x_u8, y, mask):
        """Correct predictions among the unmasked examples: plain, and with the test-time augmentation."""
        logits, logits_tta = tta_logits(lambda v: apply_derived(spec, params, stats, v, False, dtype)[0],
                                        normalize(x_u8), f.tta)
        plain = jnp.sum((jnp.argmax(logits, -1) == y) & mask)
        tta = jnp.sum((jnp.argmax(logits_tta, -1) == y) & mask)
        return plain, tta

    return FinalSteps(init=jax.jit(init), train_step=jax.jit(train_step, donate_argnums=0),
                      eval_batch=jax.jit(eval_batch), lr=schedule)


def evaluate_tta(steps: FinalSteps, params, stats, images, labels, batch_size: int = EVAL_BATCH) -> tuple[float, float]:
    """Test accuracy (%) without and with test-time augmentation over a whole split (device arrays), fixed order."""
    n = int(images.shape[0])
    plain = tta = 0
    for xb, yb, mask in padded_batches(images, labels, batch_size):
        p, t = steps.eval_batch(params, stats, xb, yb, mask)
        plain += int(p)
        tta += int(t)
    return 100.0 * plain / n, 100.0 * tta / n


# ---------------------------------------------------------------------------------------------- the run

def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')}"


def run_fingerprint(spec: DerivedSpec, cfg: Config, n_train: int) -> str:
    """What a final checkpoint must match to be resumed: network, recipe, seed, precision, data size."""
    d = {"spec": spec.to_dict(), "final": asdict(cfg.final), "seed": cfg.seed, "precision": cfg.precision,
         "crop": cfg.data.crop, "flip": cfg.data.flip, "n_train": n_train}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class FinalResumeError(RuntimeError):
    """The workdir's final checkpoints belong to another network or recipe; one line for the user."""


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _stop_after_epoch() -> int:
    raw = os.environ.get(STOP_AFTER_EPOCH_ENV, "")
    return int(raw) if raw.strip().isdigit() else 0


def train_final(cfg: Config, genotype: dict, data: Dataset, workdir: Path, progress: bool = True) -> dict:
    """Train the derived network of ``genotype`` on train + arch_val, report test accuracy (plain and with ``final.tta``).

    Writes ``final_metrics.jsonl``, ``final.json`` and ``final_checkpoints/`` in ``workdir`` (resuming from
    the newest checkpoint there) and returns the ``final.json`` dict."""
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    from asose_jax.cycle import DivergenceError

    t0 = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    f = cfg.final
    spec = derived_spec(genotype, f.skeleton, f.width)
    if spec.num_classes != data.num_classes:
        raise GenotypeError(f"genotype has {spec.num_classes} classes, the data {data.num_classes}")
    x_np = np.concatenate([data.train.images, data.arch_val.images])
    y_np = np.concatenate([data.train.labels, data.arch_val.labels])
    n, bs = int(x_np.shape[0]), f.batch_size
    if n < bs:
        raise ConfigError(f"final.batch_size={bs} is larger than the {n} training images")
    steps_per_epoch = n // bs
    steps = make_final_steps(spec, cfg, steps_per_epoch)
    x_all, y_all = jnp.asarray(x_np), jnp.asarray(y_np)
    x_test, y_test = jnp.asarray(data.test.images), jnp.asarray(data.test.labels)
    fingerprint = run_fingerprint(spec, cfg, n)

    metrics: list[dict] = []
    start_epoch, wall_offset = 0, 0.0
    manager = None
    if cfg.checkpoint.enabled:
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.max_to_keep, create=True,
                                               enable_async_checkpointing=True)
        manager = ocp.CheckpointManager((workdir / "final_checkpoints").resolve(), options=options)
    state = None
    if manager is not None and manager.all_steps():
        latest = max(manager.all_steps())
        meta = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("fingerprint") != fingerprint:
            raise FinalResumeError(f"{workdir / 'final_checkpoints'} holds a final training of another network or "
                                   f"recipe; use a new --workdir or delete that folder")
        abstract = jax.eval_shape(steps.init)
        state = manager.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        start_epoch, wall_offset, metrics = int(meta["epoch"]), float(meta["wall_s"]), list(meta["metrics"])
        logger.info("final training: resumed from %s at epoch %d/%d", workdir / "final_checkpoints", start_epoch,
                    f.epochs)
    if state is None:
        state = steps.init()
    # restored arrays are committed to a device; commit fresh ones too, so both hit the same compiled step
    state = jax.device_put(state, jax.devices()[0])
    params_n = count_params(state.params)
    logger.info("final training: %s skeleton, %d blocks, %d weights, %d epochs x %d steps of %d (%s, %s)",
                spec.skeleton, len(spec.blocks), params_n, f.epochs, steps_per_epoch, bs, cfg.precision, device_name())
    _write_jsonl(workdir / "final_metrics.jsonl", metrics)

    def wall() -> float:
        return wall_offset + time.perf_counter() - t0

    def test_accuracy(s: FinalState) -> tuple[float, float]:
        """Test accuracy (%) without and with test-time augmentation, of the EMA weights when there are any."""
        return evaluate_tta(steps, s.ema if f.ema_decay > 0 else s.params, s.batch_stats, x_test, y_test)

    stop_after = _stop_after_epoch()
    try:
        for epoch in range(start_epoch, f.epochs):
            perm = jnp.asarray(epoch_permutation(cfg.seed, EPOCH_ID_OFFSET + epoch, n, bs))
            state = state.replace(sums=zero_sums())
            bar = tqdm(total=steps_per_epoch, desc=f"final {epoch + 1}/{f.epochs}", leave=False,
                       disable=not progress, dynamic_ncols=True)
            t_epoch = time.perf_counter()
            for i in range(steps_per_epoch):
                state = steps.train_step(state, x_all, y_all, perm, i)
                if (i + 1) % LOG_EVERY == 0 or i + 1 == steps_per_epoch:
                    if progress:
                        sums = jax.device_get(state.sums)
                        c = max(int(sums["count"]), 1)
                        bar.set_postfix(loss=f"{float(sums['loss']) / c:.3f}",
                                        acc=f"{100.0 * int(sums['correct']) / c:.1f}", refresh=False)
                    bar.update(i + 1 - bar.n)
            sums = jax.device_get(state.sums)
            elapsed = time.perf_counter() - t_epoch
            bar.close()
            c = max(int(sums["count"]), 1)
            loss = float(sums["loss"]) / c
            if not math.isfinite(loss):
                raise DivergenceError(f"final training loss became NaN/Inf in epoch {epoch + 1}; "
                                      f"lower final.lr (now {f.lr})")
            row = {"event": "final_epoch", "epoch": epoch + 1, "loss": loss, "acc": 100.0 * int(sums["correct"]) / c,
                   "lr": float(steps.lr(int(state.step) - 1)), "img_per_s": steps_per_epoch * bs / max(elapsed, 1e-9)}
            if f.eval_every and (epoch + 1) % f.eval_every == 0 and epoch + 1 < f.epochs:  # the curve only
                row["test_acc"], row["test_acc_tta"] = test_accuracy(state)
            row["wall_s"] = wall()
            metrics.append(row)
            _write_jsonl(workdir / "final_metrics.jsonl", metrics)
            logger.info("final epoch %d/%d: loss %.4f, train acc %.2f %%, lr %.4f, %.0f img/s", epoch + 1, f.epochs,
                        row["loss"], row["acc"], row["lr"], row["img_per_s"])
            if manager is not None:
                meta = {"epoch": epoch + 1, "wall_s": wall(), "metrics": metrics, "fingerprint": fingerprint}
                manager.save(epoch + 1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                 meta=ocp.args.JsonSave(meta)))
            if stop_after and epoch + 1 == stop_after and epoch + 1 < f.epochs:
                if manager is not None:
                    manager.wait_until_finished()
                raise KeyboardInterrupt(f"{STOP_AFTER_EPOCH_ENV}={stop_after}")
    finally:
        if manager is not None:
            manager.wait_until_finished()
            manager.close()

    test_acc, test_acc_tta = test_accuracy(state)
    result = {"test_acc": test_acc, "test_acc_tta": test_acc_tta, "tta": f.tta, "epochs": f.epochs, "wall_s": wall(),
              "params": params_n, "device": device_name(), "genotype": genotype}
    _write_json(workdir / "final.json", result)
    logger.info("final training done in %.1f s: test %.2f %%, %s %.2f %% (%d weights)", result["wall_s"],
                test_acc, tta_label(result), test_acc_tta, params_n)
    return result


# ---------------------------------------------------------------------------------------------- report, CLI

def write_final_summary(workdir: Path, result: dict, spec: DerivedSpec, metrics: list[dict]) -> None:
    """``final_summary.md``: the figures, the network, the per-epoch curve."""
    lines = [f"# Final training: `{workdir.name}`", "",
             f"- test accuracy: **{result['test_acc']:.2f} %** ({tta_label(result)}: **{result['test_acc_tta']:.2f} %**)",
             f"- epochs: {result['epochs']}, wall: {result['wall_s']:.1f} s (compile and test included)",
             f"- weights: {result['params']:,}; device: {result['device']}", "",
             f"## Network ({spec.skeleton} skeleton, stem {spec.stem_channels} channels)", "",
             "| block | ops | channels | stride | input conv |", "|---|---|---|---|---|"]
    for i, b in enumerate(spec.blocks):
        ic = f"{b.input_conv}x{b.input_conv}" if b.input_conv else "-"
        lines.append(f"| {i} | {' + '.join(b.ops)} | {b.c_in}->{b.c_out} | {b.stride} | {ic} |")
    lines += ["", "## Epochs", "", "| epoch | loss | train acc % | lr | wall s | img/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['epoch']} | {r['loss']:.4f} | {r['acc']:.2f} | {r['lr']:.4f} | {r['wall_s']:.1f} | "
              f"{r['img_per_s']:.0f} |" for r in metrics]
    lines += ["", "Files: `final.json`, `final_metrics.jsonl`, `final_checkpoints/`, `config.json`.", ""]
    (workdir / "final_summary.md").write_text("\n".join(lines))


def build_train_parser():
    from asose_jax.search import build_parser
    epilog = ("examples:\n"
              "  python -m asose_jax.train --genotype runs/smoke/genotype.json --preset smoke --workdir runs/smoke_final\n"
              "  python -m asose_jax.train --genotype runs/c95/genotype.json --config configs/cifar10_95.py "
              "--set final.epochs=40")
    p = build_parser(prog="python -m asose_jax.train", description=__doc__, epilog=epilog,
                     workdir_help="run directory (default: <genotype dir>/final); re-use it to resume")
    p.add_argument("--genotype", required=True, metavar="PATH", help="genotype.json written by a search")
    return p


def main(argv: list[str] | None = None) -> int:
    from asose_jax.data import DataError, load_dataset
    from asose_jax.search import (UsageError, enable_compilation_cache, prepare_workdir, resolve_config, run_cli,
                                  setup_logging)

    args = build_train_parser().parse_args(argv)
    setup_logging(args.quiet)

    def train() -> None:
        cfg, _ = resolve_config(args)
        genotype = load_genotype(args.genotype, tuple(OP_REGISTRY))
        validate_genotype(genotype, where=f"genotype {args.genotype}")
        spec = derived_spec(genotype, cfg.final.skeleton, cfg.final.width)
        workdir = Path(args.workdir) if args.workdir else Path(args.genotype).parent / "final"
        prepare_workdir(workdir, cfg)
        enable_compilation_cache()
        data = load_dataset(cfg.data, cfg.seed)
        result = train_final(cfg, genotype, data, workdir, progress=not args.no_progress)
        metrics = [json.loads(line) for line in (workdir / "final_metrics.jsonl").read_text().splitlines() if line]
        write_final_summary(workdir, result, spec, metrics)
        print(f"test accuracy {result['test_acc']:.2f} % ({tta_label(result)} {result['test_acc_tta']:.2f} %); "
              f"{workdir / 'final.json'}")

    return run_cli(train, args.debug, (ConfigError, DataError, UsageError, GenotypeError, FinalResumeError),
                   "the last epoch's checkpoint was written; re-run the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
