"""Every knob of a run, as frozen dataclasses, with validation and typed ``a.b=v`` overrides.

A config file is a Python module with ``get_config() -> Config`` (see ``configs/``). ``--preset NAME``
is a shorthand for ``--config configs/NAME.py``. All errors raise :class:`ConfigError`, whose message is
one line naming the key and the allowed values; the CLI turns it into exit code 2.

This module imports no jax and no other part of the package but ``errors``: every layer may import it. The op,
mixed-op mode and growth kind names are checked against their registries one layer up
(:func:`asose_jax.cli.check_registered_names`), since those registries import this module.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from asose_jax.errors import ConfigError

# The original ASO-SE op set, in its order: the default op set of every mixed op (alpha column order).
PRIMITIVES: tuple[str, ...] = (
    "none", "avg_pool_3x3", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
    "sep_conv_7x7", "dil_conv_3x3", "dil_conv_5x5", "conv_7x1_1x7",
)
TTA_LABELS = {"flip": "flip-TTA", "flip_translate": "flip+translate TTA"}  # final.tta -> how reports name it
TTA_MODES = tuple(TTA_LABELS)


def tta_label(final_result: dict) -> str:
    """How a ``final.json`` dict names its ``test_acc_tta`` (results from before ``final.tta`` existed used flip)."""
    return TTA_LABELS[final_result.get("tta", "flip")]


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class ModelConfig:
    skeleton: str = "resnet"  # "original" (faithful ASO-SE chain) or "resnet" (residual, one stride per stage)
    init_channels: int = 32  # C0: stem output channels
    num_layers: int = 4  # L: evolvable blocks
    ops: tuple[str, ...] = PRIMITIVES  # op set of every mixed op, in alpha column order
    num_classes: int = 10
    stage_width_mult: int = 2  # channel factor at each downsampling stage


@dataclass(frozen=True)
class MixedOpConfig:
    mode: str = "single"  # dense | single | topk | threshold | argmax (used in training steps)
    k: int = 3  # ops kept by topk / threshold
    weight_threshold: float = 0.01  # threshold mode: ops under this weight are skipped
    eval_mode: str = "argmax"  # mode used by eval_step
    dispatch: str = "host"  # single mode: "host" (per-block programs, no conditionals) | "switch" (lax.switch)
    arch_mode: str = ""  # mode of the arch steps when it differs from ``mode`` ("" = ``mode``), e.g. dense


@dataclass(frozen=True)
class ArchConfig:
    init_scale: float = 0.1  # alpha ~ init_scale * N(0, 1)
    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 1e-3  # L2 added to the gradient (torch Adam semantics)
    clip_norm: float = 5.0
    tau_init: float = 5.0
    tau_decay: float = 0.98  # per arch epoch
    tau_min: float = 0.1
    genotype_exclude_none: bool = True
    max_parameter_free: int = -1  # cap on parameter-free ops (none/pools/skip) in the genotype; -1 = no cap
    cost: str = "flops"  # per-op cost of the cost-aware arch loss: flops | latency:PATH (see asose_jax.cost)
    cost_weight: float = 0.0  # lambda of CE + lambda * E_softmax(alpha)[cost]; 0 = the plain arch loss


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.025
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    clip_norm: float = 5.0
    clip_mode: str = "global_norm"  # global_norm | soft (the original's 5 + 0.1 (g - 5) rescale)
    schedule: str = "cosine_restarts"  # cosine_restarts (per weight epoch, T0 / Tmult) | constant
    t0_epochs: int = 50
    t_mult: int = 2
    min_lr: float = 1e-6
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class DataConfig:
    source: str = "auto"  # auto | dir | tfds | download | synthetic
    dir: str = ""  # cifar-10-batches-py directory (or its parent); also ASOSE_DATA_DIR
    verify: bool = True  # md5-check a cifar-10-batches-py directory (once: a stamp skips later checks)
    arch_val_size: int = 10000  # held out of the 50k train images for the arch step and decisions
    train_subset: int = 0  # 0 = all remaining images; else the first N of the weights split
    test_subset: int = 0  # 0 = all 10k
    synthetic_train: int = 2048
    synthetic_test: int = 512
    batch_size: int = 128
    crop: bool = True  # random crop with 4-pixel zero padding
    flip: bool = True


@dataclass(frozen=True)
class CycleConfig:
    max_cycles: int = 15
    warmup_epochs: int = 0  # extra weight epochs with alpha frozen before the first cycle
    weight_epochs: int = 6
    arch_epochs: int = 2
    retrain_epochs: int = 4
    early_stop_cycles: int = 5  # stop when the last N cycles' arch-val accuracy spans < early_stop_range
    early_stop_range: float = 0.3  # percentage points
    target_acc: float = 0.0  # stop when arch-val accuracy (%) reaches it; 0 = never
    eval_every_epoch: bool = True


@dataclass(frozen=True)
class GrowthConfig:
    enabled: bool = True
    every: int = 4  # forced growth every N cycles (0 = never)
    stagnation_cycles: int = 3
    stagnation_range: float = 0.5  # percentage points of arch-val accuracy
    kinds: tuple[str, ...] = ("deepen", "widen", "branch")
    strategy: str = "original"  # original (accuracy-dependent random draw) | cycle (kinds in turn)
    max_depth: int = 15
    depth_param_cap: int = 0  # no depth growth above this many weights (0 = no cap)
    widen_factor: float = 1.5
    deepen_skip_prob: float = 0.9  # original skeleton: P(a training step samples skip_connect in a deepened block)


@dataclass(frozen=True)
class FinalConfig:
    enabled: bool = False  # train the derived network after the search
    epochs: int = 30
    lr: float = 0.4
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    warmup_epochs: float = 2.0
    ema_decay: float = 0.0
    cutout: int = 0
    batch_size: int = 512
    skeleton: str = "resnet"
    width: int = 0  # 0 = the searched network's widths
    schedule: str = "cosine"  # LR after the linear warm-up: cosine | linear decay to 0 (stepped per step)
    path_scale_init: float = 1.0  # initial per-path residual scale (0 = identity-initialised blocks)
    eval_every: int = 0  # also report val accuracy every N epochs (a curve; needs val_size > 0); 0 = end only
    val_size: int = 5000  # training images held out for recipe decisions and curves; 0 = the reporting run
    tta: str = "flip"  # test-time augmentation behind test_acc_tta: flip | flip_translate (see asose_jax.final.tta_logits)


@dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True
    every_steps: int = 0  # also save every N steps inside an epoch (0 = only at phase ends)
    max_to_keep: int = 3


@dataclass(frozen=True)
class ResumeConfig:
    allow_config_change: bool = False


@dataclass(frozen=True)
class Config:
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (bf16 compute, fp32 master weights and BN statistics)
    remat: bool = False  # jax.checkpoint each block of the search's steps (every engine; not the final training)
    model: ModelConfig = field(default_factory=ModelConfig)
    mixed_op: MixedOpConfig = field(default_factory=MixedOpConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cycle: CycleConfig = field(default_factory=CycleConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)


# ---------------------------------------------------------------------------------------------- loading

def load_config_file(path: str | Path) -> Config:
    """Import ``path`` and return its ``get_config()``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"asose_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a broken user file: name it, no traceback
        raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"config file {path}: get_config() must return asose_jax.config.Config")
    return cfg


