"""Do XLA's conditionals stall the GPU, and do command buffers (CUDA graphs) remove the stall?

    python scripts/probe_conditionals.py [--precisions fp32,bf16] [--flag-sets default,cmdbuf]

The `original` network (C0=32, L=4, the comparison's network), synthetic batches, batch 128, the one-program
``lax.switch`` single path (``mixed_op.dispatch=switch``: 4 conditionals forward, 4 backward), against the same
program with one candidate op (``sep_conv_3x3``: no conditional, the floor). Each (flag set, precision, variant)
runs in its own child process with its ``XLA_FLAGS``, one after the other (the GPU is never shared while
timing). A child compiles the weight step, reads the optimised HLO (how many conditionals it holds, and how
many of them XLA placed inside a command buffer, where a CUDA graph conditional node evaluates the branch
index on the device instead of copying it to the host), then times weight and arch steps (median of 5 chunks,
device-synchronised) and the GPU busy fraction of 20 weight steps. Prints one JSON line per child and a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

from benchlib import (
    N_BATCHES,
    jax_setup,
    median_ms,
    run_every_op,
    trace_breakdown,
    trace_events,
    traced_gpu_busy,
)

FLAG_SETS = {
    "default": "",
    # every command type the conditional's branches need (fusions, cuBLAS, cuDNN convolutions) plus CONDITIONAL
    "cmdbuf": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE "
              "--xla_gpu_graph_min_graph_size=1",
    "nocmdbuf": "--xla_gpu_enable_command_buffer=",  # no CUDA graphs: every thunk launched on its own
}
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_OPCODE = re.compile(r"(?:^|\s)([a-z][a-z0-9\-]*)\(")
_BRANCHES = re.compile(r"(?:branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+)|"
                       r"false_computation=%?([\w.\-]+))")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_COMMAND_KINDS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "fusion", "copy", "conditional",
                  "while", "call"}


def hlo_computations(text: str) -> dict[str, list[tuple[str, str]]]:
    """Optimised HLO text -> {computation name: [(opcode, rest of the instruction line)]}."""
    comps: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        head = _HEADER.match(line)
        if head and not line.startswith(" "):
            current = comps.setdefault(head.group(1), [])
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None and " = " in line:
            rest = line.split(" = ", 1)[1]
            op = _OPCODE.search(rest)
            if op:
                current.append((op.group(1), rest))
    return comps


def conditional_placement(text: str) -> dict:
    """How many conditionals the program holds, how many sit inside command-buffer computations, and, for the
    others, how often each instruction kind in their branches other than fusions, copies and plumbing occurs
    (custom calls named by target: cuDNN convolutions, for one)."""
    comps = hlo_computations(text)
    total = inside = 0
    blockers: dict[str, int] = {}
    for name, instrs in comps.items():
        for op, rest in instrs:
            if op != "conditional":
                continue
            total += 1
            if "command_buffer" in name:
                inside += 1
                continue
            for m in _BRANCHES.finditer(rest):
                names = [n.strip().lstrip("%") for n in (m.group(1) or "").split(",") if n.strip()]
                names += [n for n in m.groups()[1:] if n]
                for branch in names:
                    for bop, brest in comps.get(branch, []):
                        if bop in _COMMAND_KINDS:
                            continue
                        target = _TARGET.search(brest) if bop == "custom-call" else None
                        kind = f"{bop}:{target.group(1)}" if target else bop
                        blockers[kind] = blockers.get(kind, 0) + 1
    return {"conditionals": total, "in_command_buffers": inside,
            "command_buffers": sum("command_buffer" in n for n in comps), "branch_instruction_kinds": blockers}


def child(precision: str, variant: str, steps: int) -> dict:
    """One configuration in this process (its XLA_FLAGS already set): compile, inspect, time. ``variant``:
    ``switch`` (one program, 8 conditionals), ``floor`` (one program, one candidate op) or ``host`` (the
    host-dispatched engine: 2L+4 programs per step, no conditional)."""
    import jax

    ops = ("sep_conv_3x3",) if variant == "floor" else None
    dispatch = "host" if variant == "host" else "switch"
    spec, x, y, perm, state, S = jax_setup("single", precision, 128, dispatch=dispatch, ops=ops)
    t0 = time.perf_counter()
    placement = {}
    if variant == "host":
        w_exe, a_exe = S.weight_step, S.arch_step
    else:
        w_exe = S.weight_step.lower(state, x, y, perm, 0, S.sample(state)).compile()
        a_exe = S.arch_step.lower(state, x, y, perm, 0, S.arch_sample(state)).compile()
        placement = conditional_placement(w_exe.as_text())
    state = run_every_op(spec, SimpleNamespace(weight_step=w_exe, arch_step=a_exe), "single", variant == "host",
                         state, x, y, perm)
    compile_s = time.perf_counter() - t0
    box = {"state": state, "i": 0}

    def chunk(exe, sampler, sync=True):
        def run(n):
            for _ in range(n):
                s = box["state"]
                box["state"] = exe(s, x, y, perm, box["i"] % N_BATCHES, sampler(s))
                box["i"] += 1
            if sync:
                jax.block_until_ready(box["state"])
        return run

    chunk(w_exe, S.sample)(10)
    weight_ms = median_ms(chunk(w_exe, S.sample), steps)
    host_ms = median_ms(chunk(w_exe, S.sample, sync=False), steps)  # until the calls return: host time per step
    jax.block_until_ready(box["state"])
    chunk(a_exe, S.arch_sample)(5)
    arch_ms = median_ms(chunk(a_exe, S.arch_sample), max(steps // 2, 5))
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2 ** 20
    busy = traced_gpu_busy(lambda: chunk(w_exe, S.sample)(20))
    arch_trace = trace_breakdown(*trace_events(lambda: chunk(a_exe, S.arch_sample)(5)), top=6)
    return {"precision": precision, "variant": variant, "weight_ms": round(weight_ms, 3),
            "host_ms": round(host_ms, 3), "arch_ms": round(arch_ms, 3), "img_per_s": round(128 / weight_ms * 1000),
            "peak_mib": round(peak), "gpu_busy": None if math.isnan(busy) else busy, "compile_s": round(compile_s, 1),
            "device": jax.devices()[0].device_kind, **placement,
            "arch_5_steps": {k: arch_trace[k] for k in ("kernel_total_ms", "kernel_ms", "host_ms", "gaps")}}


def micro(kind: str, steps: int) -> dict:
    """A chain of 8 ``lax.switch`` over 10 branches of one kind (``fusion``: elementwise; ``dot``: a 1x1 conv as a
    matmul, cuBLAS; ``conv``: the same through ``lax.conv``, cuDNN), forward only, ``[128, 16, 16, 64]`` bf16,
    indices passed in, against the same chain with the branches fixed at trace time (no conditional)."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.PRNGKey(0), (128, 16, 16, 64), jnp.bfloat16)
    ws = jax.random.normal(jax.random.PRNGKey(1), (10, 64, 64), jnp.bfloat16) * 0.1

    def branch(k):
        def run(h, w):
            if kind == "fusion":
                return jnp.tanh(h) * (1 + 0.01 * k) + 0.1 * h
            if kind == "dot":
                return jax.nn.relu(jnp.einsum("nhwc,cd->nhwd", h, w[k]))
            return jax.nn.relu(jax.lax.conv_general_dilated(h, w[k][None, None], (1, 1), "VALID",
                                                            dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return run

    branches = [branch(k) for k in range(10)]

    @jax.jit
    def switched(h, w, idx):
        for j in range(8):
            h = jax.lax.switch(idx[j], branches, h, w)
        return h

    @jax.jit
    def fixed(h, w):
        for j in range(8):
            h = branches[j % 10](h, w)
        return h

    idx = jnp.arange(8, dtype=jnp.int32)
    out = {}
    for name, fn in (("switch_ms", lambda: switched(x, ws, idx)), ("fixed_ms", lambda: fixed(x, ws))):
        def run(n, fn=fn):
            for _ in range(n):
                r = fn()
            jax.block_until_ready(r)
        run(3)
        out[name] = round(median_ms(run, steps), 4)
    return {"variant": f"micro_{kind}", "device": jax.devices()[0].device_kind, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--variants", default="switch,floor")
    ap.add_argument("--flag-sets", default="default,cmdbuf", help=f"names from {sorted(FLAG_SETS)}")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed chunk")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per child")
    ap.add_argument("--child", nargs=2, metavar=("PRECISION", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        precision, variant = args.child
        rec = micro(variant.removeprefix("micro_"), args.steps) if variant.startswith("micro_") else \
            child(precision, variant, args.steps)
        print(json.dumps(rec), flush=True)
        return
    rows = []
    for flag_set in args.flag_sets.split(","):
        for precision in args.precisions.split(","):
            for variant in args.variants.split(","):
                env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
                env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FLAG_SETS[flag_set]}".strip()
                cmd = [sys.executable, __file__, "--child", precision, variant, "--steps", str(args.steps)]
                try:
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                                         check=False)
                    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                    rec = json.loads(lines[-1]) if lines else {"error": out.stderr.strip().splitlines()[-3:]}
                except subprocess.TimeoutExpired:
                    rec = {"error": f"timed out after {args.timeout:.0f} s"}
                rec.update(flag_set=flag_set, precision=precision, variant=variant)
                print(json.dumps(rec), flush=True)
                rows.append(rec)
    print("\n| flags | precision | variant | weight ms | host ms | arch ms | img/s | peak MiB | GPU busy | "
          "conditionals (in command buffers) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "switch_ms" in r:
            print(f"| {r['flag_set']} | bf16 | {r['variant']} | switch {r['switch_ms']:.3f} | fixed {r['fixed_ms']:.3f} |")
            continue
        if "error" in r:
            print(f"| {r['flag_set']} | {r['precision']} | {r['variant']} | error: {r['error']} |")
            continue
        busy = "-" if r["gpu_busy"] is None else f"{r['gpu_busy']:.2f}"
        conds = f"{r['conditionals']} ({r['in_command_buffers']})" if "conditionals" in r else "-"
        print(f"| {r['flag_set']} | {r['precision']} | {r['variant']} | {r['weight_ms']:.2f} | {r['host_ms']:.2f} | "
              f"{r['arch_ms']:.2f} | {r['img_per_s']:,} | {r['peak_mib']} | {busy} | {conds} |")


if __name__ == "__main__":
    main()
