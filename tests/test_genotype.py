"""Tests for asose_jax.genotype: the one validator (one-line errors naming the block), reading a file, and the
fixed-op NetSpec a genotype becomes (ops as row indices, skeleton rules, width override)."""
from __future__ import annotations

import json

import pytest

from asose_jax.config import PRIMITIVES
from asose_jax.errors import GenotypeError
from asose_jax.genotype import genotype_spec, load_genotype, validate_genotype
from asose_jax.model import build_spec
from asose_jax.ops import OP_REGISTRY
from asose_jax.utils import write_json

# stride-2 blocks (1, 3), a two-path block (1), parametric and parameter-free ops from the 10 primitives
GENOTYPE = {
    "skeleton": "resnet", "stem_channels": 8, "num_classes": 10, "op_set": list(PRIMITIVES),
    "ops": ["dil_conv_3x3", ["skip_connect", "max_pool_3x3"], "conv_7x1_1x7", "dil_conv_3x3"],
    "blocks": [{"c_in": 8, "c_out": 8, "stride": 1}, {"c_in": 8, "c_out": 16, "stride": 2},
               {"c_in": 16, "c_out": 16, "stride": 1}, {"c_in": 16, "c_out": 32, "stride": 2}],
}


def _copy() -> dict:
    return json.loads(json.dumps(GENOTYPE))


@pytest.mark.parametrize("mutate, message", [
    (lambda g: g["ops"].pop(), "3 ops for 4 blocks"),
    (lambda g: g["ops"].__setitem__(0, "conv_9x9"), "unknown op 'conv_9x9' in block 0"),
    (lambda g: g["ops"].__setitem__(1, ["skip_connect", "warp_op"]), "unknown op 'warp_op' in block 1"),
    (lambda g: g["ops"].__setitem__(1, []), "block 1 needs an op name"),
    (lambda g: g.pop("ops"), "no 'ops' list"),
    (lambda g: g.pop("blocks"), "no 'blocks' list"),
    (lambda g: g["blocks"][2].__setitem__("c_in", 12), "block 2 takes 12 channels but receives 16"),
    (lambda g: g["blocks"][0].__setitem__("stride", 3), "stride 3"),
    (lambda g: g.__setitem__("num_classes", 1), "num_classes"),
])
def test_validation_names_the_problem_in_one_line(mutate, message):
    g = _copy()
    mutate(g)
    with pytest.raises(GenotypeError, match=message) as info:
        validate_genotype(g)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


def test_an_op_registered_after_import_is_a_known_op(monkeypatch):
    monkeypatch.setitem(OP_REGISTRY, "late_op", OP_REGISTRY["conv_3x3"])
    g = _copy()
    g["ops"][0] = "late_op"
    validate_genotype(g)
    assert genotype_spec(g).ops[0] == "late_op"


def test_load_round_trip_and_file_errors(tmp_path):
    path = tmp_path / "genotype.json"
    write_json(path, GENOTYPE)
    assert load_genotype(path) == GENOTYPE
    with pytest.raises(GenotypeError, match="not found"):
        load_genotype(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(GenotypeError, match="not valid JSON"):
        load_genotype(path)
    write_json(path, {**GENOTYPE, "ops": ["conv_9x9", *GENOTYPE["ops"][1:]]})
    with pytest.raises(GenotypeError, match=f"genotype {path}: unknown op 'conv_9x9'"):
        load_genotype(path)


def test_spec_has_one_fixed_op_per_row():
    spec = genotype_spec(GENOTYPE)
    assert spec.ops == ("dil_conv_3x3", "skip_connect", "max_pool_3x3", "conv_7x1_1x7")  # in order of first use
    assert spec.fixed_ops == (0, 1, 2, 3, 0) and spec.num_rows == 5
    assert [spec.block_ops(b) for b in range(4)] == [("dil_conv_3x3",), ("skip_connect", "max_pool_3x3"),
                                                    ("conv_7x1_1x7",), ("dil_conv_3x3",)]
    assert [b.n_paths for b in spec.blocks] == [1, 2, 1, 1]


@pytest.mark.parametrize("skeleton", ["resnet", "original"])
def test_spec_blocks_follow_the_skeleton_rules_of_the_supernet(skeleton):
    """One path per block, the same channels: the blocks are those the supernet's ``build_spec`` makes."""
    supernet = build_spec(skeleton, 8, 4, PRIMITIVES, width_mult=2)
    g = {"ops": ["sep_conv_3x3"] * 4, "stem_channels": 8,
         "blocks": [{"c_in": b.c_in, "c_out": b.c_out, "stride": b.stride} for b in supernet.blocks]}
    assert genotype_spec(g, skeleton).blocks == supernet.blocks


def test_width_override_doubles_per_stage():
    spec = genotype_spec(GENOTYPE, "resnet", width=16)
    assert spec.stem_channels == 16
    assert [(b.c_in, b.c_out, b.input_conv) for b in spec.blocks] == [(16, 16, 0), (16, 32, 3), (32, 32, 0),
                                                                      (32, 64, 3)]
    assert spec.block_ops(1) == ("skip_connect", "max_pool_3x3")
