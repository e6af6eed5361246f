"""A genotype: the searched network as JSON, with one op per alpha row, and the fixed-op network built from it.

The search writes it (``genotype.json``, :func:`asose_jax.utils.write_json`)::

    {"skeleton": ..., "stem_channels": C0, "num_classes": 10, "op_set": [...],
     "ops": [op name, or a list of names for a block with several paths, per block],
     "blocks": [{"c_in": ..., "c_out": ..., "stride": 1 | 2}, ...]}

:func:`validate_genotype` is the one check of that format; :func:`genotype_spec` turns it into a
:class:`~asose_jax.model.NetSpec` with ``fixed_ops``, which ``model.init_network`` / ``apply_network`` run.
"""
from __future__ import annotations

import json
from pathlib import Path

from asose_jax.errors import GenotypeError
from asose_jax.model import NetSpec, skeleton_block
from asose_jax.ops import OP_REGISTRY


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _rows(row) -> list:
    """The op names of one block: a name, or a list of names (one per path)."""
    return row if isinstance(row, list) else [row]


def load_genotype(path: str | Path) -> dict:
    """Read a genotype JSON and check it (:func:`validate_genotype`); GenotypeError (one line) otherwise."""
    p = Path(path)
    if not p.is_file():
        raise GenotypeError(f"genotype file not found: {path}")
    try:
        g = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenotypeError(f"genotype file {path} is not valid JSON ({e})") from None
    validate_genotype(g, where=f"genotype {path}")
    return g


def validate_genotype(genotype, where: str = "genotype") -> None:
    """Raise :class:`GenotypeError` (one line) unless ``genotype`` names registered ops (``OP_REGISTRY``) and
    describes a chain of blocks whose channels connect."""
    if not isinstance(genotype, dict):
        raise GenotypeError(f"{where}: expected a JSON object")
    ops, blocks = genotype.get("ops"), genotype.get("blocks")
    if not isinstance(ops, list) or not ops:
        raise GenotypeError(f"{where} has no 'ops' list")
    for i, row in enumerate(ops):
        names = _rows(row)
        if not names or not all(isinstance(n, str) for n in names):
            raise GenotypeError(f"{where}: block {i} needs an op name or a non-empty list of op names, got {row!r}")
        for name in names:
            if name not in OP_REGISTRY:
                raise GenotypeError(f"{where}: unknown op {name!r} in block {i} (known: {', '.join(OP_REGISTRY)})")
    if not isinstance(blocks, list):
        raise GenotypeError(f"{where} has no 'blocks' list")
    if len(ops) != len(blocks):
        raise GenotypeError(f"{where} has {len(ops)} ops for {len(blocks)} blocks; they must match")
    _check_channels(genotype, blocks, where)
    nc = genotype.get("num_classes", 10)
    if not _is_int(nc) or nc < 2:
        raise GenotypeError(f"{where}: num_classes must be an integer >= 2, got {nc!r}")


def _check_channels(genotype: dict, blocks: list, where: str) -> None:
    """Every block has integer channels and stride 1 or 2, and takes the channels the previous one gives."""
    stem = genotype.get("stem_channels", blocks[0].get("c_in") if blocks and isinstance(blocks[0], dict) else None)
    if not _is_int(stem) or stem < 1:
        raise GenotypeError(f"{where}: stem_channels must be a positive integer, got {stem!r}")
    c = stem
    for i, b in enumerate(blocks):
        if not isinstance(b, dict) or not all(_is_int(b.get(k)) for k in ("c_in", "c_out", "stride")):
            raise GenotypeError(f"{where}: block {i} needs integer c_in, c_out and stride, got {b!r}")
        if b["stride"] not in (1, 2) or b["c_out"] < 1:
            raise GenotypeError(f"{where}: block {i} has stride {b['stride']} and c_out {b['c_out']} "
                                f"(allowed: stride 1 or 2, c_out >= 1)")
        if b["c_in"] != c:
            raise GenotypeError(f"{where}: block {i} takes {b['c_in']} channels but receives {c}")
        c = b["c_out"]


def genotype_spec(genotype: dict, skeleton: str = "resnet", width: int = 0) -> NetSpec:
    """The fixed-op network of ``genotype`` on ``skeleton``: one path per op of each block, the ops as
    ``fixed_ops`` (indices into the distinct op names, in order of first use). ``width > 0`` replaces the
    searched widths: the stem gets ``width`` channels and each stride-2 block doubles them."""
    validate_genotype(genotype)
    rows = [_rows(row) for row in genotype["ops"]]
    names = tuple(dict.fromkeys(name for row in rows for name in row))
    stem = width if width > 0 else genotype.get("stem_channels", genotype["blocks"][0]["c_in"])
    blocks, c = [], stem
    for row, b in zip(rows, genotype["blocks"]):
        c_out = (c * 2 if b["stride"] == 2 else c) if width > 0 else b["c_out"]
        blocks.append(skeleton_block(skeleton, c, c_out, b["stride"], n_paths=len(row)))
        c = c_out
    fixed = tuple(names.index(name) for row in rows for name in row)
    return NetSpec(skeleton, stem, tuple(blocks), names, genotype.get("num_classes", 10), fixed_ops=fixed)
