"""Default search: ASO-SE (single-path hard Gumbel, bilevel alpha on the held-out split) on the
`resnet` skeleton, real CIFAR-10, bf16 compute, a few short cycles with function-preserving growth."""
from dataclasses import replace

from asose_jax.config import Config, CycleConfig, GrowthConfig, ModelConfig


def get_config() -> Config:
    cfg = Config()
    return replace(
        cfg,
        precision="bf16",
        model=ModelConfig(skeleton="resnet", init_channels=32, num_layers=6),
        cycle=CycleConfig(max_cycles=4, warmup_epochs=2, weight_epochs=3, arch_epochs=1, retrain_epochs=2,
                          early_stop_cycles=0),
        growth=GrowthConfig(every=2, strategy="original"),
    )
