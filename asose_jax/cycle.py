"""The ASO-SE loop: (warm-up) then cycles of weight -> arch -> growth decision -> re-train.

Only orchestration lives here: the math is in ``steps``, ``growth`` and ``arch``. The run is a fixed,
config-determined list of *tasks* (epochs, growth decisions, cycle ends); the cursor is an index into
that list plus the step inside the current epoch, so a restored checkpoint resumes exactly. Epoch
order comes from ``(seed, epoch_id)`` and per-step randomness from ``fold_in(key, step)``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from asose_jax import arch, growth, policy
from asose_jax.checkpoint import Checkpointer, all_finite, resume_hash
from asose_jax.config import Config
from asose_jax.data import Dataset, epoch_permutation, normalize
from asose_jax.errors import CheckpointError, DivergenceError
from asose_jax.model import NetSpec, build_spec, count_params
from asose_jax.parallel import Placement, is_main_process, make_placement, place, place_dataset
from asose_jax.steps import evaluate, make_steps
from asose_jax.train_state import PHASES, create_train_state, zero_sums
from asose_jax.utils import LOG_EVERY, SEARCH_CHECKPOINTS, ctrl_c_flag, device_name, write_json, write_jsonl

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    kind: str  # "epoch" | "grow" | "cycle_end"
    cycle: int
    phase: str = ""
    epoch: int = 0  # epoch index inside its phase
    epoch_id: int = 0  # global epoch counter (seeds the epoch order)


def plan(cfg: Config) -> list[Task]:
    """Every task of the run in order (early stopping may end it sooner)."""
    c = cfg.cycle
    tasks: list[Task] = []
    epoch_id = 0

    def epochs(cycle, phase, n):
        nonlocal epoch_id
        for e in range(n):
            tasks.append(Task("epoch", cycle, phase, e, epoch_id))
            epoch_id += 1
    epochs(0, "warmup", c.warmup_epochs)
    for cyc in range(1, c.max_cycles + 1):
        epochs(cyc, "weight", c.weight_epochs)
        epochs(cyc, "arch", c.arch_epochs)
        tasks.append(Task("grow", cyc))
        epochs(cyc, "retrain", c.retrain_epochs)
        tasks.append(Task("cycle_end", cyc))
    return tasks


class Run:
    """One search run in a workdir: state, spec, compiled steps, metrics, checkpoints.

    The state and the dataset are replicated on the devices of ``placement`` (default: the mesh of
    ``cfg.parallel``) and the steps split each batch over them. With many processes every process runs this
    loop on the same global arrays; only process 0 writes ``metrics.jsonl`` and ``genotype.json``."""

    def __init__(self, cfg: Config, data: Dataset, workdir: str | Path, progress: bool = True,
                 placement: Placement | None = None):
        self.cfg, self.data, self.workdir = cfg, data, Path(workdir)
        self.placement = placement or make_placement(cfg.parallel)
        self.main = is_main_process()
        self.progress = progress and self.main
        self.tasks = plan(cfg)
        bs = cfg.data.batch_size
        self.n_weight_steps = data.train.images.shape[0] // bs
        self.n_arch_steps = data.arch_val.images.shape[0] // bs
        self.x_train, self.y_train = self.place_split(data.train)
        self.x_val, self.y_val = self.place_split(data.arch_val)
        self.metrics: list[dict] = []
        self.task_index, self.step_in_epoch = 0, 0
        self.alpha_history: list[dict] = []
        self._interrupt = None  # set by execute(): Ctrl-C stops at the next step boundary
        self.on_sync: Callable[[int], None] | None = None  # called with state.step at each progress sync
        self.ckpt = (Checkpointer(self.workdir / SEARCH_CHECKPOINTS, cfg.checkpoint.max_to_keep)
                     if cfg.checkpoint.enabled else None)
        self.config_hash = resume_hash(cfg)  # what must match to resume (checkpoint.*, data.dir, resume.* excluded)
        self.wall_offset = 0.0
        self._t0 = time.perf_counter()

    # -------------------------------------------------------------------------------------- state
    def place_split(self, split) -> tuple[jax.Array, jax.Array]:
        """A split's images and labels, replicated on the mesh (placed once)."""
        return place_dataset(split.images, self.placement), place_dataset(split.labels, self.placement)

    def init_state(self) -> None:
        m = self.cfg.model
        self.spec = build_spec(m.skeleton, m.init_channels, m.num_layers, m.ops, m.num_classes, m.stage_width_mult)
        self.state = create_train_state(self.cfg.seed, self.spec, self.cfg, self.n_weight_steps,
                                        self.placement.replicated)
        self.steps = make_steps(self.spec, self.cfg, self.n_weight_steps, self.placement)

    def abstract_state(self, spec: NetSpec):
        """The state's shapes and dtypes, replicated on this run's mesh: a checkpoint restores onto it whatever
        the mesh that saved it."""
        shapes = jax.eval_shape(lambda: create_train_state(0, spec, self.cfg, self.n_weight_steps))
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.placement.replicated),
                            shapes)

    def try_resume(self) -> bool:
        """Restore the newest readable checkpoint (cursor, metrics, state); False when there is none.

        Raises CheckpointError (CLI exit 2) when checkpoints exist but none restores, or when they come
        from another config and ``resume.allow_config_change`` is off.
        """
        if self.ckpt is None or not self.ckpt.steps():
            return False
        restored = self.ckpt.restore_latest(self.abstract_state)
        if restored is None:
            return False
        meta = restored.meta
        if meta.get("config_hash") != self.config_hash and not self.cfg.resume.allow_config_change:
            raise CheckpointError(f"the checkpoints in {self.ckpt.directory} come from a different config; use a "
                                  f"new --workdir or --set resume.allow_config_change=true")
        self.state, self.spec = restored.state, restored.spec
        self.steps = make_steps(self.spec, self.cfg, self.n_weight_steps, self.placement)
        self.task_index = min(int(meta["task_index"]), len(self.tasks))  # a changed config may shorten the plan
        self.step_in_epoch = int(meta["step_in_epoch"]) if self.task_index < len(self.tasks) else 0
        self.metrics = meta["metrics"]
        self.alpha_history = meta["alpha_history"]
        self.wall_offset = meta.get("wall_s", 0.0)
        self._write_metrics()  # drop rows logged after the checkpoint; they are recomputed identically
        t = self.tasks[self.task_index] if self.task_index < len(self.tasks) else None
        if t is None:
            where = "all tasks done"
        elif t.kind == "epoch":
            n = self.n_arch_steps if t.phase == "arch" else self.n_weight_steps
            where = (f"cycle {t.cycle} {t.phase} epoch {t.epoch + 1}/{self._phase_len(t.phase)}, "
                     f"step {self.step_in_epoch}/{n} of the epoch")
        else:
            where = f"cycle {t.cycle} {t.kind.replace('_', ' ')}"
        logger.info("resumed from checkpoint %d at step %d (%s)", restored.ckpt_id, int(self.state.step), where)
        return True

    def save(self) -> None:
        """Queue an async checkpoint of the state and cursor; refuses (DivergenceError) a non-finite state."""
        if self.ckpt is None:
            return
        if not all_finite(self.state):
            raise DivergenceError(f"the state became NaN/Inf by step {int(self.state.step)}; not saved: "
                                  f"{self.kept_checkpoint()}")
        meta = {"task_index": self.task_index, "step_in_epoch": self.step_in_epoch, "metrics": self.metrics,
                "alpha_history": self.alpha_history, "config_hash": self.config_hash, "wall_s": self.wall_s()}
        self.ckpt.save(self.state, self.spec, meta)

    def wall_s(self) -> float:
        return self.wall_offset + time.perf_counter() - self._t0

    def kept_checkpoint(self) -> str:
        """What a stop on NaN/Inf leaves to resume from: the newest checkpoint saved, or none."""
        last = self.ckpt.next_id() - 1 if self.ckpt is not None else -1
        return f"checkpoint {last}, the last good one, is kept" if last >= 0 else "no checkpoint was saved"

    # -------------------------------------------------------------------------------------- logging
    def _write_metrics(self) -> None:
        if self.main:
            write_jsonl(self.workdir / "metrics.jsonl", self.metrics)

    def log(self, row: dict) -> None:
        self.metrics.append(row)
        self._write_metrics()

    def tau(self) -> float:
        return float(self.steps.tau(self.state.arch_epochs))

    def record_alpha(self, cycle: int, phase: str) -> None:
        probs = jax.nn.softmax(self.state.alpha, -1)
        self.alpha_history.append({"cycle": cycle, "phase": phase, "probs": np.asarray(probs).round(6).tolist()})

    # -------------------------------------------------------------------------------------- tasks
    def run_epoch(self, task: Task) -> None:
        arch_phase = task.phase == "arch"
        n_steps = self.n_arch_steps if arch_phase else self.n_weight_steps
        step_fn = self.steps.arch_step if arch_phase else self.steps.weight_step
        sample = self.steps.arch_sample if arch_phase else self.steps.sample
        x, y = (self.x_val, self.y_val) if arch_phase else (self.x_train, self.y_train)
        perm = place(epoch_permutation(self.cfg.seed, task.epoch_id, int(x.shape[0]), self.cfg.data.batch_size),
                     self.placement.replicated)
        if self.step_in_epoch == 0:
            # placed like the steps' outputs: an unplaced scalar is another input type, and the step would compile twice
            self.state = self.state.replace(**place(
                {"sums": zero_sums(), "cycle": jnp.int32(task.cycle), "phase": jnp.int32(PHASES.index(task.phase))},
                self.placement.replicated))
        every = self.cfg.checkpoint.every_steps
        desc = f"cycle {task.cycle} {task.phase} {task.epoch + 1}"
        bar = tqdm(total=n_steps, initial=self.step_in_epoch, desc=desc, leave=False, disable=not self.progress,
                   dynamic_ncols=True)
        t_start, start_step = time.perf_counter(), self.step_in_epoch
        for i in range(self.step_in_epoch, n_steps):
            self.state = step_fn(self.state, x, y, perm, i, sample(self.state))
            self.step_in_epoch = i + 1
            if self._interrupted():  # Ctrl-C: keep this step's state, then stop
                self.save()
                raise KeyboardInterrupt
            if (i + 1) % LOG_EVERY == 0 or i + 1 == n_steps:
                sums = jax.device_get(self.state.sums)
                self._check_finite(sums, task)
                if self.on_sync is not None:
                    self.on_sync(int(self.state.step))
                bar.set_postfix(loss=f"{sums['loss'] / max(sums['count'], 1):.3f}",
                                acc=f"{100 * sums['correct'] / max(sums['count'], 1):.1f}", refresh=False)
                bar.update(i + 1 - bar.n)
            if every and (i + 1) % every == 0 and i + 1 < n_steps:
                self._check_finite(jax.device_get(self.state.sums), task)
                self.save()
        jax.block_until_ready(self.state)
        elapsed = time.perf_counter() - t_start
        bar.close()
        sums = jax.device_get(self.state.sums)
        self._check_finite(sums, task)
        count = max(int(sums["count"]), 1)
        row = {"event": "epoch", "cycle": task.cycle, "phase": task.phase, "epoch": task.epoch,
               "step": int(self.state.step), "loss": float(sums["loss"]) / count,
               "acc": 100.0 * int(sums["correct"]) / count, "split": "arch_val" if arch_phase else "weights",
               "tau": self.tau(), "alpha_entropy": float(jnp.mean(arch.entropy(self.state.alpha))),
               "img_per_s": (n_steps - start_step) * self.cfg.data.batch_size / max(elapsed, 1e-9),
               "params": count_params(self.state.params)}
        if arch_phase:
            self.state = self.state.replace(arch_epochs=self.state.arch_epochs + 1)
        else:  # the weight gradient's pre-clip global norm: mean and max over the epoch's steps
            row.update(grad_norm=float(sums["grad_norm"]) / count, grad_norm_max=float(sums["grad_norm_max"]))
        row["op_probs"] = np.asarray(jnp.mean(jax.nn.softmax(self.state.alpha, -1), 0)).round(5).tolist()
        if self.cfg.cycle.eval_every_epoch or task.epoch + 1 == self._phase_len(task.phase):
            ev = self.evaluate(self.x_val, self.y_val)
            row.update(val_loss=ev["loss"], val_acc=ev["acc"])
        row["wall_s"] = self.wall_s()
        self.log(row)
        self.step_in_epoch = 0
        if arch_phase or task.epoch + 1 == self._phase_len(task.phase):
            self.record_alpha(task.cycle, task.phase)

    def _phase_len(self, phase: str) -> int:
        c = self.cfg.cycle
        return {"warmup": c.warmup_epochs, "weight": c.weight_epochs, "arch": c.arch_epochs,
                "retrain": c.retrain_epochs}[phase]

    def _check_finite(self, sums: dict, task: Task) -> None:
        if not math.isfinite(float(sums["loss"])):
            raise DivergenceError(f"loss became NaN/Inf at step {int(self.state.step)} (cycle {task.cycle}, "
                                  f"{task.phase} epoch {task.epoch + 1}); {self.kept_checkpoint()}")

    def cycle_accuracies(self) -> list[float]:
        return [r["val_acc"] for r in self.metrics if r.get("event") == "cycle_end"]

    def run_grow(self, task: Task) -> None:
        if not self.cfg.growth.enabled:
            return
        key = jax.random.fold_in(jax.random.fold_in(self.state.key, 7919), task.cycle)
        k_decide, k_grow = jax.random.split(key)
        events = [r for r in self.metrics if r.get("event") == "growth"]
        kind = policy.decide(self.cfg, self.spec, k_decide, task.cycle, self.cycle_accuracies(),
                             [r["kind"] for r in events], events[-1]["cycle"] if events else 0,
                             growth.feasible_kinds(self.spec, self.state, self.cfg.growth))
        if kind is None:
            return
        x_fixed = normalize(self.x_val[:64])
        before_spec, before_state = self.spec, self.state
        self.spec, grown, info = growth.grow(kind, self.spec, self.state, k_grow, self.cfg.growth)
        self.state = place(grown, self.placement.replicated)  # new weights come from eager ops, on any device
        diff = growth.max_abs_logit_diff(before_spec, before_state, self.spec, self.state, x_fixed)
        del before_state, grown
        self.steps = make_steps(self.spec, self.cfg, self.n_weight_steps, self.placement)
        self.log({"event": "growth", "cycle": task.cycle, "step": int(self.state.step), **info,
                  "max_abs_logit_diff": diff, "wall_s": self.wall_s()})
        logger.info("growth at cycle %d: %s at %s, params %d -> %d, max |logit diff| %.2e", task.cycle,
                    info["kind"], info["position"], info["params_before"], info["params_after"], diff)

    def run_cycle_end(self, task: Task) -> bool:
        """Evaluate, log; True when the run should stop early."""
        ev = self.evaluate(self.x_val, self.y_val)
        self.log({"event": "cycle_end", "cycle": task.cycle, "step": int(self.state.step), "val_loss": ev["loss"],
                  "val_acc": ev["acc"], "tau": self.tau(), "params": count_params(self.state.params),
                  "layers": len(self.spec.blocks), "genotype": self.genotype()["ops"], "wall_s": self.wall_s()})
        c = self.cfg.cycle
        accs = self.cycle_accuracies()
        if c.target_acc and accs[-1] >= c.target_acc:
            logger.info("arch-val accuracy %.2f%% reached the target %.2f%%: stopping", accs[-1], c.target_acc)
            return True
        if c.early_stop_cycles and len(accs) >= c.early_stop_cycles:
            window = accs[-c.early_stop_cycles:]
            if max(window) - min(window) < c.early_stop_range:
                logger.info("arch-val accuracy flat over %d cycles: early stop", c.early_stop_cycles)
                return True
        return False

    def genotype(self) -> dict:
        rows = arch.derive_genotype(self.state.alpha, self.spec.ops, self.cfg.arch.genotype_exclude_none,
                                    self.cfg.arch.max_parameter_free)
        ops = [rows[off] if block.n_paths == 1 else rows[off:off + block.n_paths]
               for block, off in zip(self.spec.blocks, self.spec.row_offsets())]
        return {"skeleton": self.spec.skeleton, "ops": ops, "op_set": list(self.spec.ops),
                "blocks": [{"c_in": b.c_in, "c_out": b.c_out, "stride": b.stride} for b in self.spec.blocks],
                "stem_channels": self.spec.stem_channels, "num_classes": self.spec.num_classes}

    # -------------------------------------------------------------------------------------- main loop
    def execute(self) -> dict:
        """Run (or finish) every task; returns the final arch-val and test figures."""
        try:
            with ctrl_c_flag() as self._interrupt:
                self._run_tasks()
        finally:  # also on Ctrl-C and errors: queued saves are finalised before the process exits
            if self.ckpt is not None:
                self.ckpt.wait()
        return self.finish()

    def _interrupted(self) -> bool:
        return self._interrupt is not None and self._interrupt.is_set()

    def _run_tasks(self) -> None:
        while self.task_index < len(self.tasks):
            task = self.tasks[self.task_index]
            stop = False
            if task.kind == "epoch":
                self.run_epoch(task)
            elif task.kind == "grow":
                self.run_grow(task)
            else:
                stop = self.run_cycle_end(task)
            self.task_index = len(self.tasks) if stop else self.task_index + 1
            self.save()
            if self._interrupted():
                raise KeyboardInterrupt

    def finish(self) -> dict:
        ev = self.evaluate(self.x_val, self.y_val)
        test = self.evaluate(*self.place_split(self.data.test))
        result = {"arch_val_acc": ev["acc"], "test_acc": test["acc"], "test_loss": test["loss"],
                  "params": count_params(self.state.params), "layers": len(self.spec.blocks),
                  "steps": int(self.state.step), "device": device_name()}
        if self.main:
            write_json(self.workdir / "genotype.json", self.genotype())
        return result

    def evaluate(self, images: jax.Array, labels: jax.Array) -> dict[str, float]:
        """Mean loss and accuracy over a split, in batches split evenly over the mesh."""
        return evaluate(self.steps, self.state, images, labels, multiple=self.placement.size)
