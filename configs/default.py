"""The default search: the conditional-free ASO-SE (routed weight steps, dense arch steps on the held-out arch-val
split) on the `resnet` skeleton, bf16 compute, 4 short cycles with function-preserving growth.

    python -m asose_jax.search --workdir runs/default --data-dir DIR     # or: make search

Note: every knob not set here keeps its value from ``asose_jax.config``, the original's where there is one.
"""
from dataclasses import replace

from asose_jax.config import Config, CycleConfig, GrowthConfig, MixedOpConfig, ModelConfig


def get_config() -> Config:
    cfg = Config()
    return replace(
        cfg,
        precision="bf16",
        model=ModelConfig(skeleton="resnet", init_channels=32, num_layers=6),
        mixed_op=MixedOpConfig(mode="routed", arch_mode="dense"),
        cycle=CycleConfig(max_cycles=4, warmup_epochs=2, weight_epochs=3, arch_epochs=1, retrain_epochs=2,
                          early_stop_cycles=0),
        growth=GrowthConfig(every=2, strategy="original"),
    )