def preset_path(name: str) -> Path:
    path = CONFIG_DIR / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.py"))
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(known)}")
    return path


def _parse_value(key: str, raw: str, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {raw!r}")
    if typ is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
    if typ is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
    if typ is str:
        return raw
    if origin is tuple:
        items = [s.strip() for s in raw.split(",") if s.strip()]
        (inner, *_) = typing.get_args(typ)
        return tuple(_parse_value(key, s, inner) for s in items)
    raise ConfigError(f"{key}: cannot be set from the command line")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``a.b=v`` strings, typed by the dataclass field; unknown keys raise ConfigError."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        cfg = _set_path(cfg, key.split("."), raw, key)
    return cfg


def _set_path(obj: Any, parts: list[str], raw: str, key: str) -> Any:
    names = {f.name for f in fields(obj)}
    head = parts[0]
    if head not in names:
        raise ConfigError(f"unknown config key {key!r} (valid here: {', '.join(sorted(names))})")
    value = getattr(obj, head)
    if len(parts) == 1:
        if is_dataclass(value):
            raise ConfigError(f"{key} is a section; set one of its fields, e.g. {key}.{fields(value)[0].name}=...")
        return replace(obj, **{head: _parse_value(key, raw, _field_types(type(obj))[head])})
    if not is_dataclass(value):
        raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:1])} has no sub-keys")
    return replace(obj, **{head: _set_path(value, parts[1:], raw, key)})


# ---------------------------------------------------------------------------------------------- validation

