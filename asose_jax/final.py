"""``python -m asose_jax.final``: train the final network of a genotype on the 50k training images.

The final network is the supernet's :class:`~asose_jax.model.NetSpec` with one fixed op per path
(:func:`asose_jax.genotype.genotype_spec`), built and run by the same ``model`` functions in the mixed op's
``fixed`` mode: no switch, and no weights for unused ops.

Recipe: SGD (Nesterov) with L2 on conv / linear weights only, warm-up then cosine (or linear) decay stepped per
step, label smoothing, random crop + flip (+ cutout) on device, an optional EMA of the weights (evaluated with
the live model's BN statistics), bf16 compute with fp32 master weights under ``precision=bf16``. Recipe decisions
read only the ``final.val_size`` images held out of train + arch_val (:func:`hold_out`); ``final.val_size=0`` is
the reporting run, on all of them. The test split is read once, at the end, and nothing depends on it.

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

from asose_jax import cli
from asose_jax.checkpoint import Checkpointer
from asose_jax.config import TTA_MODES, Config, check_final_val_size, tta_label
from asose_jax.data import Dataset, augment_batch, epoch_permutation, normalize
from asose_jax.errors import CheckpointError, ConfigError, DivergenceError, GenotypeError
from asose_jax.genotype import genotype_spec, load_genotype
from asose_jax.model import NetSpec, apply_network, count_params, init_network
from asose_jax.steps import padded_batches
from asose_jax.train_state import compute_dtype, cross_entropy
from asose_jax.utils import (EVAL_BATCH, FINAL_CHECKPOINTS, LOG_EVERY, ctrl_c_flag, device_name, holds_checkpoint,
                             write_json, write_jsonl)

logger = logging.getLogger("asose_jax")
EPOCH_ID_OFFSET = 10_000  # epoch order: epoch_permutation(seed, EPOCH_ID_OFFSET + epoch, ...)
STOP_AFTER_EPOCH_ENV = "ASOSE_STOP_AFTER_EPOCH"
VAL_SPLIT_STREAM = 0x5A1  # the held-out split's permutation: default_rng([seed, VAL_SPLIT_STREAM])
FINAL_STREAM = 0xF1A1  # the final network's weights (default_rng((seed, FINAL_STREAM))) and run key (fold_in)


def apply_final(spec: NetSpec, params: dict, stats: dict, x: jax.Array, train: bool,
                dtype=jnp.float32) -> tuple[jax.Array, dict]:
    """Logits ``[N, classes]`` (float32) and updated BN statistics of the fixed-op network for normalised
    images ``[N, H, W, 3]``."""
    return apply_network(spec, params, stats, x, None, "fixed", train, dtype=dtype)


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
def make_final_steps(spec: NetSpec, cfg: Config, steps_per_epoch: int) -> FinalSteps:
    """Jitted init / train step / eval for one fixed-op network and config (cached: re-runs don't recompile)."""
    f, d = cfg.final, cfg.data
    dtype = compute_dtype(cfg)
    tx = final_optimizer(cfg, steps_per_epoch)
    schedule = lr_schedule(cfg, steps_per_epoch)

    @jax.jit
    def state_around(params, stats) -> FinalState:
        k_run = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), FINAL_STREAM)
        ema = jax.tree.map(jnp.copy, params) if f.ema_decay > 0 else {}
        return FinalState(params=params, batch_stats=stats, opt_state=tx.init(params), ema=ema, key=k_run,
                          step=jnp.zeros((), jnp.int32), sums=zero_sums())

    def init() -> FinalState:
        """Weights drawn on the host (``model.init_network``: nothing to compile) from the seed's final-training
        stream, the rest in one small jitted program."""
        return state_around(*init_network(np.random.default_rng((cfg.seed, FINAL_STREAM)), spec, f.path_scale_init))

    def train_step(state: FinalState, x_all, y_all, perm, i) -> FinalState:
        idx = jax.lax.dynamic_index_in_dim(perm, i, keepdims=False)
        x = augment_batch(jax.random.fold_in(state.key, state.step), x_all[idx], d.crop, d.flip, f.cutout)
        y = y_all[idx]

        def loss_fn(params):
            logits, stats = apply_final(spec, params, state.batch_stats, x, True, dtype)
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
        logits, logits_tta = tta_logits(lambda v: apply_final(spec, params, stats, v, False, dtype)[0],
                                        normalize(x_u8), f.tta)
        plain = jnp.sum((jnp.argmax(logits, -1) == y) & mask)
        tta = jnp.sum((jnp.argmax(logits_tta, -1) == y) & mask)
        return plain, tta

    return FinalSteps(init=init, train_step=jax.jit(train_step, donate_argnums=0),
                      eval_batch=jax.jit(eval_batch), lr=schedule)


