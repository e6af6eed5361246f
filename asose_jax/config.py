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
class ParallelConfig:
    """Where the search runs: data parallel over a mesh of devices, on one process or many (asose_jax.parallel).

    Not part of what a run is: the config hash leaves it out, so a run saved on N devices resumes on M."""
    devices: str = "auto"  # auto (every device of every process) | N (the first N devices)
    axis: str = "data"  # the mesh axis the batch is split over
    coordinator: str = ""  # host:port of process 0 for many processes; "" = ASOSE_JAX_COORDINATOR, or Slurm/Open MPI
    num_processes: int = 0  # with coordinator; 0 = ASOSE_JAX_NUM_PROCESSES
    process_id: int = -1  # with coordinator, 0..num_processes-1; -1 = ASOSE_JAX_PROCESS_ID
    timeout_s: int = 300  # how long a process waits for the coordinator and the others before giving up


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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


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
        return replace(obj, **{head: _parse_value(key, raw, typing.get_type_hints(type(obj))[head])})
    if not is_dataclass(value):
        raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:1])} has no sub-keys")
    return replace(obj, **{head: _set_path(value, parts[1:], raw, key)})


# ---------------------------------------------------------------------------------------------- validation

@dataclass(frozen=True)
class Range:
    """The finite values a numeric option may take: ``lo..hi`` when the bounds are ints, else an interval
    (``(`` / ``)`` for an open end). ``note`` names the option that sets a bound, or what an end value means."""
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def holds(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (self.lo < v if self.lo_open else self.lo <= v) and (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        if isinstance(self.lo, int) and isinstance(self.hi, int) and not (self.lo_open or self.hi_open):
            text = f"{self.lo}..{self.hi}"
        else:
            text = f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        return f"{text} ({self.note})" if self.note else text


SKELETONS = ("original", "resnet")
DATA_SOURCES = ("auto", "dir", "tfds", "download", "synthetic")
CHOICES: dict[str, tuple[str, ...]] = {  # the string options with a fixed set of values
    "precision": ("fp32", "bf16"), "model.skeleton": SKELETONS, "mixed_op.dispatch": ("host", "switch"),
    "optim.clip_mode": ("global_norm", "soft"), "optim.schedule": ("cosine_restarts", "constant"),
    "data.source": DATA_SOURCES, "growth.strategy": ("original", "cycle"), "final.skeleton": SKELETONS,
    "final.schedule": ("cosine", "linear"), "final.tta": TTA_MODES,
}
FREE_TEXT = {  # the other string options (op, mode and growth names: see asose_jax.cli.registered_names)
    "data.dir": 'a cifar-10-batches-py directory or its parent; "" = none (only with data.source auto | dir)',
    "arch.cost": "flops | latency:PATH (a table from scripts/bench_ops.py --latency-out)",
    "parallel.devices": "auto | N, a device count from 1",
    "parallel.axis": "a mesh axis name",
    "parallel.coordinator": 'host:port of process 0; "" = ASOSE_JAX_COORDINATOR or a detected Slurm / Open MPI job',
}
EPOCHS, CYCLES = 10_000, 1_000  # upper bounds on counts of epochs and cycles: far past any real run
MAX_PROCESSES = 100_000  # upper bound on parallel.num_processes


def ranges(cfg: Config) -> dict[str, Range]:
    """The allowed range of every int and float option. Each is finite and sane: a value past it would
    overflow, allocate without bound or stop learning, rather than run. A few bounds come from another option."""
    m, d, a = cfg.model, cfg.data, cfg.arch
    synthetic = d.source == "synthetic"
    unit, prob = Range(0.0, 1.0), Range(0.0, 1.0, hi_open=True)  # a weight decay; a momentum or a smoothing
    return {
        "seed": Range(0, 2**31 - 1),
        "model.init_channels": Range(2, 1024), "model.num_layers": Range(1, 64),
        "model.num_classes": Range(2, 1000), "model.stage_width_mult": Range(1, 4),
        "mixed_op.k": Range(1, len(m.ops), note="the number of ops"), "mixed_op.weight_threshold": prob,
        "arch.init_scale": Range(0.0, 10.0), "arch.lr": Range(0.0, 1.0, lo_open=True), "arch.b1": prob,
        "arch.b2": prob, "arch.weight_decay": unit, "arch.clip_norm": Range(0.0, 1000.0, lo_open=True),
        "arch.tau_init": Range(0.0, 100.0, lo_open=True), "arch.tau_decay": Range(0.0, 1.0, lo_open=True),
        "arch.tau_min": Range(0.0, a.tau_init, lo_open=True, note="at most arch.tau_init"),
        "arch.max_parameter_free": Range(-1, 1000, note="-1 = no cap"),
        "arch.cost_weight": Range(0.0, 1000.0, note="0 = no cost term"),
        "optim.lr": Range(0.0, 10.0, lo_open=True), "optim.momentum": prob, "optim.weight_decay": unit,
        "optim.clip_norm": Range(0.0, 1000.0, lo_open=True), "optim.t0_epochs": Range(1, EPOCHS),
        "optim.t_mult": Range(1, 100), "optim.min_lr": Range(0.0, 1.0), "optim.label_smoothing": prob,
        "data.arch_val_size": (Range(1, d.synthetic_train - 1, note="below data.synthetic_train") if synthetic
                               else Range(1, 49_999)),
        "data.train_subset": Range(0, 50_000, note="0 = all"), "data.test_subset": Range(0, 10_000, note="0 = all"),
        "data.synthetic_train": Range(2, 50_000), "data.synthetic_test": Range(1, 10_000),
        "data.batch_size": Range(1, 50_000),
        "cycle.max_cycles": Range(1, CYCLES), "cycle.warmup_epochs": Range(0, EPOCHS),
        "cycle.weight_epochs": Range(1, EPOCHS), "cycle.arch_epochs": Range(0, EPOCHS),
        "cycle.retrain_epochs": Range(0, EPOCHS), "cycle.early_stop_cycles": Range(0, CYCLES, note="0 = never"),
        "cycle.early_stop_range": Range(0.0, 100.0, note="percentage points"),
        "cycle.target_acc": Range(0.0, 100.0, note="percent; 0 = never"),
        "growth.every": Range(0, CYCLES, note="0 = never"), "growth.stagnation_cycles": Range(0, CYCLES),
        "growth.stagnation_range": Range(0.0, 100.0, note="percentage points"),
        "growth.max_depth": Range(m.num_layers, 256, note="from model.num_layers"),
        "growth.depth_param_cap": Range(0, 10**10, note="0 = no cap"),
        "growth.widen_factor": Range(1.0, 4.0, lo_open=True),
        "growth.deepen_skip_prob": Range(0.0, 1.0, lo_open=True, hi_open=True),
        "final.epochs": Range(1, EPOCHS), "final.lr": Range(0.0, 10.0, lo_open=True), "final.momentum": prob,
        "final.weight_decay": unit, "final.label_smoothing": prob,
        "final.warmup_epochs": Range(0.0, float(EPOCHS), note="clamped to the run length"),
        "final.ema_decay": Range(0.0, 1.0, hi_open=True, note="0 = no EMA"), "final.cutout": Range(0, 32),
        "final.batch_size": Range(1, 50_000), "final.width": Range(0, 4096, note="0 = the searched widths"),
        "final.path_scale_init": Range(-10.0, 10.0), "final.eval_every": Range(0, EPOCHS, note="0 = no curve"),
        "final.val_size": Range(0, 49_999, note="0 = the reporting run"),
        "checkpoint.every_steps": Range(0, 10**9, note="0 = at phase ends only"),
        "checkpoint.max_to_keep": Range(1, 1000),
        "parallel.num_processes": Range(0, MAX_PROCESSES, note="0 = ASOSE_JAX_NUM_PROCESSES or 1"),
        "parallel.process_id": Range(-1, MAX_PROCESSES - 1, note="-1 = ASOSE_JAX_PROCESS_ID"),
        "parallel.timeout_s": Range(1, 3600),
    }


def check(cond: bool, key: str, allowed: str, value: Any) -> None:
    """Raise the one-line ConfigError ``key=value is out of range: allowed ...`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}={value!r} is out of range: allowed {allowed}")


def validate(cfg: Config) -> Config:
    """Raise ConfigError naming the first bad value; return cfg unchanged when all is well."""
    m = cfg.model
    check(len(m.ops) >= 1, "model.ops", "a non-empty list of op names", m.ops)
    check(len(set(m.ops)) == len(m.ops), "model.ops", "distinct op names", m.ops)
    bounds = ranges(cfg)
    for key, value in leaves(cfg):
        if key in bounds:
            check(bounds[key].holds(value), key, str(bounds[key]), value)
        elif key in CHOICES:
            check(value in CHOICES[key], key, " | ".join(CHOICES[key]), value)
    _validate_relations(cfg)
    return cfg


def _validate_relations(cfg: Config) -> None:
    """The checks that read more than one option, or a file."""
    a, d = cfg.arch, cfg.data
    latency = a.cost[len("latency:"):] if a.cost.startswith("latency:") else ""
    check(a.cost == "flops" or (latency and Path(latency).is_file()), "arch.cost",
          "flops | latency:PATH with PATH an existing file (scripts/bench_ops.py --latency-out writes one)", a.cost)
    if d.dir and d.source not in ("auto", "dir"):
        raise ConfigError(f"--data-dir/data.dir={d.dir!r} conflicts with data.source={d.source}, which reads no "
                          f"directory: drop it, or set data.source=dir")
    if cfg.final.enabled:  # else the final training (asose_jax.final) checks it against its data
        check_final_val_size(cfg.final, final_train_images(d))
    devices = str(cfg.parallel.devices)  # a config file may give an int
    check(devices == "auto" or (devices.isdigit() and int(devices) >= 1), "parallel.devices",
          FREE_TEXT["parallel.devices"], cfg.parallel.devices)
    check(cfg.parallel.axis.isidentifier(), "parallel.axis", FREE_TEXT["parallel.axis"], cfg.parallel.axis)


def leaves(cfg: Config, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every option of ``cfg``, in field order."""
    out = []
    for f_ in fields(cfg):
        value = getattr(cfg, f_.name)
        out += leaves(value, f"{prefix}{f_.name}.") if is_dataclass(value) else [(prefix + f_.name, value)]
    return out


def describe(cfg: Config, registered: dict[str, str]) -> list[tuple[str, Any, str]]:
    """``(key, value, allowed values)`` of every option; ``registered`` gives the allowed values of the options
    that name ops, modes and growth kinds (their registries sit above this module)."""
    bounds = ranges(cfg)
    rows = []
    for key, value in leaves(cfg):
        if key in bounds:
            allowed = str(bounds[key])
        elif key in CHOICES:
            allowed = " | ".join(CHOICES[key])
        elif isinstance(value, bool):
            allowed = "true | false"
        else:
            allowed = registered.get(key) or FREE_TEXT[key]
        rows.append((key, value, allowed))
    return rows


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


def config_hash(cfg: Config) -> str:
    """sha256 of the JSON config less its ``resume`` and ``parallel`` sections (how to resume, and on which
    devices, is not what the run is: the results differ across device counts by float reduction order only)."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in ("resume", "parallel")}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def from_dict(d: dict) -> Config:
    def build(cls, data):
        kwargs = {}
        hints = typing.get_type_hints(cls)
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
