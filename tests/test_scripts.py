"""The bookkeeping of the benchmark scripts: which configurations `compare_pytorch.py --resume` still has to
run and which op choices the warm-up of `benchlib` forces, how `ablation_genotypes.py` keeps a searched genotype's
layout, how `benchlib` splits a trace, how `probe_conditionals.py` reads an optimised HLO, how `gpu_busy.py` counts a
step's conditionals, which `record_accuracy.py` records meet issue [E]'s bar, and what `compare_modes.py` records."""
import argparse
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import benchlib
import compare_modes
import compare_pytorch as cp
import gpu_busy
import probe_conditionals
import record_accuracy


def test_pins_run_a_configuration_at_one_batch_only():
    assert cp.at_batch(["allops", "single_profiled@128"], 256) == ["allops"]
    assert cp.at_batch(["allops", "single_profiled@128"], 128) == ["allops", "single_profiled"]
    assert cp.jax_jobs([128, 512], ["dense:bf16", "topk:fp32@128"]) == [
        (128, "dense:bf16"), (128, "topk:fp32"), (512, "dense:bf16")]


def test_default_matrix_covers_every_mode_precision_and_remat_at_128():
    jobs = set(cp.jax_jobs([128, 256, 512], list(cp.DEFAULT_JAX_CONFIGS)))
    for mode in ("single", "dense", "topk", "threshold", "routed"):
        for prec in ("fp32", "bf16"):
            assert (128, f"{mode}:{prec}") in jobs and (128, f"{mode}:{prec}:remat") in jobs
    assert (512, "single:bf16") in jobs and (512, "routed:bf16") in jobs and (512, "topk:bf16") not in jobs


def test_resume_skips_measured_configurations_but_not_failed_ones():
    torch_modes = ["allops", "single", "single_profiled@128", "allops_compiled@128"]
    jax_cfgs = ["single:bf16", "dense:bf16:remat@128", "single:fp32:switch@128"]
    measured = [
        {**benchlib.torch_record_head("single_profiled", 128), "weight_ms": 1.0},
        {**benchlib.torch_record_head("allops", 256), "weight_ms": 1.0},
        {**benchlib.torch_record_head("allops_compiled", 128), "error": "RuntimeError: x"},
        {**benchlib.jax_record_head(128, "dense:bf16:remat"), "weight_ms": 1.0},
        {**benchlib.jax_record_head(256, "single:bf16"), "weight_ms": 1.0},
        {**benchlib.jax_record_head(128, "single:fp32:switch"), "error": "killed"},
    ]
    torch_todo, jax_todo = cp.pending([128, 256], torch_modes, jax_cfgs, measured)
    assert torch_todo == [(128, ["allops", "single", "allops_compiled"]), (256, ["single"])]
    assert jax_todo == [(128, "single:bf16"), (128, "single:fp32:switch")]
    # nothing measured: everything runs
    torch_all, jax_all = cp.pending([128, 256], torch_modes, jax_cfgs, [])
    assert sum(len(m) for _, m in torch_all) == 6 and len(jax_all) == 4


def test_record_heads_match_the_worker_records():
    """A JAX worker builds its record from its command-line flags; the key must be the one --resume looks for."""
    rec = {"framework": "jax", "mode": "single", "precision": "fp32", "batch": 128, "remat": False,
           "dispatch": "switch", "weight_ms": 1.0}
    assert benchlib.record_key(rec) == benchlib.jax_key(128, "single:fp32:switch")
    assert benchlib.record_key({"framework": "torch", "mode": "single", "precision": "fp32", "batch": 128,
                                "remat": False, "profile_syncs": True}) == benchlib.torch_key("single_profiled", 128)