# ---------------------------------------------------------------------------------------------- the run

def run_fingerprint(spec: NetSpec, cfg: Config, n_train: int) -> str:
    """What a final checkpoint must match to be resumed: network, recipe, seed, precision, data size."""
    d = {"spec": spec.to_dict(), "final": asdict(cfg.final), "seed": cfg.seed, "precision": cfg.precision,
         "crop": cfg.data.crop, "flip": cfg.data.flip, "n_train": n_train}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _stop_after_epoch() -> int:
    raw = os.environ.get(STOP_AFTER_EPOCH_ENV, "")
    return int(raw) if raw.strip().isdigit() else 0


@dataclass
class FinalRun:
    """What one final training works on: the network, its data on the device, its steps and checkpoints."""
    cfg: Config
    spec: NetSpec
    steps: FinalSteps
    x_all: jax.Array  # uint8 [n, 32, 32, 3]: train + arch_val, less the held-out split
    y_all: jax.Array
    x_val: jax.Array  # uint8 [final.val_size, 32, 32, 3]: the held-out split (empty in the reporting run)
    y_val: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    steps_per_epoch: int
    fingerprint: str
    ckpt: Checkpointer | None

    def accuracy(self, state: FinalState, split: str) -> tuple[float, float]:
        """Accuracy (%) on ``split`` (``val`` or ``test``) without and with test-time augmentation, of the EMA
        weights when there are any: every image, in a fixed order."""
        params = state.ema if self.cfg.final.ema_decay > 0 else state.params
        images, labels = (self.x_val, self.y_val) if split == "val" else (self.x_test, self.y_test)
        plain = tta = 0
        for xb, yb, mask in padded_batches(images, labels, EVAL_BATCH):
            p, t = self.steps.eval_batch(params, state.batch_stats, xb, yb, mask)
            plain += int(p)
            tta += int(t)
        n = int(images.shape[0])
        return 100.0 * plain / n, 100.0 * tta / n


def hold_out(x: np.ndarray, y: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_val, y_val)``: ``val_size`` examples drawn by a permutation seeded by ``seed``
    are held out; both parts keep the input order. ``val_size=0`` returns ``x, y`` unchanged and empty val."""
    held = np.zeros(len(y), bool)
    held[np.random.default_rng([seed, VAL_SPLIT_STREAM]).permutation(len(y))[:val_size]] = True
    return x[~held], y[~held], x[held], y[held]


def final_split(cfg: Config, genotype: dict, data: Dataset) -> tuple[NetSpec, tuple[np.ndarray, ...]]:
    """The fixed-op network of ``genotype`` and its host data ``(x_train, y_train, x_val, y_val)``: train +
    arch_val with ``final.val_size`` held out. Raises GenotypeError / ConfigError when they do not fit."""
    f = cfg.final
    spec = genotype_spec(genotype, f.skeleton, f.width)
    if spec.num_classes != data.num_classes:
        raise GenotypeError(f"genotype has {spec.num_classes} classes, the data {data.num_classes}")
    x_np = np.concatenate([data.train.images, data.arch_val.images])
    y_np = np.concatenate([data.train.labels, data.arch_val.labels])
    if len(y_np) < f.batch_size:
        raise ConfigError(f"final.batch_size={f.batch_size} is larger than the {len(y_np)} training images")
    check_final_val_size(f, len(y_np))
    return spec, hold_out(x_np, y_np, f.val_size, cfg.seed)


def prepare_final(cfg: Config, genotype: dict, data: Dataset, workdir: Path) -> FinalRun:
    """The fixed-op network of ``genotype``, the data on the device (``final.val_size`` held out), the compiled
    steps and the checkpointer."""
    spec, (x_np, y_np, x_val, y_val) = final_split(cfg, genotype, data)
    n = int(x_np.shape[0])
    steps_per_epoch = n // cfg.final.batch_size
    ckpt = Checkpointer(workdir / FINAL_CHECKPOINTS, cfg.checkpoint.max_to_keep) if cfg.checkpoint.enabled else None
    return FinalRun(cfg, spec, make_final_steps(spec, cfg, steps_per_epoch), jnp.asarray(x_np), jnp.asarray(y_np),
                    jnp.asarray(x_val), jnp.asarray(y_val), jnp.asarray(data.test.images),
                    jnp.asarray(data.test.labels), steps_per_epoch, run_fingerprint(spec, cfg, n), ckpt)


def same_run_check(directory: Path, fingerprint: str) -> Callable[[dict], None]:
    """``check(meta)``: CheckpointError unless a final checkpoint's meta carries ``fingerprint``."""
    def check(meta: dict) -> None:
        if meta.get("fingerprint") != fingerprint:
            raise CheckpointError(f"{directory} holds a final training of another network or recipe (final.* "
                                  f"and the genotype must match; resume.allow_config_change does not apply): use a "
                                  f"new --workdir or delete that folder")
    return check


