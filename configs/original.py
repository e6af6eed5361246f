"""The original ASO-SE as its PyTorch code really ran (docs: shared spec §1-§5), minus its bugs:
`original` skeleton (double stride, no residual; 937,258 weights + 40 alpha), hard Gumbel single-path
in every training phase, 6/2/4 epochs per cycle, 15 cycles, batch 128, SGD 0.025 with cosine warm
restarts (50, 2), Adam 3e-4 for alpha, gradient clipping at global norm 5, tau 5.0 x 0.98 per arch epoch,
growth every 4 cycles or on stagnation with the original strategy and a 1M-weight cap on depth.

Deliberate differences (the original's bugs): alpha is trained on a held-out arch-val split (10k of
the 50k), decisions and early stopping use arch-val accuracy (never test), the straight-through weight
is kept so dL/dalpha != 0, growth preserves the function and carries optimizer state, LR position and tau.

One deliberate difference for stability: the original's soft clip (above norm 5 the gradient is rescaled
to norm 5 + 0.1 (g - 5)) does not bound large gradients, and this network has them. A CPU probe (5,120
images, 4 cycles) logged pre-clip norms of 1-21 on average per epoch but up to 263-799 in single steps,
which the soft clip lets through at 31-84, 6-17x the intended 5. The first full run on the H100, with the
soft clip, became NaN in cycle 5 (docs/benchmarks.md section 3). So this preset clips at global norm 5;
``--set optim.clip_mode=soft`` restores the original's rule.
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