def test_warm_up_choices_run_every_op_in_every_switch_of_every_row():
    spec = SimpleNamespace(ops=tuple(f"op{i}" for i in range(10)), num_rows=4)
    for mode, k in (("single", 1), ("argmax", 1), ("topk", 3)):
        choices = [np.asarray(c) for c in benchlib.forced_choices(spec, mode, host=False)]
        assert all(c.shape == (4, k) and c.dtype == np.int32 for c in choices)
        for row in range(4):
            for slot in range(k):
                assert {int(c[row, slot]) for c in choices} == set(range(10)), (mode, row, slot)
    host = benchlib.forced_choices(spec, "single", host=True)
    assert sorted({int(i) for c in host for i in c["idx"]}) == list(range(10))
    assert all(c["idx"].shape == (4,) and c["noise"].shape == (4, 10) for c in host)
    masks = np.stack([np.asarray(m) for m in benchlib.forced_choices(spec, "threshold", host=False)])
    assert masks.shape == (10, 4, 10) and (masks.sum(-1) == 3).all()  # the top k = 3 of each row kept
    assert masks.any(0).all() and (~masks).any(0).all()  # every op of every row both kept and skipped
    assert len(benchlib.forced_choices(spec, "dense", host=False)) == 1


def test_warm_up_of_routed_runs_one_sampled_weight_step_then_dense_arch_steps():
    """A routed step runs every op of every row; its arch steps are dense (``paired_arch_mode``)."""
    assert benchlib.paired_arch_mode("routed") == "dense" and benchlib.paired_arch_mode("single") == ""
    spec = SimpleNamespace(ops=tuple(f"op{i}" for i in range(10)), num_rows=4)
    calls = []
    S = SimpleNamespace(weight_step=lambda s, x, y, p, i, c: calls.append(("weight", c)) or s,
                        arch_step=lambda s, x, y, p, i, c: calls.append(("arch", np.asarray(c).shape)) or s,
                        sample=lambda s: "permutations", arch_sample=lambda s: "not used")
    benchlib.run_every_op(spec, S, "routed", False, 0, None, None, None)
    assert calls == [("weight", "permutations"), ("arch", (4, 1))]


def test_conditional_placement_reads_the_optimised_hlo():
    hlo = """HloModule m

%branch_a (p: (f32[4])) -> f32[4] {
  %p = (f32[4]) parameter(0)
  %g = f32[4] get-tuple-element(%p), index=0
  ROOT %c = (f32[4], u8[0]) custom-call(%g), custom_call_target="__cudnn$convForward"
}

%branch_b (p: (f32[4])) -> f32[4] {
  %p = (f32[4]) parameter(0)
  ROOT %f = f32[4] fusion(%p), kind=kLoop, calls=%fused
}

%command_buffer (i: s32[], t: (f32[4])) -> f32[4] {
  %i = s32[] parameter(0)
  %t = (f32[4]) parameter(1)
  ROOT %k = f32[4] conditional(%i, %t, %t), branch_computations={%branch_b, %branch_b}
}

ENTRY %main.7 (i: s32[], t: (f32[4])) -> f32[4] {
  %i = s32[] parameter(0)
  %t = (f32[4]) parameter(1)
  %x = f32[4] conditional(%i, %t, %t), branch_computations={%branch_a, %branch_b}
  ROOT %y = f32[4] call(%i, %t), to_apply=%command_buffer
}
"""
    got = probe_conditionals.conditional_placement(hlo)
    assert got == {"conditionals": 2, "in_command_buffers": 1, "command_buffers": 1,
                   "branch_instruction_kinds": {"custom-call:__cudnn$convForward": 1}}