def check_final_checkpoints(cfg: Config, genotype: dict, data: Dataset, workdir: Path) -> None:
    """Raise now what :func:`train_final` would raise before its first step (the genotype or the batch does
    not fit the data; the checkpoints in ``workdir`` are of another network or recipe), writing nothing: the
    commands call it before they write ``config.json``."""
    spec, (x_train, *_) = final_split(cfg, genotype, data)
    directory = workdir / FINAL_CHECKPOINTS
    if cfg.checkpoint.enabled and holds_checkpoint(directory):
        meta = Checkpointer(directory, cfg.checkpoint.max_to_keep).newest_meta()
        if meta is not None:
            same_run_check(directory, run_fingerprint(spec, cfg, len(x_train)))(meta)


def restore_or_init(run: FinalRun, workdir: Path) -> tuple[FinalState, dict]:
    """The newest final checkpoint that restores and its meta (epoch, wall_s, metrics), or a fresh state.

    Raises CheckpointError when the checkpoints belong to another network or recipe (their fingerprint)."""
    restored = None
    if run.ckpt is not None:
        restored = run.ckpt.restore_latest(lambda spec: jax.eval_shape(run.steps.init),
                                           same_run_check(run.ckpt.directory, run.fingerprint))
    if restored is None:
        return run.steps.init(), {"epoch": 0, "wall_s": 0.0, "metrics": []}
    logger.info("final training: resumed from %s at epoch %d/%d", workdir / FINAL_CHECKPOINTS,
                restored.meta["epoch"], run.cfg.final.epochs)
    return restored.state, restored.meta


def train_epoch(run: FinalRun, state: FinalState, epoch: int, progress: bool,
                interrupt=None) -> tuple[FinalState, dict]:
    """One epoch in the order of ``(seed, EPOCH_ID_OFFSET + epoch)``; returns the state and its metrics row.
    Raises KeyboardInterrupt after the step during which ``interrupt`` (a ``threading.Event``) was set."""
    from tqdm.auto import tqdm
    f, bs, n_steps = run.cfg.final, run.cfg.final.batch_size, run.steps_per_epoch
    perm = jnp.asarray(epoch_permutation(run.cfg.seed, EPOCH_ID_OFFSET + epoch, int(run.x_all.shape[0]), bs))
    state = state.replace(sums=zero_sums())
    bar = tqdm(total=n_steps, desc=f"final {epoch + 1}/{f.epochs}", leave=False, disable=not progress,
               dynamic_ncols=True)
    t_epoch = time.perf_counter()
    for i in range(n_steps):
        state = run.steps.train_step(state, run.x_all, run.y_all, perm, i)
        if interrupt is not None and interrupt.is_set():  # Ctrl-C: the last epoch's checkpoint is the resume point
            raise KeyboardInterrupt
        if (i + 1) % LOG_EVERY == 0 or i + 1 == n_steps:
            if progress:
                sums = jax.device_get(state.sums)
                c = max(int(sums["count"]), 1)
                bar.set_postfix(loss=f"{float(sums['loss']) / c:.3f}", acc=f"{100.0 * int(sums['correct']) / c:.1f}",
                                refresh=False)
            bar.update(i + 1 - bar.n)
    sums = jax.device_get(state.sums)
    elapsed = time.perf_counter() - t_epoch
    bar.close()
    c = max(int(sums["count"]), 1)
    loss = float(sums["loss"]) / c
    if not math.isfinite(loss):
        raise DivergenceError(f"final training loss became NaN/Inf in epoch {epoch + 1}; lower final.lr (now {f.lr})")
    row = {"event": "final_epoch", "epoch": epoch + 1, "loss": loss, "acc": 100.0 * int(sums["correct"]) / c,
           "lr": float(run.steps.lr(int(state.step) - 1)), "img_per_s": n_steps * bs / max(elapsed, 1e-9)}
    if f.val_size and f.eval_every and (epoch + 1) % f.eval_every == 0 and epoch + 1 < f.epochs:  # the curve only
        row["val_acc"], row["val_acc_tta"] = run.accuracy(state, "val")
    return state, row


