"""CIFAR-10 to >= 95 % test accuracy in minutes on one H100 (issue [E]); third version (run 2 used it with
8 precompile threads, which cost more than they saved: see below).

Run 1 (docs/benchmarks.md section 5, H100, 2026-11-27) used this file with ``arch.max_parameter_free=-1``,
``arch.lr=5e-3``, single-path arch steps and no precompile: search 256 s + final 117 s, 92.52 % (flip-TTA).
Alpha did not move (entropy 2.395 of 2.398 nats), the genotype took 5 pools out of 9 ops, and the same
recipe on the same blocks with every op ``sep_conv_3x3`` reached 95.17 %. Since then:

* no parameter-free op in the genotype (``max_parameter_free=0``): each ``resnet`` block already has an
  identity path, so a pool or skip as its op adds no capacity;
* alpha LR 2e-2 (4x), and **dense arch steps** (``mixed_op.arch_mode="dense"``): the arch step computes
  every op, weighted by the soft Gumbel weights (the DARTS first-order gradient on the held-out split),
  instead of the hard single-path straight-through sample, whose alpha gradient is too noisy to separate
  the ops in a few hundred steps (a CPU probe: ``scripts/probe_alpha.py``, figures in the docs);
* the programs compile lazily, in the first epoch that needs them (``precompile_workers=0``). Run 2
  (H100, 2026-11-27) compiled the block programs and the dense arch step in 8 threads before the first
  step: 315 s, twice run 1's 157 s one by one, because XLA's GPU autotuner runs its candidate kernels on
  the one GPU, and 8 threads autotuning at once contend for it (XLA warned that its timer kernel timed out).

Run 3 (H100, 2026-11-27, this file): search 441.5 s + final 257.8 s (720 s of process time, one resume),
94.16 % with flip-TTA; a random parametric genotype on the same blocks 94.29 %, all-``sep_conv_3x3`` 95.23 %.
The search still picks the highest-capacity ops (full convolutions, 7x7 kernels): docs/benchmarks.md section 5.

Reproduce run 1 with ``--set arch.max_parameter_free=-1 --set arch.lr=0.005 --set mixed_op.arch_mode=``.

``python -m asose_jax.search --config configs/cifar10_95.py --workdir runs/c95`` runs a short ASO-SE search
on the ``resnet`` skeleton, then the final training of the derived network (``final.enabled``). The budget
is 900 s in all; run 3 spent 441 s searching (340 s of it in the three epochs that compiled) and 258 s in
the final training.

Search (what the alpha step sees is the held-out arch-val split, 10k of the 50k; never the test set):

* ``resnet`` skeleton, C0=32, 8 blocks (downsampling at blocks 2 and 5: 32/64/128 channels): residual
  blocks train fast and stay trainable whatever op a row samples; 8 blocks give the genotype enough
  depth for the final network while the supernet stays cheap.
* ops: the original's 10 primitives plus ``conv_3x3`` (ReLU-conv-BN), a strong, GPU-friendly op
  (documented addition; the 10 primitives stay available).
* weight steps in ``single`` mixed-op mode (hard Gumbel, straight-through): one op per row per step, so a
  supernet weight step costs about one network's forward/backward; arch steps ``dense`` (see above);
  bf16 compute with fp32 master weights.
* the block programs (11 ops x 5 block shapes, forward, backward, eval) and the dense arch step compile
  when first used: in run 1 the block programs took 157 s of the 256 s search, inside the first epoch.
* batch 256, SGD 0.1 Nesterov, label smoothing 0.1, one cosine decay over the 8 weight epochs of the
  search (2 warm-up + 3 cycles x (1 weight + 1 retrain)): ``t0_epochs=8, t_mult=1``.
* alpha: Adam 2e-2 (5e-3 left alpha at its initial noise in 117 single-path arch steps; the default 3e-4
  moves it even less), init 0.1 N(0, 1), soft Gumbel weights at tau 1.0 decaying 0.9 per arch epoch.
  Genotype: the best parametric op of each row (``max_parameter_free=0``).
* 3 short cycles (1 weight / 2 arch / 1 retrain epochs) after 2 warm-up epochs with alpha frozen (a
  collapse guard: ops get trained before alpha ranks them). No early stop, no per-epoch evaluation.
* growth every 2 cycles (one growth, at cycle 2) with the original's accuracy-dependent strategy over
  deepen / widen / branch; each growth recompiles the steps, so more would cost more than it brings.

Final training (``final``; the recipe of fast ResNet trainers, airbench-style):

* ``resnet`` skeleton, stem width 128 (128/256/512 channels, stages doubling; the searched widths are
  replaced): the search's C0=32 is too narrow for 95 %. Measured on the H100: 30,300 img/s, 2.9 s per
  epoch for 9 blocks; all-``sep_conv_3x3`` on the run-1 blocks reached 95.17 % (flip-TTA) in 149 s.
* 60 epochs over all 50k images (40 in runs 1 and 2), batch 512, SGD Nesterov momentum 0.9, LR 0.4 (0.1 per
  128 images) with 2 linear warm-up epochs then cosine to 0, stepped per step; L2 5e-4 on conv/linear weights.
* label smoothing 0.2, random crop (4-pixel pad) + flip + cutout 8.
* EMA of the weights, decay 0.99 (~1 epoch horizon; evaluated with the live BN statistics), flip-TTA
  reported alongside the plain test accuracy. bf16 compute, fp32 master weights.
* test accuracy every 5 epochs (``eval_every``), for the accuracy-vs-time curve only: nothing depends on it.
"""
from dataclasses import replace

from asose_jax.config import (ArchConfig, CheckpointConfig, Config, CycleConfig, DataConfig, FinalConfig,
                              GrowthConfig, MixedOpConfig, ModelConfig, OptimConfig)
from asose_jax.ops import PRIMITIVES


def get_config() -> Config:
    cfg = Config()
    return replace(
        cfg,
        seed=0,
        precision="bf16",
        model=ModelConfig(skeleton="resnet", init_channels=32, num_layers=8, ops=PRIMITIVES + ("conv_3x3",)),
        mixed_op=MixedOpConfig(mode="single", arch_mode="dense", eval_mode="argmax", precompile_workers=0),
        arch=ArchConfig(init_scale=0.1, lr=2e-2, weight_decay=1e-3, tau_init=1.0, tau_decay=0.9, tau_min=0.1,
                        hard=True, genotype_exclude_none=True, max_parameter_free=0),
        optim=OptimConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, clip_norm=5.0,
                          schedule="cosine_restarts", t0_epochs=8, t_mult=1, min_lr=1e-3, label_smoothing=0.1),
        data=DataConfig(batch_size=256, arch_val_size=10000),
        cycle=CycleConfig(max_cycles=3, warmup_epochs=2, weight_epochs=1, arch_epochs=2, retrain_epochs=1,
                          early_stop_cycles=0, eval_every_epoch=False),
        growth=GrowthConfig(enabled=True, every=2, stagnation_cycles=0, kinds=("deepen", "widen", "branch"),
                            strategy="original", max_depth=12, widen_factor=1.5),
        final=FinalConfig(enabled=True, epochs=60, lr=0.4, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          label_smoothing=0.2, warmup_epochs=2.0, ema_decay=0.99, cutout=8, batch_size=512,
                          skeleton="resnet", width=128, schedule="cosine", eval_every=5),
        checkpoint=CheckpointConfig(every_steps=0, max_to_keep=2),
    )