def test_ablation_genotypes_keep_the_layout(tmp_path):
    searched = {"blocks": [{"c_in": 8, "c_out": 8, "stride": 1}] * 3,
                "ops": ["sep_conv_7x7", "conv_3x3", "max_pool_3x3"],
                "op_set": ["none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_7x7", "conv_3x3"],
                "skeleton": "resnet", "num_classes": 10, "stem_channels": 8}
    g = tmp_path / "genotype.json"
    g.write_text(json.dumps(searched))
    subprocess.run([sys.executable, str(ROOT / "scripts/ablation_genotypes.py"), str(g), "--out", str(tmp_path / "abl"),
                    "--parametric-only", "--seed", "3"], check=True, capture_output=True)
    rand = json.loads((tmp_path / "abl/random_s3.json").read_text())
    sep3 = json.loads((tmp_path / "abl/all_sep_conv_3x3.json").read_text())
    assert rand["blocks"] == sep3["blocks"] == searched["blocks"]
    assert set(rand["ops"]) <= {"sep_conv_3x3", "sep_conv_7x7", "conv_3x3"}
    assert sep3["ops"] == ["sep_conv_3x3"] * 3


def test_trace_breakdown_splits_kernel_host_and_idle_time():
    """Two overlapping kernels, then a 300 us gap, a third kernel, a 50 us gap and a fourth; host events on
    another process. Times in the trace are us, results ms (gaps in us)."""
    gpu, host = 1, 2
    events = [{"ph": "M", "pid": gpu, "name": "process_name", "args": {"name": "/device:GPU:0"}},
              {"ph": "X", "pid": gpu, "name": "loop_add_fusion_3", "ts": 0, "dur": 100},
              {"ph": "X", "pid": gpu, "name": "loop_add_fusion_12", "ts": 50, "dur": 100},
              {"ph": "X", "pid": gpu, "name": "cutlass_gemm", "ts": 450, "dur": 200},
              {"ph": "X", "pid": gpu, "name": "memcpy32_post", "ts": 700, "dur": 10},
              {"ph": "X", "pid": host, "name": "ExecuteOnStream", "ts": 0, "dur": 400},
              {"ph": "X", "pid": host, "name": "ExecuteOnStream", "ts": 500, "dur": 100},
              {"ph": "X", "pid": host, "name": "cond.7", "ts": 120, "dur": 30},
              {"ph": "X", "pid": host, "name": "conditional", "ts": 160, "dur": 20},
              {"ph": "X", "pid": host, "name": "second_cond.2", "ts": 190, "dur": 5},
              {"ph": "i", "pid": gpu, "name": "marker", "ts": 5}]
    b = benchlib.trace_breakdown(events, {gpu}, top=2)
    assert b["kernel_total_ms"] == 0.41
    assert b["kernel_ms"] == {"loop_add_fusion": 0.2, "cutlass_gemm": 0.2}  # instance suffixes merged; top 2
    assert b["host_ms"] == {"ExecuteOnStream": 0.5, "cond.7": 0.03}
    assert b["gaps"] == {"count": 2, "total_ms": 0.35, "p50_us": 300.0, "p90_us": 300.0, "max_us": 300.0,
                         "over_100us": 1, "over_100us_ms": 0.3}
    assert b["conditionals"] == {"count": 2, "total_ms": 0.05}  # cond.N and conditional, not other names
    busy = benchlib.union_busy([(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e["pid"] == gpu])
    assert abs(busy - (150 + 200 + 10) / 710) < 1e-9


def test_meets_bar_needs_a_search_at_95_within_900_s():
    run = {"kind": "searched (run 7)", "test_acc": 95.27, "test_acc_tta": 95.51, "total_wall_s": 695.2}
    assert record_accuracy.meets_bar(run)
    assert record_accuracy.meets_bar({**run, "test_acc": 94.9, "test_acc_tta": 95.0})  # the best of the two counts
    assert not record_accuracy.meets_bar({**run, "total_wall_s": 945.6})  # too slow
    assert not record_accuracy.meets_bar({**run, "test_acc": 94.67, "test_acc_tta": 94.99})
    assert not record_accuracy.meets_bar({**run, "kind": "all_sep_conv_3x3 (run 5 blocks, v6 recipe)"})  # an ablation
    assert not record_accuracy.meets_bar({**run, "test_acc": None, "test_acc_tta": None})  # a failed run


def test_record_curve_labels_the_final_trainings_val_points_as_val(tmp_path):
    """A final training with ``final.val_size > 0`` logs val accuracy per epoch; the curve says so, and its last
    point is the test accuracy."""
    final = {"wall_s": 10.0, "test_acc": 90.0, "test_acc_tta": 91.0, "tta": "flip", "params": 5,
             "genotype": {"ops": ["sep_conv_3x3"]}, "device": "cpu"}
    (tmp_path / "final.json").write_text(json.dumps(final))
    (tmp_path / "config.json").write_text(json.dumps({"config": {"seed": 0}}))
    rows = [{"event": "final_epoch", "wall_s": 5.0, "val_acc": 80.0, "val_acc_tta": 81.0}]
    (tmp_path / "final_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = argparse.Namespace(run=None, final_dir=str(tmp_path), config="c.py", kind="searched", process_wall_s=None,
                              date="2026-12-06")
    curve = record_accuracy.build_record(args)["curve"]
    assert [p[:2] for p in curve] == [[5.0, 81.0], [10.0, 91.0]]
    assert curve[0][2].startswith("val accuracy") and curve[1][2].startswith("test accuracy")


def test_conditionals_per_step_counts_each_mixed_op_forward_and_backward(tmp_path):
    """The `lax.switch` engine runs one conditional per mixed op in the forward pass and one in the backward;
    the host-dispatched engine none (None: it runs one program per block); the routed step none."""
    from asose_jax import config as config_lib
    from asose_jax.cycle import Run
    from asose_jax.data import load_dataset

    base = config_lib.load_config_file(config_lib.preset_path("smoke"))
    counts = {}
    for name, sets in (("switch", ["mixed_op.dispatch=switch"]), ("host", ["mixed_op.dispatch=host"]),
                       ("routed", ["mixed_op.mode=routed", "mixed_op.arch_mode=dense"])):
        cfg = config_lib.validate(config_lib.apply_overrides(base, sets + ["checkpoint.enabled=false"]))
        run = Run(cfg, load_dataset(cfg.data, cfg.seed), str(tmp_path / name), progress=False)
        run.init_state()
        counts[name] = gpu_busy.conditionals_per_step(run)
    assert counts == {"switch": 2 * base.model.num_layers, "host": None, "routed": 0}


def test_compare_modes_records_each_mode_and_seed_once_and_tabulates_them(tmp_path, capsys):
    """Two tiny searches (one seed, both modes) on synthetic data; a second call runs nothing and prints the table."""
    tiny = ("cycle.max_cycles=1", "cycle.warmup_epochs=0", "growth.enabled=false", "model.num_layers=1",
            "model.ops=none,skip_connect,sep_conv_3x3", "checkpoint.enabled=false")
    args = ["--preset", "smoke", "--seeds", "0", "--runs", str(tmp_path), *[a for s in tiny for a in ("--set", s)]]
    compare_modes.main(args)
    records = compare_modes.read_records(tmp_path / "records.jsonl")
    assert [(r["mode"], r["seed"]) for r in records] == [("single", 0), ("routed", 0)]
    for r in records:
        assert 0 <= r["arch_val_acc"] <= 100 and 0 <= r["test_acc"] <= 100 and r["wall_s"] > 0
        assert f"mixed_op.mode={r['mode']}" in r["command"] and "seed=0" in r["command"]
        assert r["device"] and r["date"] and len(r["genotype"]) == 1
    routed_cfg = json.loads((tmp_path / "routed_s0" / "config.json").read_text())
    assert routed_cfg["config"]["mixed_op"]["arch_mode"] == "dense"
    capsys.readouterr()
    compare_modes.main(args)
    assert len(compare_modes.read_records(tmp_path / "records.jsonl")) == 2
    table = capsys.readouterr().out
    assert "| single | 0 |" in table and "| routed | 0 |" in table
