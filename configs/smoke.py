"""A tiny `resnet` network on synthetic data, 3 short cycles with growth (the kinds in turn), every output file
written: the smoke test of the tests and of ``make smoke``.

    python -m asose_jax.search --preset smoke --workdir runs/smoke

Note: it runs on a CPU in under two minutes; its accuracies mean nothing.
"""
from dataclasses import replace

from asose_jax.config import (CheckpointConfig, Config, CycleConfig, DataConfig, FinalConfig, GrowthConfig,
                              ModelConfig)


def get_config() -> Config:
    cfg = Config()
    return replace(
        cfg,
        precision="fp32",
        model=ModelConfig(skeleton="resnet", init_channels=8, num_layers=3,
                          ops=("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")),
        data=DataConfig(source="synthetic", synthetic_train=768, synthetic_test=256, arch_val_size=256,
                        batch_size=64),
        cycle=CycleConfig(max_cycles=3, warmup_epochs=1, weight_epochs=1, arch_epochs=1, retrain_epochs=1,
                          early_stop_cycles=0),
        growth=GrowthConfig(every=2, strategy="cycle", widen_factor=1.5),
        final=FinalConfig(enabled=False, epochs=2, batch_size=64, lr=0.1, warmup_epochs=0.5, val_size=128),
        checkpoint=CheckpointConfig(every_steps=0, max_to_keep=2),
    )
