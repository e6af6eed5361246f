"""A CPU study in about a minute on synthetic data: a tiny two-block `resnet` supernet, one short cycle, and
a two-epoch final training (`final.enabled`). Used by tests/test_study.py:

    python -m asose_jax.study --config configs/study_smoke.py --seeds 0,1 \
        --baselines random:1,uniform:conv_3x3 --workdir runs/study_smoke
"""
from dataclasses import replace

from asose_jax.config import (CheckpointConfig, Config, CycleConfig, DataConfig, FinalConfig, GrowthConfig,
                              MixedOpConfig, ModelConfig)


def get_config() -> Config:
    return replace(
        Config(),
        precision="fp32",
        model=ModelConfig(skeleton="resnet", init_channels=4, num_layers=2,
                          ops=("skip_connect", "max_pool_3x3", "conv_3x3")),
        mixed_op=MixedOpConfig(mode="dense", eval_mode="argmax"),
        data=DataConfig(source="synthetic", synthetic_train=320, synthetic_test=128, arch_val_size=64,
                        batch_size=64),
        cycle=CycleConfig(max_cycles=1, warmup_epochs=0, weight_epochs=1, arch_epochs=1, retrain_epochs=0,
                          early_stop_cycles=0, eval_every_epoch=False),
        growth=GrowthConfig(enabled=False),
        final=FinalConfig(enabled=True, epochs=2, batch_size=64, lr=0.1, warmup_epochs=0.5, val_size=64),
        checkpoint=CheckpointConfig(every_steps=0, max_to_keep=2),
    )
