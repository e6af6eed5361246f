"""The original ASO-SE as its PyTorch code ran, minus its bugs: the `original` skeleton (double stride, no residual),
hard Gumbel single-path steps in every phase, 15 cycles of 6 weight / 2 arch / 4 retrain epochs, growth by the
original's accuracy-dependent strategy.

    python -m asose_jax.search --preset original --data-dir DIR

Note: every way it departs from the PyTorch original, and why (alpha on a held-out split, the clip at global norm
5, growth that keeps the function, no ColorJitter, ...), is listed in docs/benchmarks.md, "The original preset".
"""
from dataclasses import replace

from asose_jax.config import (ArchConfig, Config, CycleConfig, GrowthConfig, MixedOpConfig, ModelConfig,
                              OptimConfig)


def get_config() -> Config:
    cfg = Config()
    return replace(
        cfg,
        precision="fp32",
        model=ModelConfig(skeleton="original", init_channels=32, num_layers=4),
        mixed_op=MixedOpConfig(mode="single", k=3, weight_threshold=0.01, eval_mode="argmax"),
        arch=ArchConfig(lr=3e-4, weight_decay=1e-3, clip_norm=5.0, tau_init=5.0, tau_decay=0.98, tau_min=0.1),
        optim=OptimConfig(lr=0.025, momentum=0.9, weight_decay=1e-4, clip_norm=5.0, clip_mode="global_norm",
                          schedule="cosine_restarts", t0_epochs=50, t_mult=2, min_lr=1e-6),
        cycle=CycleConfig(max_cycles=15, warmup_epochs=0, weight_epochs=6, arch_epochs=2, retrain_epochs=4,
                          early_stop_cycles=5, early_stop_range=0.3, target_acc=95.0),
        growth=GrowthConfig(enabled=True, every=4, stagnation_cycles=3, stagnation_range=0.5,
                            kinds=("deepen", "widen"), strategy="original", max_depth=15, depth_param_cap=1_000_000,
                            widen_factor=1.4),
    )