def train_final(cfg: Config, genotype: dict, data: Dataset, workdir: Path, progress: bool = True) -> dict:
    """Train the fixed-op network of ``genotype`` on train + arch_val less ``final.val_size`` held out; report
    the held-out and the test accuracy (plain and with ``final.tta``).

    Writes ``final_metrics.jsonl``, ``final.json`` and ``final_checkpoints/`` in ``workdir`` (resuming from
    the newest checkpoint there) and returns the ``final.json`` dict."""
    t0 = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    f = cfg.final
    run = prepare_final(cfg, genotype, data, workdir)
    state, meta = restore_or_init(run, workdir)
    start_epoch, wall_offset, metrics = int(meta["epoch"]), float(meta["wall_s"]), list(meta["metrics"])
    # restored arrays are committed to a device; commit fresh ones too, so both hit the same compiled step
    state = jax.device_put(state, jax.devices()[0])
    params_n = count_params(state.params)
    logger.info("final training: %s skeleton, %d blocks, %d weights, %d epochs x %d steps of %d (%s, %s)",
                run.spec.skeleton, len(run.spec.blocks), params_n, f.epochs, run.steps_per_epoch, f.batch_size,
                cfg.precision, device_name())
    write_jsonl(workdir / "final_metrics.jsonl", metrics)
    if f.eval_every and not f.val_size:
        logger.info("final.eval_every=%d: no curve in the reporting run (final.val_size=0)", f.eval_every)

    def wall() -> float:
        return wall_offset + time.perf_counter() - t0

    stop_after = _stop_after_epoch()
    try:
        with ctrl_c_flag() as interrupt:
            for epoch in range(start_epoch, f.epochs):
                state, row = train_epoch(run, state, epoch, progress, interrupt)
                row["wall_s"] = wall()
                metrics.append(row)
                write_jsonl(workdir / "final_metrics.jsonl", metrics)
                logger.info("final epoch %d/%d: loss %.4f, train acc %.2f %%, lr %.4f, %.0f img/s", epoch + 1,
                            f.epochs, row["loss"], row["acc"], row["lr"], row["img_per_s"])
                if run.ckpt is not None:
                    run.ckpt.save(state, run.spec, {"epoch": epoch + 1, "wall_s": wall(), "metrics": metrics,
                                                    "fingerprint": run.fingerprint})
                if stop_after and epoch + 1 == stop_after and epoch + 1 < f.epochs:
                    raise KeyboardInterrupt(f"{STOP_AFTER_EPOCH_ENV}={stop_after}")
    finally:  # also on Ctrl-C and errors: queued saves are finalised before the process exits
        if run.ckpt is not None:
            run.ckpt.wait()

    test_acc, test_acc_tta = run.accuracy(state, "test")
    result = {"test_acc": test_acc, "test_acc_tta": test_acc_tta, "tta": f.tta, "epochs": f.epochs, "wall_s": wall(),
              "params": params_n, "device": device_name(), "genotype": genotype}
    if f.val_size:
        result["val_acc"], result["val_acc_tta"] = run.accuracy(state, "val")
        result["val_size"] = f.val_size
        logger.info("held-out split (%d images): %.2f %%, %s %.2f %%", f.val_size, result["val_acc"],
                    tta_label(result), result["val_acc_tta"])
    write_json(workdir / "final.json", result)
    logger.info("final training done in %.1f s: test %.2f %%, %s %.2f %% (%d weights)", result["wall_s"],
                test_acc, tta_label(result), test_acc_tta, params_n)
    return result


