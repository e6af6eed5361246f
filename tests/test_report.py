"""Tests for the report's alpha plots: rows tracked by block and path across growth, readable heatmaps."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from asose_jax.report import (paths_per_block, plot_alpha_heatmaps, plot_alpha_over_time, row_history,
                              write_report)

OPS = ["none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3"]
# Three blocks; cycle 1 deepens at position 2 (a new block 2, the old block 2 becomes 3), cycle 2 widens,
# cycle 3 branches block 0 (its second path comes right after its first row).
GROWTHS = [{"event": "growth", "cycle": c, "kind": kind, "position": pos, "step": 20 * c, "params_before": 100 * c,
            "params_after": 100 * c + 50, "max_abs_logit_diff": 0.0}
           for c, kind, pos in ((1, "deepen", 2), (2, "widen", 1), (3, "branch", 0))]
FINAL_PATHS = [2, 1, 1, 1]


def _probs(rows, rng):
    """Each row's softmax values carry its (block, path): 0.2 + block / 100 + path / 1000 + op / 10000."""
    noise = rng.uniform(0, 1e-5, (len(rows), len(OPS)))
    return [[0.2 + b / 100 + p / 1000 + j / 10000 + noise[i, j] for j in range(len(OPS))]
            for i, (b, p) in enumerate(rows)]


def _alpha_history(seed=0):
    """Snapshots as the search takes them: arch epochs and phase ends, the structure growing after each arch."""
    rng = np.random.default_rng(seed)
    before = [(0, 0), (1, 0), (3, 0)]
    deepened = [(0, 0), (1, 0), (2, 0), (3, 0)]
    branched = [(0, 0), (0, 1), (1, 0), (2, 0), (3, 0)]
    plan = [(1, "weight", before), (1, "arch", before), (1, "retrain", deepened),
            (2, "weight", deepened), (2, "arch", deepened), (2, "retrain", deepened),
            (3, "weight", deepened), (3, "arch", deepened), (3, "retrain", branched)]
    return [{"cycle": c, "phase": ph, "probs": _probs(rows, rng)} for c, ph, rows in plan]


def test_row_history_undoes_deepen_and_branch_from_the_final_structure():
    history = row_history(FINAL_PATHS, GROWTHS)
    assert history.rows(3) == [(0, 0), (1, 0), (3, 0)]
    assert history.rows(4) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert history.rows(5) == [(0, 0), (0, 1), (1, 0), (2, 0), (3, 0)]
    assert history.born == {(2, 0): "deepen, cycle 1", (0, 1): "branch, cycle 3"}
    with pytest.raises(ValueError, match="6 rows"):
        history.rows(6)
    with pytest.raises(ValueError, match="branch at 1 in cycle 3 does not fit"):
        row_history(FINAL_PATHS, [{**GROWTHS[2], "position": 1}])  # block 1 has one path: it was never branched


def test_paths_per_block_reads_multi_path_entries():
    assert paths_per_block({"ops": [["skip_connect", "dil_conv_3x3"], "sep_conv_3x3", "none"]}) == [2, 1, 1]


def test_a_row_keeps_its_block_across_a_deepen(tmp_path):
    alpha_history = _alpha_history()
    fig = plot_alpha_over_time(alpha_history, OPS, row_history(FINAL_PATHS, GROWTHS), FINAL_PATHS,
                               tmp_path / "alpha_over_time.png")
    assert (tmp_path / "alpha_over_time.png").stat().st_size > 0
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert sorted(panels) == ["block 0 path 0", "block 0 path 1 (new: branch, cycle 3)", "block 1",
                              "block 2 (new: deepen, cycle 1)", "block 3"]
    for title, (block, path, first_x) in {"block 3": (3, 0, 0), "block 2 (new: deepen, cycle 1)": (2, 0, 2),
                                          "block 0 path 1 (new: branch, cycle 3)": (0, 1, 8)}.items():
        lines = panels[title].get_lines()
        assert [ln.get_label() for ln in lines] == OPS
        for j, line in enumerate(lines):
            assert list(line.get_xdata()) == list(range(first_x, len(alpha_history)))
            np.testing.assert_allclose(line.get_ydata(), 0.2 + block / 100 + path / 1000 + j / 10000, atol=2e-5)


def test_heatmap_colours_span_the_data_range_and_rows_are_labelled_by_block(tmp_path):
    alpha_history = _alpha_history()
    fig = plot_alpha_heatmaps(alpha_history, OPS, row_history(FINAL_PATHS, GROWTHS), FINAL_PATHS,
                              tmp_path / "alpha_heatmaps.png")
    arch = [np.asarray(h["probs"]) for h in alpha_history if h["phase"] == "arch"]
    lo, hi = min(a.min() for a in arch), max(a.max() for a in arch)
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in heatmaps] == ["cycle 1", "cycle 2", "cycle 3"]
    for ax in heatmaps:
        np.testing.assert_allclose(ax.images[0].get_clim(), (lo, hi))
    assert hi - lo < 0.1  # the values are close together, so a 0..1 scale would show one colour
    colorbar = next(ax for ax in fig.axes if not ax.images and ax.get_ylabel())
    assert "data" in colorbar.get_ylabel()
    expected = {"cycle 1": ["0 p0", "1", "3"], "cycle 2": ["0 p0", "1", "2", "3"], "cycle 3": ["0 p0", "1", "2", "3"]}
    for ax in heatmaps:
        assert list(ax.get_yticks()) == list(range(len(expected[ax.get_title()])))
        assert [t.get_text() for t in ax.get_yticklabels()] == expected[ax.get_title()]


def test_heatmap_row_labels_do_not_overlap_the_panel_to_their_left(tmp_path):
    fig = plot_alpha_heatmaps(_alpha_history(), OPS, row_history(FINAL_PATHS, GROWTHS), FINAL_PATHS,
                              tmp_path / "alpha_heatmaps.png")
    canvas = FigureCanvasAgg(fig)  # the saved figure is closed; draw it again as it was saved
    canvas.draw()
    renderer = canvas.get_renderer()
    heatmaps = [ax for ax in fig.axes if ax.images]
    for left, right in zip(heatmaps, heatmaps[1:]):
        assert left.get_tightbbox(renderer).x1 <= right.get_tightbbox(renderer).x0


def test_write_report_draws_every_plot_and_the_summary(tmp_path):
    metrics = [{"event": "epoch", "cycle": 1, "phase": "weight", "step": 10, "loss": 2.0, "acc": 20.0,
                "val_acc": 25.0, "wall_s": 1.0}, *GROWTHS]
    genotype = {"skeleton": "resnet", "ops": [["skip_connect", "dil_conv_3x3"], "none", "sep_conv_3x3", "none"],
                "op_set": OPS, "blocks": [{"c_in": 8, "c_out": 8, "stride": 1}] * 4, "stem_channels": 8,
                "num_classes": 10}
    result = {"arch_val_acc": 25.0, "test_acc": 24.0, "params": 1000, "layers": 4, "steps": 60}
    write_report(tmp_path, metrics, _alpha_history(), genotype, result)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "alpha_heatmaps.png", "alpha_over_time.png", "architecture.png", "curves.png"]
    assert "## Growth timeline" in (tmp_path / "summary.md").read_text()
