"""Genotypes for the [E] ablation, on the same blocks as a searched genotype.

    python scripts/ablation_genotypes.py runs/c95/genotype.json --out runs/ablation [--seed 0] [--parametric-only]

Writes ``random_s<seed>.json`` (every path's op drawn uniformly from the searched op set without `none`, or
with ``--parametric-only`` without any op the registry marks parameter-free, to match
``arch.max_parameter_free=0``; from a seeded generator) and ``all_sep_conv_3x3.json`` (every path
`sep_conv_3x3`). Blocks, widths, strides
and path counts are the searched genotype's, so the final recipe trains networks of the same layout.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from asose_jax.ops import OP_REGISTRY
from asose_jax.utils import write_json


def with_ops(genotype: dict, pick) -> dict:
    """A copy of ``genotype`` whose op of every path is ``pick()``."""
    ops = [[pick() for _ in row] if isinstance(row, list) else pick() for row in genotype["ops"]]
    return {**genotype, "ops": ops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("genotype", help="searched genotype.json")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parametric-only", action="store_true", help="draw no parameter-free op (none, pools, skip)")
    args = ap.parse_args()
    searched = json.loads(Path(args.genotype).read_text())
    choices = [op for op in searched.get("op_set", [])
               if op != "none" and not (args.parametric_only and OP_REGISTRY[op].parameter_free)]
    if not choices:
        raise SystemExit(f"error: {args.genotype} has no op_set to draw random ops from")
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, g in ((f"random_s{args.seed}", with_ops(searched, lambda: choices[rng.integers(len(choices))])),
                    ("all_sep_conv_3x3", with_ops(searched, lambda: "sep_conv_3x3"))):
        write_json(out / f"{name}.json", g)
        print(f"{out / name}.json: {g['ops']}")


if __name__ == "__main__":
    main()
