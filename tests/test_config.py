"""Tests for asose_jax.config: typed ``--set`` overrides, unknown keys and wrong types, range validation
with one-line messages naming the key and the allowed range (op, mode and growth names against their
registries), presets, serialisation, and that importing it loads no jax."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from asose_jax import config as config_lib
from asose_jax.cli import check_registered_names
from asose_jax.config import PRIMITIVES, Config, apply_overrides, validate
from asose_jax.errors import ConfigError

PRESETS = sorted(p.stem for p in config_lib.CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))


def one_line_error(overrides: list[str], *fragments: str) -> str:
    """Apply + validate ``overrides`` on the defaults; expect a ConfigError mentioning every fragment."""
    with pytest.raises(ConfigError) as info:
        validate(check_registered_names(apply_overrides(Config(), overrides)))
    msg = str(info.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


# ---------------------------------------------------------------------------------------------- overrides

def test_overrides_are_typed():
    cfg = apply_overrides(Config(), ["optim.lr=0.05", "cycle.max_cycles=3", "optim.nesterov=true", "data.crop=no",
                                     "model.ops=none,skip_connect", "model.skeleton=original", "seed=7",
                                     "growth.kinds=deepen, widen"])
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.cycle.max_cycles == 3 and isinstance(cfg.cycle.max_cycles, int)
    assert cfg.optim.nesterov is True and cfg.data.crop is False
    assert cfg.model.ops == ("none", "skip_connect")
    assert cfg.model.skeleton == "original" and cfg.seed == 7
    assert cfg.growth.kinds == ("deepen", "widen")
    validate(dataclasses.replace(cfg, mixed_op=dataclasses.replace(cfg.mixed_op, k=2)))
    # untouched values keep their defaults; the input config is not mutated (frozen dataclasses)
    assert cfg.optim.momentum == Config().optim.momentum
    assert Config().optim.lr == 0.025


@pytest.mark.parametrize("raw,expect", [("1", True), ("TRUE", True), ("yes", True), ("on", True),
                                        ("0", False), ("False", False), ("no", False), ("off", False)])
def test_bool_spellings(raw, expect):
    assert apply_overrides(Config(), [f"remat={raw}"]).remat is expect


def test_later_override_wins_and_value_may_contain_equals():
    cfg = apply_overrides(Config(), ["optim.lr=0.1", "optim.lr=0.2", "data.dir=/tmp/a=b"])
    assert cfg.optim.lr == 0.2 and cfg.data.dir == "/tmp/a=b"


@pytest.mark.parametrize("item,fragment", [
    ("optim.learning_rate=0.1", "optim.learning_rate"),
    ("optimizer.lr=0.1", "optimizer.lr"),
    ("model.ops.x=1", "model.ops.x"),
    ("nonsense=1", "nonsense"),
])
def test_unknown_key_names_the_key(item, fragment):
    with pytest.raises(ConfigError, match="unknown config key") as info:
        apply_overrides(Config(), [item])
    assert fragment in str(info.value)


def test_section_and_missing_equals():
    with pytest.raises(ConfigError, match="optim is a section"):
        apply_overrides(Config(), ["optim=1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Config(), ["optim.lr"])


@pytest.mark.parametrize("item,fragments", [
    ("optim.lr=fast", ("optim.lr", "number", "fast")),
    ("cycle.max_cycles=1.5", ("cycle.max_cycles", "integer")),
    ("optim.nesterov=maybe", ("optim.nesterov", "boolean")),
    ("mixed_op.k=three", ("mixed_op.k", "integer")),
])
def test_wrong_type(item, fragments):
    one_line_error([item], *fragments)


# ---------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("item,fragments", [
    ("optim.lr=-0.1", ("optim.lr", "(0, 10]")),
    ("optim.lr=0", ("optim.lr", "(0, 10]")),
    ("arch.lr=-1e-3", ("arch.lr", "(0, 1]")),
    ("optim.lr=nan", ("optim.lr", "(0, 10]")),
    ("optim.weight_decay=-1", ("optim.weight_decay", "[0, 1]")),
    ("mixed_op.k=11", ("mixed_op.k", "1..10")),
    ("mixed_op.k=0", ("mixed_op.k", "1..10")),
    ("mixed_op.weight_threshold=1.0", ("mixed_op.weight_threshold", "[0, 1)")),
    ("mixed_op.weight_threshold=-0.01", ("mixed_op.weight_threshold", "[0, 1)")),
    ("cycle.weight_epochs=0", ("cycle.weight_epochs", "1..10000")),
    ("cycle.max_cycles=0", ("cycle.max_cycles", "1..1000")),
    ("cycle.arch_epochs=-1", ("cycle.arch_epochs", "0..10000")),
    ("final.epochs=0", ("final.epochs", "1..10000")),
    ("data.batch_size=0", ("data.batch_size", "1..50000")),
    ("mixed_op.mode=fast", ("mixed_op.mode", "dense | single | topk | threshold | argmax")),
    ("mixed_op.arch_mode=argmax", ("mixed_op.arch_mode", "dense | single | topk | threshold")),
    ("model.skeleton=vgg", ("model.skeleton", "original | resnet")),
    ("model.ops=none,conv_9x9", ("model.ops", "conv_9x9", "sep_conv_3x3")),
    ("growth.kinds=deepen,shrink", ("growth.kinds", "shrink", "deepen | widen | branch")),
    ("mixed_op.eval_mode=sometimes", ("mixed_op.eval_mode", "argmax")),
    ("model.ops=none,none", ("model.ops", "distinct")),
    ("data.source=s3", ("data.source", "synthetic")),
    ("precision=fp8", ("precision", "fp32 | bf16")),
    ("optim.momentum=1.0", ("optim.momentum", "[0, 1)")),
    ("cycle.target_acc=101", ("cycle.target_acc", "[0, 100]")),
    ("growth.deepen_skip_prob=1.5", ("growth.deepen_skip_prob=1.5", "(0, 1)")),
    ("growth.deepen_skip_prob=1", ("growth.deepen_skip_prob", "(0, 1)")),
    ("growth.deepen_skip_prob=0", ("growth.deepen_skip_prob", "(0, 1)")),
    ("growth.deepen_skip_prob=nan", ("growth.deepen_skip_prob", "(0, 1)")),
    ("final.tta=multicrop", ("final.tta", "flip | flip_translate")),
])
def test_out_of_range_names_key_and_range(item, fragments):
    msg = one_line_error([item], *fragments)
    assert "allowed" in msg


def test_k_range_follows_the_op_set():
    one_line_error(["model.ops=none,skip_connect,sep_conv_3x3", "mixed_op.k=4"], "mixed_op.k", "1..3")
    cfg = validate(apply_overrides(Config(), ["model.ops=none,skip_connect,sep_conv_3x3", "mixed_op.k=3"]))
    assert cfg.mixed_op.k == 3


def test_validate_returns_valid_config_unchanged():
    cfg = Config()
    assert validate(cfg) is cfg and check_registered_names(cfg) is cfg
    assert cfg.model.ops == PRIMITIVES


def test_importing_config_loads_no_jax():
    """config is the bottom layer: the CLI parses and checks a config before jax is imported."""
    code = ("import sys, asose_jax.config; "
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------- presets

def test_presets_present():
    assert {"default", "original", "smoke"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_validates(name):
    cfg = config_lib.load_config_file(config_lib.preset_path(name))
    assert isinstance(cfg, Config)
    assert validate(check_registered_names(cfg)) is cfg
    assert config_lib.from_dict(json.loads(json.dumps(config_lib.to_dict(cfg)))) == cfg


def test_preset_specifics():
    load = lambda n: config_lib.load_config_file(config_lib.preset_path(n))  # noqa: E731
    orig = load("original")
    assert (orig.model.skeleton, orig.model.init_channels, orig.model.num_layers) == ("original", 32, 4)
    assert orig.model.ops == PRIMITIVES and orig.mixed_op.mode == "single"
    assert (orig.cycle.weight_epochs, orig.cycle.arch_epochs, orig.cycle.retrain_epochs) == (6, 2, 4)
    assert orig.cycle.max_cycles == 15 and orig.data.batch_size == 128
    assert (orig.optim.lr, orig.optim.momentum, orig.optim.weight_decay) == (0.025, 0.9, 1e-4)
    assert (orig.optim.t0_epochs, orig.optim.t_mult, orig.optim.min_lr) == (50, 2, 1e-6)
    assert (orig.optim.clip_norm, orig.optim.clip_mode) == (5.0, "global_norm")  # the soft clip let NaN in
    assert orig.growth.deepen_skip_prob >= 0.9
    assert (orig.arch.lr, orig.arch.weight_decay, orig.arch.tau_init, orig.arch.tau_decay,
            orig.arch.tau_min) == (3e-4, 1e-3, 5.0, 0.98, 0.1)
    smoke = load("smoke")
    assert smoke.data.source == "synthetic"
    assert load("default").model.skeleton == "resnet"


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*smoke"):
        config_lib.preset_path("nope")
    with pytest.raises(ConfigError, match="not found"):
        config_lib.load_config_file(tmp_path / "missing.py")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match="failed to load"):
        config_lib.load_config_file(broken)
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        config_lib.load_config_file(empty)
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def get_config():\n    return {'lr': 1}\n")
    with pytest.raises(ConfigError, match="must return"):
        config_lib.load_config_file(wrong)


# ---------------------------------------------------------------------------------------------- serialisation

def test_roundtrip_and_hash():
    cfg = apply_overrides(Config(), ["optim.lr=0.05", "model.ops=none,skip_connect", "resume.allow_config_change=1"])
    d = json.loads(json.dumps(config_lib.to_dict(cfg)))
    assert config_lib.from_dict(d) == cfg
    h = config_lib.config_hash(cfg)
    assert h == config_lib.config_hash(config_lib.from_dict(d))
    assert h == config_lib.config_hash(dataclasses.replace(cfg, resume=Config().resume))  # resume section ignored
    assert h != config_lib.config_hash(apply_overrides(cfg, ["optim.lr=0.06"]))