# ---------------------------------------------------------------------------------------------- report, CLI

def write_final_summary(workdir: Path, result: dict, spec: NetSpec, metrics: list[dict]) -> None:
    """``final_summary.md``: the figures, the network, the per-epoch curve."""
    lines = [f"# Final training: `{workdir.name}`", "",
             f"- test accuracy: **{result['test_acc']:.2f} %** ({tta_label(result)}: **{result['test_acc_tta']:.2f} %**)",
             *([f"- held-out accuracy ({result['val_size']} training images, final.val_size): "
                f"{result['val_acc']:.2f} % ({tta_label(result)}: {result['val_acc_tta']:.2f} %)"]
               if "val_acc" in result else []),
             f"- epochs: {result['epochs']}, wall: {result['wall_s']:.1f} s (compile and test included)",
             f"- weights: {result['params']:,}; device: {result['device']}", "",
             f"## Network ({spec.skeleton} skeleton, stem {spec.stem_channels} channels)", "",
             "| block | ops | channels | stride | input conv |", "|---|---|---|---|---|"]
    for i, b in enumerate(spec.blocks):
        ic = f"{b.input_conv}x{b.input_conv}" if b.input_conv else "-"
        lines.append(f"| {i} | {' + '.join(spec.block_ops(i))} | {b.c_in}->{b.c_out} | {b.stride} | {ic} |")
    lines += ["", "## Epochs", "", "| epoch | loss | train acc % | lr | wall s | img/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['epoch']} | {r['loss']:.4f} | {r['acc']:.2f} | {r['lr']:.4f} | {r['wall_s']:.1f} | "
              f"{r['img_per_s']:.0f} |" for r in metrics]
    lines += ["", "Files: `final.json`, `final_metrics.jsonl`, `final_checkpoints/`, `config.json`.", ""]
    (workdir / "final_summary.md").write_text("\n".join(lines))


EPILOG = ("examples:\n"
          "  python -m asose_jax.final --genotype runs/smoke/genotype.json --preset smoke --workdir runs/smoke_final\n"
          "  python -m asose_jax.final --genotype runs/c95/genotype.json --config configs/cifar10_95.py "
          "--set final.epochs=40")


def build_parser():
    p = cli.build_parser("python -m asose_jax.final", __doc__, EPILOG,
                         "run directory (default: <genotype dir>/final); re-use it to resume",
                         set_example="--set final.lr=0.2 --set final.epochs=40")
    p.add_argument("--genotype", metavar="PATH", help="genotype.json written by a search (required)")
    return p


def main(argv: list[str] | None = None) -> int:
    from asose_jax.data import load_dataset
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.genotype or args.show_config):
        parser.error("the following arguments are required: --genotype")
    cli.setup_logging(args.quiet, args.debug)

    def train() -> None:
        cfg, _ = cli.resolve_config(args)
        if args.show_config:
            cli.show_config(cfg)
            return
        genotype = load_genotype(args.genotype)
        spec = genotype_spec(genotype, cfg.final.skeleton, cfg.final.width)
        workdir = Path(args.workdir) if args.workdir else Path(args.genotype).parent / "final"
        with cli.open_workdir(workdir, cfg):
            cli.enable_compilation_cache()
            data = load_dataset(cfg.data, cfg.seed)
            check_final_checkpoints(cfg, genotype, data, workdir)
            cli.write_config(workdir, cfg)  # only now: a refused run leaves config.json as it was
            result = train_final(cfg, genotype, data, workdir, progress=cli.progress(args))
            rows = (workdir / "final_metrics.jsonl").read_text().splitlines()
            write_final_summary(workdir, result, spec, [json.loads(line) for line in rows if line])
        print(f"test accuracy {result['test_acc']:.2f} % ({tta_label(result)} {result['test_acc_tta']:.2f} %); "
              f"{workdir / 'final.json'}")

    return cli.run_cli(train, args.debug, "the last epoch's checkpoint was written; re-run the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
