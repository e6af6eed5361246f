"""Tests for asose_jax.final: the fixed-op network (one op per path, no unused parameters), final training
on synthetic data (final.json, accuracy above chance), exact resume, foreign checkpoints, and the CLI's errors.

Every training run uses the same config (the ``smoke`` preset + EMA) and genotype, so the jitted steps
are compiled once (``make_final_steps`` is cached) and the module stays well under a minute on CPU."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from asose_jax import cli
from asose_jax import final as final_lib
from asose_jax.config import apply_overrides, load_config_file, preset_path, validate
from asose_jax.data import load_dataset
from asose_jax.errors import CheckpointError, ConfigError
from asose_jax.genotype import genotype_spec
from asose_jax.model import count_params, init_network

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["final.ema_decay=0.9", "final.lr=0.2", "final.label_smoothing=0.1"]
# stride-2 blocks (1, 3), a two-path block (1), parametric and parameter-free ops from the 10 primitives
GENOTYPE = {
    "skeleton": "resnet", "stem_channels": 8, "num_classes": 10,
    "ops": ["dil_conv_3x3", ["skip_connect", "max_pool_3x3"], "conv_7x1_1x7", "avg_pool_3x3"],
    "blocks": [{"c_in": 8, "c_out": 8, "stride": 1}, {"c_in": 8, "c_out": 16, "stride": 2},
               {"c_in": 16, "c_out": 16, "stride": 1}, {"c_in": 16, "c_out": 32, "stride": 2}],
}


@pytest.fixture(scope="module")
def cfg():
    return validate(apply_overrides(load_config_file(preset_path("smoke")), OVERRIDES))


@pytest.fixture(scope="module")
def data(cfg):
    return load_dataset(cfg.data, cfg.seed)


@pytest.fixture(scope="module")
def fresh(cfg, data, tmp_path_factory):
    """An uninterrupted final training (the smoke preset's 2 epochs)."""
    workdir = tmp_path_factory.mktemp("fresh")
    return workdir, final_lib.train_final(cfg, GENOTYPE, data, workdir, progress=False)


def _epoch_rows(workdir: Path) -> list[dict]:
    rows = [json.loads(s) for s in (workdir / "final_metrics.jsonl").read_text().splitlines() if s]
    return [{k: v for k, v in r.items() if k not in ("wall_s", "img_per_s")} for r in rows]


def _final_state(workdir: Path, ckpt_id: int):
    mngr = ocp.CheckpointManager((workdir / "final_checkpoints").resolve())
    try:
        return mngr.restore(ckpt_id, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        mngr.close()


# ---------------------------------------------------------------------------------------------- training

def test_final_training_writes_final_json_and_learns(fresh, cfg):
    workdir, result = fresh
    on_disk = json.loads((workdir / "final.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    for key in ("test_acc", "test_acc_tta", "epochs", "wall_s", "params", "device"):
        assert key in on_disk
    assert on_disk["epochs"] == cfg.final.epochs == 2
    assert on_disk["params"] == count_params(_shapes(genotype_spec(GENOTYPE))[0])
    assert on_disk["wall_s"] > 0 and on_disk["device"].startswith("cpu")
    assert on_disk["tta"] == "flip"  # the default; it names what test_acc_tta measured
    assert on_disk["test_acc"] >= 40.0, on_disk  # chance is 10 %
    assert on_disk["test_acc_tta"] >= 40.0, on_disk
    rows = _epoch_rows(workdir)
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["event"] == "final_epoch" for r in rows)
    assert rows[1]["loss"] < rows[0]["loss"]
    assert sorted(p.name for p in (workdir / "final_checkpoints").iterdir() if p.name.isdigit()) == ["0", "1"]


def test_val_size_holds_out_a_seeded_split_and_reports_its_accuracy(fresh, cfg, data):
    workdir, result = fresh
    n = len(data.train.labels) + len(data.arch_val.labels)
    assert cfg.final.val_size == 128 and result["val_size"] == 128
    assert 0.0 <= result["val_acc"] <= 100.0 and 0.0 <= result["val_acc_tta"] <= 100.0
    x, y = np.arange(n * 2).reshape(n, 2), np.arange(n)
    x_train, y_train, x_val, y_val = final_lib.hold_out(x, y, 128, seed=0)
    assert len(y_val) == 128 and len(y_train) == n - 128 and not set(y_val) & set(y_train)
    assert list(y_train) == sorted(y_train) and list(y_val) == sorted(y_val)  # both keep the data's order
    np.testing.assert_array_equal(x_val[:, 0], 2 * y_val)  # images stay with their labels
    assert list(final_lib.hold_out(x, y, 128, seed=0)[3]) == list(y_val)
    assert list(final_lib.hold_out(x, y, 128, seed=1)[3]) != list(y_val)
    everything = final_lib.hold_out(x, y, 0, seed=0)  # the reporting run trains on every image
    np.testing.assert_array_equal(everything[1], y)
    assert len(everything[3]) == 0


def test_curve_rows_read_the_held_out_split_never_the_test_set(cfg, data, tmp_path):
    curve_cfg = apply_overrides(cfg, ["final.eval_every=1"])
    final_lib.train_final(curve_cfg, GENOTYPE, data, tmp_path, progress=False)
    rows = _epoch_rows(tmp_path)
    assert "val_acc" in rows[0] and "val_acc_tta" in rows[0] and 0.0 <= rows[0]["val_acc"] <= 100.0
    assert not any("test_acc" in r for r in rows) and "val_acc" not in rows[-1]  # the last epoch: final.json


def test_val_size_must_leave_a_batch_to_train_on(cfg, data, tmp_path):
    n = len(data.train.labels) + len(data.arch_val.labels)
    with pytest.raises(ConfigError, match="final.val_size") as info:
        final_lib.train_final(apply_overrides(cfg, [f"final.val_size={n - 1}"]), GENOTYPE, data, tmp_path,
                              progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "final_checkpoints").exists()


def test_resume_equals_uninterrupted(fresh, cfg, data, tmp_path, monkeypatch, caplog):
    """Epoch 1, interrupted by the test hook after its checkpoint; a second call resumes and must end
    exactly where the uninterrupted run ended (same weights, metrics and test accuracy)."""
    fresh_dir, fresh_result = fresh
    monkeypatch.setenv(final_lib.STOP_AFTER_EPOCH_ENV, "1")
    with pytest.raises(KeyboardInterrupt):
        final_lib.train_final(cfg, GENOTYPE, data, tmp_path, progress=False)
    assert not (tmp_path / "final.json").exists()
    assert [r["epoch"] for r in _epoch_rows(tmp_path)] == [1]
    monkeypatch.delenv(final_lib.STOP_AFTER_EPOCH_ENV)
    with caplog.at_level(logging.INFO, logger="asose_jax"):
        result = final_lib.train_final(cfg, GENOTYPE, data, tmp_path, progress=False)
    assert any("resumed" in r.getMessage() and "epoch 1/2" in r.getMessage() for r in caplog.records)
    assert _epoch_rows(tmp_path) == _epoch_rows(fresh_dir)
    assert (result["test_acc"], result["test_acc_tta"]) == (fresh_result["test_acc"], fresh_result["test_acc_tta"])
    a, b = _final_state(fresh_dir, 1), _final_state(tmp_path, 1)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoints_of_another_recipe_are_refused_and_left_in_place(fresh, cfg, data, tmp_path):
    """A re-run with another recipe in the same workdir stops with one line (CLI: exit 2) before training,
    and moves nothing aside: the checkpoints are not corrupt, they belong to another run."""
    workdir = tmp_path / "w"
    shutil.copytree(fresh[0] / "final_checkpoints", workdir / "final_checkpoints")
    before = sorted(p.name for p in (workdir / "final_checkpoints").iterdir())
    with pytest.raises(CheckpointError, match="another network or recipe") as info:
        final_lib.train_final(apply_overrides(cfg, ["final.lr=0.3"]), GENOTYPE, data, workdir, progress=False)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in (workdir / "final_checkpoints").iterdir()) == before
    assert not (workdir / "final_checkpoints.corrupt").exists()


def test_cli_trains_and_writes_summary(fresh, tmp_path, monkeypatch, capsys):
    """``python -m asose_jax.final --genotype G --preset smoke --workdir W`` (in-process: compiled steps reused)."""
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: None)
    gpath = tmp_path / "genotype.json"
    gpath.write_text(json.dumps(GENOTYPE))
    workdir = tmp_path / "final"
    argv = ["--genotype", str(gpath), "--preset", "smoke", "--workdir", str(workdir), "--no-progress", "-q"]
    for o in OVERRIDES:
        argv += ["--set", o]
    assert final_lib.main(argv) == 0
    result = json.loads((workdir / "final.json").read_text())
    assert result["test_acc"] == fresh[1]["test_acc"]
    summary = (workdir / "final_summary.md").read_text()
    assert "flip-TTA" in summary and "skip_connect + max_pool_3x3" in summary
    assert (workdir / "config.json").exists()


def test_tta_logits_flip_and_translate():
    """flip: logits of x plus its mirror image; flip_translate: that pair, plus the pairs of the one-pixel
    up-left and down-right shifts (reflect padding) at half weight. Checked against numpy with a linear model."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    w = rng.normal(size=(4 * 5 * 3, 7)).astype(np.float32)

    def apply(v):
        return v.reshape(v.shape[0], -1) @ w

    def pair(v):
        return apply(v) + apply(v[:, :, ::-1])

    logits, flip = final_lib.tta_logits(apply, jax.numpy.asarray(x), "flip")
    np.testing.assert_allclose(logits, apply(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flip, pair(x), rtol=1e-5, atol=1e-5)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    up_left, down_right = padded[:, :4, :5], padded[:, 2:, 2:]
    assert np.array_equal(up_left[:, 1:, 1:], x[:, :3, :4])  # content moved down-right by one pixel
    plain, both = final_lib.tta_logits(apply, jax.numpy.asarray(x), "flip_translate")
    np.testing.assert_allclose(plain, apply(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both, pair(x) + 0.5 * (pair(up_left) + pair(down_right)), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="final.tta"):
        final_lib.tta_logits(apply, jax.numpy.asarray(x), "multicrop")


def test_eval_with_translate_tta_keeps_plain_accuracy(cfg):
    """The jitted evaluation of a real fixed-op network under ``final.tta=flip_translate``: the plain count is
    the flip mode's, the augmented one a valid count."""
    spec = genotype_spec(TINY_TTA)
    x = jax.numpy.asarray(np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    y = jax.numpy.asarray(np.arange(16) % 10)
    mask = jax.numpy.ones((16,), bool)
    counts = {}
    for mode in ("flip", "flip_translate"):
        c = apply_overrides(cfg, [f"final.tta={mode}"])
        steps = final_lib.make_final_steps(spec, c, 4)
        state = steps.init()
        counts[mode] = [int(v) for v in steps.eval_batch(state.params, state.batch_stats, x, y, mask)]
    assert counts["flip"][0] == counts["flip_translate"][0]
    assert all(0 <= v <= 16 for v in counts["flip_translate"])


TINY_TTA = {"stem_channels": 4, "num_classes": 10, "ops": ["sep_conv_3x3"], "blocks": [{"c_in": 4, "c_out": 4, "stride": 1}]}


# ---------------------------------------------------------------------------------------------- the fixed-op network

TINY = {"stem_channels": 4, "num_classes": 10, "ops": ["sep_conv_3x3", ["skip_connect", "dil_conv_3x3"]],
        "blocks": [{"c_in": 4, "c_out": 4, "stride": 1}, {"c_in": 4, "c_out": 8, "stride": 2}]}


def _shapes(spec):
    return jax.eval_shape(lambda: init_network(0, spec))


def test_param_count_matches_hand_count_resnet():
    params, stats = _shapes(genotype_spec(TINY, "resnet"))
    stem = 3 * 3 * 3 * 4 + 4 + 4  # conv + BN scale/bias
    sep3 = lambda c: 2 * (9 * c + c * c)  # noqa: E731  two (depthwise 3x3 + pointwise) pairs
    dil3 = lambda c: 9 * c + c * c  # noqa: E731
    block0 = sep3(4) + 1  # + path_scale
    block1 = (3 * 3 * 4 * 8 + 8 + 8) + 0 + dil3(8) + 2  # 3x3 input conv, skip (identity) + dil conv, 2 scales
    head = 8 * 10 + 10
    assert count_params(params) == stem + block0 + block1 + head == 753
    # exactly the chosen op of each path, nothing else
    assert [{op: sorted(p) for op, p in path.items()} for path in params["blocks"][1]["paths"]] == [
        {"skip_connect": []}, {"dil_conv_3x3": ["dw", "pw"]}]
    assert sorted(params["blocks"][0]["paths"][0]["sep_conv_3x3"]) == ["dw1", "dw2", "pw1", "pw2"]
    assert len(params["blocks"][0]["paths"]) == 1 and len(stats["blocks"][1]["paths"]) == 2


def test_param_count_matches_hand_count_original():
    params, _ = _shapes(genotype_spec(TINY, "original"))
    stem, head = 3 * 3 * 3 * 4 + 8, 8 * 10 + 10
    block0 = 2 * (9 * 4 + 16)  # no residual, one path: no path_scale
    block1 = (4 * 8 + 16) + (8 * 4 + 8 * 4) + (9 * 8 + 64) + 2  # 1x1 input conv, FactorizedReduce, dil conv
    assert count_params(params) == stem + block0 + block1 + head == 560


@pytest.mark.parametrize("skeleton", ["resnet", "original"])
def test_forward_shapes(skeleton):
    spec = genotype_spec(GENOTYPE, skeleton)
    params, stats = _shapes(spec)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32)
    logits, new_stats = jax.eval_shape(lambda p, s, a: final_lib.apply_final(spec, p, s, a, True), params, stats, x)
    assert logits.shape == (2, 10)
    assert jax.tree.structure(new_stats) == jax.tree.structure(stats)


def test_path_scale_init_sets_every_residual_scale():
    params, _ = init_network(0, genotype_spec(TINY_TTA), path_scale_init=0.25)
    np.testing.assert_array_equal(np.asarray(params["blocks"][0]["path_scale"]), [0.25])


def test_weight_decay_mask_skips_bn_and_scales():
    params, _ = _shapes(genotype_spec(TINY))
    mask = final_lib.decay_mask(params)
    assert mask["stem"] == {"w": True, "scale": False, "bias": False}
    assert mask["head"] == {"w": True, "b": False}
    assert mask["blocks"][1]["path_scale"] is False


def test_lr_schedule_warmup_then_decay_to_zero(cfg):
    lr = final_lib.lr_schedule(cfg, 10)  # smoke: 2 epochs, warm-up 0.5 epoch, peak 0.2
    values = [float(lr(t)) for t in range(20)]
    assert values[0] == pytest.approx(0.2 / 5) and values[4] == pytest.approx(0.2)
    assert values[5] == pytest.approx(0.2) and all(a >= b for a, b in zip(values[5:], values[6:]))
    assert float(lr(20)) == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------------------------------------- CLI errors

def test_cli_unknown_op_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    g = json.loads(json.dumps(GENOTYPE))
    g["ops"][2] = "conv_9x9"
    bad.write_text(json.dumps(g))
    proc = subprocess.run([sys.executable, "-m", "asose_jax.final", "--genotype", str(bad), "--preset", "smoke",
                           "--workdir", str(tmp_path / "w")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "conv_9x9" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_ops_blocks_mismatch_exits_2(tmp_path, capsys):
    bad = tmp_path / "g.json"
    g = json.loads(json.dumps(GENOTYPE))
    g["blocks"].pop()
    bad.write_text(json.dumps(g))
    assert final_lib.main(["--genotype", str(bad), "--preset", "smoke", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4 ops for 3 blocks" in err[0]
    assert final_lib.main(["--genotype", str(tmp_path / "missing.json"), "--preset", "smoke"]) == 2
    assert "not found" in capsys.readouterr().err