def check(cond: bool, key: str, allowed: str, value: Any) -> None:
    """Raise the one-line ConfigError ``key=value is out of range: allowed ...`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}={value!r} is out of range: allowed {allowed}")


def validate(cfg: Config) -> Config:
    """Raise ConfigError naming the first bad value; return cfg unchanged when all is well."""
    check(cfg.precision in ("fp32", "bf16"), "precision", "fp32 | bf16", cfg.precision)
    _validate_model(cfg.model, cfg.mixed_op)
    _validate_optimizers(cfg.arch, cfg.optim, cfg.final)
    _validate_data(cfg.data)
    _validate_schedule(cfg.cycle, cfg.growth, cfg.model)
    _validate_final(cfg.final)
    if cfg.final.enabled:  # else the final training (asose_jax.final) checks it against its data
        check_final_val_size(cfg.final, final_train_images(cfg.data))
    check(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", ">= 0", cfg.checkpoint.every_steps)
    check(cfg.checkpoint.max_to_keep >= 1, "checkpoint.max_to_keep", ">= 1", cfg.checkpoint.max_to_keep)
    return cfg


def _validate_model(m: ModelConfig, mo: MixedOpConfig) -> None:
    check(m.skeleton in ("original", "resnet"), "model.skeleton", "original | resnet", m.skeleton)
    check(m.init_channels >= 2, "model.init_channels", ">= 2", m.init_channels)
    check(m.num_layers >= 1, "model.num_layers", ">= 1", m.num_layers)
    check(len(m.ops) >= 1, "model.ops", "a non-empty list of op names", m.ops)
    check(len(set(m.ops)) == len(m.ops), "model.ops", "distinct op names", m.ops)
    check(m.num_classes >= 2, "model.num_classes", ">= 2", m.num_classes)
    check(m.stage_width_mult >= 1, "model.stage_width_mult", ">= 1", m.stage_width_mult)
    check(mo.dispatch in ("host", "switch"), "mixed_op.dispatch", "host | switch", mo.dispatch)
    check(1 <= mo.k <= len(m.ops), "mixed_op.k", f"1..{len(m.ops)} (the number of ops)", mo.k)
    check(0.0 <= mo.weight_threshold < 1.0, "mixed_op.weight_threshold", "[0, 1)", mo.weight_threshold)


def _validate_optimizers(a: ArchConfig, o: OptimConfig, f: FinalConfig) -> None:
    for name, v in (("arch.lr", a.lr), ("optim.lr", o.lr), ("final.lr", f.lr)):
        check(v > 0 and math.isfinite(v), name, "> 0", v)
    for name, v in (("arch.weight_decay", a.weight_decay), ("optim.weight_decay", o.weight_decay),
                    ("final.weight_decay", f.weight_decay), ("optim.min_lr", o.min_lr)):
        check(v >= 0 and math.isfinite(v), name, ">= 0", v)
    check(0 <= a.b1 < 1 and 0 <= a.b2 < 1, "arch.b1/b2", "[0, 1)", (a.b1, a.b2))
    check(0 <= o.momentum < 1, "optim.momentum", "[0, 1)", o.momentum)
    check(a.clip_norm > 0 and o.clip_norm > 0, "arch.clip_norm/optim.clip_norm", "> 0", (a.clip_norm, o.clip_norm))
    check(o.clip_mode in ("global_norm", "soft"), "optim.clip_mode", "global_norm | soft", o.clip_mode)
    check(o.schedule in ("cosine_restarts", "constant"), "optim.schedule", "cosine_restarts | constant", o.schedule)
    check(o.t0_epochs >= 1 and o.t_mult >= 1, "optim.t0_epochs/t_mult", ">= 1", (o.t0_epochs, o.t_mult))
    check(0 <= o.label_smoothing < 1, "optim.label_smoothing", "[0, 1)", o.label_smoothing)
    check(a.tau_init > 0 and 0 < a.tau_decay <= 1 and 0 < a.tau_min <= a.tau_init, "arch.tau_*",
          "tau_init > 0, 0 < tau_decay <= 1, 0 < tau_min <= tau_init", (a.tau_init, a.tau_decay, a.tau_min))
    check(a.init_scale >= 0, "arch.init_scale", ">= 0", a.init_scale)
    check(a.max_parameter_free >= -1, "arch.max_parameter_free", ">= 0, or -1 for no cap", a.max_parameter_free)
    check(a.cost_weight >= 0 and math.isfinite(a.cost_weight), "arch.cost_weight", ">= 0 (0 = no cost term)",
          a.cost_weight)
    latency = a.cost[len("latency:"):] if a.cost.startswith("latency:") else ""
    check(a.cost == "flops" or (latency and Path(latency).is_file()), "arch.cost",
          "flops | latency:PATH with PATH an existing file (scripts/bench_ops.py --latency-out writes one)", a.cost)


def _validate_data(d: DataConfig) -> None:
    sources = ("auto", "dir", "tfds", "download", "synthetic")
    check(d.source in sources, "data.source", " | ".join(sources), d.source)
    check(d.batch_size >= 1, "data.batch_size", ">= 1", d.batch_size)
    check(0 < d.arch_val_size < 50000 or d.source == "synthetic", "data.arch_val_size", "1..49999", d.arch_val_size)
    check(d.arch_val_size > 0, "data.arch_val_size", ">= 1", d.arch_val_size)
    check(d.train_subset >= 0 and d.test_subset >= 0, "data.train_subset/test_subset", ">= 0",
          (d.train_subset, d.test_subset))
    check(d.synthetic_train > d.arch_val_size or d.source != "synthetic", "data.synthetic_train",
          "> data.arch_val_size", d.synthetic_train)


def _validate_schedule(c: CycleConfig, g: GrowthConfig, m: ModelConfig) -> None:
    check(c.max_cycles >= 1, "cycle.max_cycles", ">= 1", c.max_cycles)
    check(c.weight_epochs >= 1, "cycle.weight_epochs", ">= 1", c.weight_epochs)
    for name, v in (("cycle.warmup_epochs", c.warmup_epochs), ("cycle.arch_epochs", c.arch_epochs),
                    ("cycle.retrain_epochs", c.retrain_epochs)):
        check(v >= 0, name, ">= 0", v)
    check(c.early_stop_cycles >= 0 and c.early_stop_range >= 0, "cycle.early_stop_*", ">= 0",
          (c.early_stop_cycles, c.early_stop_range))
    check(0 <= c.target_acc <= 100, "cycle.target_acc", "0..100 (percent)", c.target_acc)
    check(g.every >= 0, "growth.every", ">= 0", g.every)
    check(g.strategy in ("original", "cycle"), "growth.strategy", "original | cycle", g.strategy)
    check(g.widen_factor > 1.0, "growth.widen_factor", "> 1", g.widen_factor)
    check(0 < g.deepen_skip_prob < 1, "growth.deepen_skip_prob",
          "0 < p < 1 (the probability of sampling skip_connect in a deepened block)", g.deepen_skip_prob)
    check(g.max_depth >= m.num_layers, "growth.max_depth", f">= model.num_layers ({m.num_layers})", g.max_depth)


def _validate_final(f: FinalConfig) -> None:
    check(f.epochs >= 1, "final.epochs", ">= 1", f.epochs)
    check(f.batch_size >= 1, "final.batch_size", ">= 1", f.batch_size)
    check(f.skeleton in ("original", "resnet"), "final.skeleton", "original | resnet", f.skeleton)
    check(0 <= f.ema_decay < 1, "final.ema_decay", "[0, 1)", f.ema_decay)
    check(f.cutout >= 0, "final.cutout", ">= 0", f.cutout)
    check(f.schedule in ("cosine", "linear"), "final.schedule", "cosine | linear", f.schedule)
    check(f.width >= 0, "final.width", ">= 0 (0 = the searched widths)", f.width)
    check(0 <= f.momentum < 1, "final.momentum", "[0, 1)", f.momentum)
    check(0 <= f.label_smoothing < 1, "final.label_smoothing", "[0, 1)", f.label_smoothing)
    check(f.warmup_epochs >= 0, "final.warmup_epochs", ">= 0 (clamped to the run length)", f.warmup_epochs)
    check(math.isfinite(f.path_scale_init), "final.path_scale_init", "a finite number", f.path_scale_init)
    check(f.eval_every >= 0, "final.eval_every", ">= 0 epochs (0 = no curve)", f.eval_every)
    check(f.val_size >= 0, "final.val_size", ">= 0 (0 = the reporting run)", f.val_size)
    check(f.tta in TTA_MODES, "final.tta", " | ".join(TTA_MODES), f.tta)


def final_train_images(d: DataConfig) -> int:
    """How many images a final training gets (the weights split and arch-val together), from the config alone."""
    full = d.synthetic_train if d.source == "synthetic" else 50000
    weights = full - d.arch_val_size
    return (min(weights, d.train_subset) if d.train_subset > 0 else weights) + d.arch_val_size


def check_final_val_size(f: FinalConfig, n_images: int) -> None:
    """ConfigError unless ``final.val_size`` leaves at least ``final.batch_size`` of ``n_images`` to train on."""
    check(f.val_size <= n_images - f.batch_size, "final.val_size",
          f"0..{n_images - f.batch_size} (the final training has {n_images} images and needs final.batch_size="
          f"{f.batch_size} left to train on; 0 = the reporting run)", f.val_size)


# ---------------------------------------------------------------------------------------------- serialisation

def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Config, ignore: tuple[str, ...] = ("resume",)) -> str:
    """sha256 of the JSON config (sections in ``ignore`` excluded): identifies a run for resume."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in ignore}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def from_dict(d: dict) -> Config:
    def build(cls, data):
        kwargs = {}
        hints = _field_types(cls)
        for f_ in fields(cls):
            if f_.name not in data:
                continue
            v = data[f_.name]
            t = hints[f_.name]
            if is_dataclass(t):
                v = build(t, v)
            elif typing.get_origin(t) is tuple:
                v = tuple(v)
            kwargs[f_.name] = v
        return cls(**kwargs)

    return build(Config, d)
