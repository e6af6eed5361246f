"""Compile time per program of a preset's search, at the start and after each growth kind, for one engine.

    python scripts/compile_times.py --engine routed [--preset default]     # engines: host, switch, routed

Runs the preset's network and steps in this process on synthetic data sized so that compilation, not training,
is what takes time (batch 16, 64 weight steps and 8 arch steps an epoch: enough draws that the host engine meets
every (block shape, op) program an epoch of a real search meets; a test split as large as arch-val, so that both
are evaluated in batches of one shape, as in a real search), with one warm-up epoch, then three cycles of a
weight epoch, an arch epoch, a growth (deepen, widen, branch in turn) and a retrain epoch, and one more arch epoch
(so that each growth is followed by weight and arch steps). Every program's tracing, lowering and XLA compilation
is timed through ``jax.monitoring`` (no persistent cache unless ``--cache``) and charged to the stage it happens in:
``first epoch`` (the initial state and the first warm-up epoch with its evaluation), ``rest of start`` (up to the
first growth: the other first epochs and the first arch epoch), then ``after deepen``, ``after widen``, ``after
branch`` (the growth's own programs and the epochs after it). Prints one JSON line per stage (seconds per program
name, with counts) and a markdown table.

Engines: ``host`` (``single``, host-dispatched blocks), ``switch`` (``single``, one program with ``lax.switch``),
``routed`` (routed weight steps, dense arch steps: no conditional).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time

ENGINE_SETS = {
    "host": ["mixed_op.mode=single", "mixed_op.dispatch=host", "mixed_op.arch_mode="],
    "switch": ["mixed_op.mode=single", "mixed_op.dispatch=switch", "mixed_op.arch_mode="],
    "routed": ["mixed_op.mode=routed", "mixed_op.arch_mode=dense"],
}
SIZE_SETS = ["data.source=synthetic", "data.batch_size=16", "data.synthetic_train=1152", "data.arch_val_size=128",
             "data.synthetic_test=128", "cycle.max_cycles=3", "cycle.warmup_epochs=1", "cycle.weight_epochs=1",
             "cycle.arch_epochs=1", "cycle.retrain_epochs=1", "cycle.early_stop_cycles=0", "growth.every=1",
             "growth.strategy=cycle", "growth.kinds=deepen,widen,branch", "checkpoint.enabled=false"]
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
PHASES = dict(zip(COMPILE_EVENTS, ("trace", "lower", "xla")))


class CompileClock:
    """Seconds of tracing + lowering + XLA compilation per (stage, program name), from ``jax.monitoring``."""

    def __init__(self):
        import jax
        self.stage = "first epoch"
        self.seconds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.phases: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            name = str(kwargs.get("fun_name", "?")).removeprefix("jit(").removesuffix(")")
            self.seconds[self.stage][name] += duration
            self.phases[self.stage][PHASES[event]] += duration
            if event == COMPILE_EVENTS[-1]:
                self.counts[self.stage][name] += 1


def measure(preset: str, engine: str) -> list[dict]:
    """Run the sized search of ``preset`` with ``engine``; one row per stage."""
    from asose_jax import cli
    from asose_jax import config as config_lib
    from asose_jax.cycle import Run, Task
    from asose_jax.data import load_dataset

    cfg = config_lib.load_config_file(config_lib.preset_path(preset))
    cfg = config_lib.validate(cli.check_registered_names(
        config_lib.apply_overrides(cfg, SIZE_SETS + ENGINE_SETS[engine])))
    clock = CompileClock()
    with tempfile.TemporaryDirectory() as tdir:
        run = Run(cfg, load_dataset(cfg.data, cfg.seed), tdir, progress=False)
        grow, kinds = run.run_grow, iter(cfg.growth.kinds)

        def run_grow(task):
            clock.stage = f"after {next(kinds)}"
            grow(task)
        run.run_grow = run_grow
        epoch = run.run_epoch

        def run_epoch(task):
            epoch(task)
            if clock.stage == "first epoch":
                clock.stage = "rest of start"
        run.run_epoch = run_epoch
        t0 = time.perf_counter()
        run.init_state()
        run.execute()
        run.run_epoch(Task("epoch", run.tasks[-1].cycle, "arch", 0, max(t.epoch_id for t in run.tasks) + 1))
        wall = time.perf_counter() - t0
    grown = [r["kind"] for r in run.metrics if r.get("event") == "growth"]
    assert grown == list(cfg.growth.kinds), grown
    return [{"preset": preset, "engine": engine, "stage": stage, "compile_s": sum(sec.values()),
             "phases": {k: round(v, 2) for k, v in clock.phases[stage].items()},
             "programs": {k: round(v, 2) for k, v in sec.most_common()}, "compiles": dict(clock.counts[stage]),
             "run_wall_s": wall} for stage, sec in clock.seconds.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=list(ENGINE_SETS), required=True)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--cache", default=None, metavar="DIR",
                    help="use the persistent compilation cache in DIR as the commands do (programs that compiled in "
                         ">= 1 s are kept); a second run with the same DIR measures a warm start: another seed, a "
                         "resume, a study's next search (a cache hit counts its retrieval as XLA time)")
    args = ap.parse_args()
    if args.cache:
        from asose_jax import cli
        os.environ["ASOSE_JAX_CACHE"] = args.cache
        cli.enable_compilation_cache()
    rows = measure(args.preset, args.engine)
    for row in rows:
        print(json.dumps({**row, "cache": args.cache}), flush=True)
    print("\n| engine | stage | compile s | programs (s, compilations) |\n|---|---|---|---|")
    for r in rows:
        top = ", ".join(f"{k} {v:.1f} ({r['compiles'].get(k, 0)})" for k, v in list(r["programs"].items())[:4])
        print(f"| {r['engine']} | {r['stage']} | {r['compile_s']:.1f} | {top} |")


if __name__ == "__main__":
    main()
