"""A faithful PyTorch reimplementation of the ORIGINAL ASO-SE network (WenyinWei/neuroexapt,
``OptimizedASOSENetwork`` + ``FastMixedOp`` at ``a11ee53^``), for side-by-side speed and correctness runs.

It follows ``/work/shared/reference/original_asose_spec.md`` sections 1, 2a, 2b, 3 and 10: the network (stem,
blocks with the original's double downsampling, no residual; C0=32, L=4: 937,258 weights + 40 alpha), the 10
PRIMITIVES (BN ``affine=False``, bias-free convs, PyTorch's default init), alpha ``0.1 * randn``, the hard Gumbel
straight-through sample (spec 4; tau from 5.0, ``anneal_tau``) and the training steps: SGD on the weights with
alpha frozen, Adam (L2, not AdamW) on alpha with the weights frozen (BN running stats still update), the
original's soft gradient clip, and ``zero_grad(set_to_none=True)`` as in torch >= 2.0, so the ops that were not
run in a step get no momentum / weight-decay update. Each op's sub-modules carry the keys of our JAX pytrees
(``asose_jax.ops``), which :func:`load_from_jax` relies on.

``TorchASOSE.mode``: ``"allops"`` blends every op with ``softmax(alpha / tau)`` (tau = 1 unless passed to
``forward``), the all-ops reference; ``"single"`` (what the original trains with, in every phase) runs one hard
Gumbel straight-through sample per layer per step, shared by the batch (a Python-side index: one host sync per
forward, as the original), and the argmax op in eval mode; ``"argmax"`` runs the argmax op, coefficient 1.

Deliberate deviations from the original, all documented in the spec:

1. The stale-output cache of ``FastMixedOp._forward_training`` is LEFT OUT. With it the original reused
   the first batch's output of the expensive ops and crashed with "Trying to backward through the graph
   a second time" after 1-4 steps (spec 3, bug 1), so no working baseline can include it.
2. In ``"single"`` mode the selected op's output is multiplied by the straight-through weight ``w``
   (exactly 1 forward) instead of the original's renormalised ``w / (w + 1e-8)``; in fp32 the latter makes
   dL/dalpha exactly 0 (spec 3.4, bug 2: the original's search never moved alpha except through weight
   decay). Set ``model.renormalize = True`` to get the original's (zero) alpha gradient back.
3. The ``profile_op`` CUDA instrumentation (2 syncs + 1 ``memory_allocated`` per block forward and per
   network forward) is off by default; ``model.profile_syncs = True`` switches it on (CUDA only) so a
   benchmark can report timings with and without it (spec 10.6). The original's extra op-selection syncs
   (``nonzero`` / ``len`` / ``item``) are not reproduced.
4. Growth, the trainer loop, data loading and schedules are not part of this module.

torch is an optional dependency (the ``torch`` extra); nothing else in ``asose_jax`` imports this module.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from asose_jax.config import PRIMITIVES  # the original's 10 ops, in its order (config imports no jax)

MODES = ("allops", "single", "argmax")
BN_MOMENTUM = 0.1
BN_EPS = 1e-5
GUMBEL_EPS = 1e-8
TAU_INIT, TAU_MIN, TAU_DECAY = 5.0, 0.1, 0.98

__all__ = [
    "PRIMITIVES", "MODES", "OPS", "TorchASOSE", "make_optimizers", "soft_clip_", "weight_step", "arch_step",
    "load_from_jax", "load_op_from_jax", "count_params",
]


def _bn(c: int, affine: bool = False) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM, affine=affine)


# ---------------------------------------------------------------------------------------------- primitives

class Zero(nn.Module):
    """``none``: zeros (subsampled ``[::s, ::s]`` at stride s), no parameters."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, ::self.stride, ::self.stride].mul(0.0)


class PoolBN(nn.Module):
    """3x3 avg pool (``count_include_pad=False``) or max pool, stride s, pad 1, then BN(affine=False)."""

    def __init__(self, kind: str, c: int, stride: int):
        super().__init__()
        if kind == "avg":
            self.pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
        else:
            self.pool = nn.MaxPool2d(3, stride=stride, padding=1)
        self.bn = _bn(c)

    def forward(self, x):
        return self.bn(self.pool(x))


class FactorizedReduce(nn.Module):
    """``skip_connect`` at stride 2: ReLU, 1x1 stride-2 convs to C//2 and C - C//2 channels (the second on
    ``x[:, :, 1:, 1:]``), concatenated, BN(affine=False)."""

    def __init__(self, c: int, stride: int = 2):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(c, c // 2, 1, stride=stride, padding=0, bias=False)
        self.conv2 = nn.Conv2d(c, c - c // 2, 1, stride=stride, padding=0, bias=False)
        self.bn = _bn(c)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(torch.cat([self.conv1(x), self.conv2(x[:, :, 1:, 1:])], dim=1))


class SepConv(nn.Module):
    """DARTS SepConv: [ReLU, dw k x k (stride s), pw 1x1, BN] then [ReLU, dw k x k (stride 1), pw 1x1, BN]."""

    def __init__(self, c: int, k: int, stride: int):
        super().__init__()
        pad = k // 2
        self.relu1 = nn.ReLU(inplace=False)
        self.dw1 = nn.Conv2d(c, c, k, stride=stride, padding=pad, groups=c, bias=False)
        self.pw1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = _bn(c)
        self.relu2 = nn.ReLU(inplace=False)
        self.dw2 = nn.Conv2d(c, c, k, stride=1, padding=pad, groups=c, bias=False)
        self.pw2 = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = _bn(c)

    def forward(self, x):
        x = self.bn1(self.pw1(self.dw1(self.relu1(x))))
        return self.bn2(self.pw2(self.dw2(self.relu2(x))))


class DilConv(nn.Module):
    """ReLU, dw k x k with dilation 2 (pad 2 * (k // 2), stride s), pw 1x1, BN."""

    def __init__(self, c: int, k: int, stride: int, dilation: int = 2):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.dw = nn.Conv2d(c, c, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, groups=c,
                            bias=False)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn = _bn(c)

    def forward(self, x):
        return self.bn(self.pw(self.dw(self.relu(x))))


class Conv7x1_1x7(nn.Module):
    """ReLU, full conv (1, 7) stride (1, s) pad (0, 3), full conv (7, 1) stride (s, 1) pad (3, 0), BN."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv1x7 = nn.Conv2d(c, c, (1, 7), stride=(1, stride), padding=(0, 3), bias=False)
        self.conv7x1 = nn.Conv2d(c, c, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False)
        self.bn = _bn(c)

    def forward(self, x):
        return self.bn(self.conv7x1(self.conv1x7(self.relu(x))))


OPS = {
    "none": lambda c, s: Zero(s),
    "avg_pool_3x3": lambda c, s: PoolBN("avg", c, s),
    "max_pool_3x3": lambda c, s: PoolBN("max", c, s),
    "skip_connect": lambda c, s: nn.Identity() if s == 1 else FactorizedReduce(c, s),
    "sep_conv_3x3": lambda c, s: SepConv(c, 3, s),
    "sep_conv_5x5": lambda c, s: SepConv(c, 5, s),
    "sep_conv_7x7": lambda c, s: SepConv(c, 7, s),
    "dil_conv_3x3": lambda c, s: DilConv(c, 3, s),
    "dil_conv_5x5": lambda c, s: DilConv(c, 5, s),
    "conv_7x1_1x7": lambda c, s: Conv7x1_1x7(c, s),
}


# ---------------------------------------------------------------------------------------------- network

class Block(nn.Module):
    """``OptimizedEvolvableBlock``: optional input conv (1x1 stride s, BN affine, ReLU), then the mixed op at
    stride s; the output is the mixed-op output (no residual)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        if c_in != c_out or stride != 1:
            self.input_conv = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            _bn(c_out, affine=True), nn.ReLU(inplace=False))
        else:
            self.input_conv = nn.Identity()
        self.ops = nn.ModuleDict({name: OPS[name](c_out, stride) for name in PRIMITIVES})
        self._op_list = list(self.ops.values())  # positional access without dict lookups

    def forward_allops(self, x, w):
        h = self.input_conv(x)
        y = None
        for i, op in enumerate(self._op_list):
            t = w[i] * op(h)
            y = t if y is None else y + t
        return y

    def forward_one(self, x, idx: int, coeff=None):
        y = self._op_list[idx](self.input_conv(x))
        return y if coeff is None else y * coeff


class TorchASOSE(nn.Module):
    """The original ASO-SE supernet (``OptimizedASOSENetwork``), NCHW. See the module docstring."""

    def __init__(self, C: int = 32, layers: int = 4, num_classes: int = 10, mode: str = "allops"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        self.mode = mode
        self.tau = TAU_INIT
        self.renormalize = False  # True: the original's w / (w + 1e-8) (zero alpha gradient)
        self.profile_syncs = False  # True: the original's profile_op CUDA syncs
        self.profile_stats = {"calls": 0, "seconds": 0.0, "mem": 0}
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), _bn(C, affine=True),
                                  nn.ReLU(inplace=False))
        down = {layers // 3, (2 * layers) // 3}
        blocks, c = [], C
        for i in range(layers):
            stride = 2 if i in down else 1
            c_out = 2 * c if stride == 2 else c
            blocks.append(Block(c, c_out, stride))
            c = c_out
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(c, num_classes)
        self.alpha = nn.Parameter(0.1 * torch.randn(layers, len(PRIMITIVES)))

    # -- parameters
    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p is not self.alpha]

    # -- architecture sampling
    def sample(self, tau: float | None = None) -> torch.Tensor:
        """Hard Gumbel-softmax straight-through weights ``[L, K]``: one-hot forward, soft gradient."""
        tau = self.tau if tau is None else tau
        u = torch.rand_like(self.alpha)
        g = -torch.log(-torch.log(u + GUMBEL_EPS) + GUMBEL_EPS)
        soft = F.softmax((self.alpha + g) / tau, dim=-1)
        hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        return hard - soft.detach() + soft

    def anneal_tau(self) -> float:
        self.tau = max(TAU_MIN, TAU_DECAY * self.tau)
        return self.tau

    # -- forward
    def _profiled(self, fn, *args):
        if not (self.profile_syncs and args[0].is_cuda):
            return fn(*args)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*args)
        torch.cuda.synchronize()
        self.profile_stats["calls"] += 1
        self.profile_stats["seconds"] += time.perf_counter() - t0
        self.profile_stats["mem"] = torch.cuda.memory_allocated()
        return out

    def forward(self, x: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        return self._profiled(self._forward, x, tau)

    def _forward(self, x, tau):
        mode = self.mode
        if mode == "single" and not self.training:
            mode = "argmax"  # the original's eval: argmax op only
        h = self.stem(x)
        if mode == "allops":
            w = F.softmax(self.alpha / (1.0 if tau is None else tau), dim=-1)
            for l, blk in enumerate(self.blocks):
                h = self._profiled(blk.forward_allops, h, w[l])
        elif mode == "single":
            wts = self.sample(tau)
            idx = wts.detach().argmax(-1).tolist()  # one host sync for all layers
            for l, blk in enumerate(self.blocks):
                c = wts[l, idx[l]]
                if self.renormalize:
                    c = c / (c + 1e-8)
                h = self._profiled(blk.forward_one, h, idx[l], c)
        elif mode == "argmax":
            idx = self.alpha.detach().argmax(-1).tolist()
            for l, blk in enumerate(self.blocks):
                h = self._profiled(blk.forward_one, h, idx[l])
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return self.classifier(h.mean(dim=(2, 3)))


def count_params(model: TorchASOSE, include_alpha: bool = True) -> int:
    """Number of scalars in the parameters (937,298 for C0=32, L=4; 937,258 without the 40 alpha)."""
    ps = model.parameters() if include_alpha else model.weight_parameters()
    return sum(p.numel() for p in ps)


# ---------------------------------------------------------------------------------------------- optimisation

def make_optimizers(model: TorchASOSE, lr: float = 0.025, momentum: float = 0.9, weight_decay: float = 1e-4,
                    arch_lr: float = 3e-4, arch_weight_decay: float = 1e-3):
    """The original's optimizers: SGD on the weights, Adam (L2 weight decay, default betas) on alpha."""
    opt_w = torch.optim.SGD(model.weight_parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    opt_a = torch.optim.Adam([model.alpha], lr=arch_lr, weight_decay=arch_weight_decay)
    return opt_w, opt_a


@torch.no_grad()
def soft_clip_(params: Iterable[torch.Tensor], max_norm: float = 5.0, factor: float = 0.1) -> torch.Tensor:
    """The original's ``adaptive_gradient_clipping``: if the global grad norm g > max_norm, scale every grad
    by ``(max_norm + factor (g - max_norm)) / (g + 1e-8)`` (the new norm is ``max_norm + factor (g - max_norm)``).
    Parameters without ``.grad`` are ignored. Host-sync free; returns g (before clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = torch.where(total > max_norm, (max_norm + factor * (total - max_norm)) / (total + 1e-8),
                        torch.ones_like(total))
    torch._foreach_mul_(grads, scale)
    return total


@contextlib.contextmanager
def _frozen(params: Sequence[nn.Parameter]):
    """``requires_grad=False`` on ``params`` while active, restored afterwards."""
    prev = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(params, prev):
            p.requires_grad_(r)


def weight_step(model: TorchASOSE, opt_w: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One weight step (alpha frozen): train-mode forward, CE, backward, soft clip, SGD. Returns the loss
    (detached; no host sync)."""
    model.train()
    with _frozen([model.alpha]):
        opt_w.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        soft_clip_(model.weight_parameters())
        opt_w.step()
    return loss.detach()


def arch_step(model: TorchASOSE, opt_a: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One alpha step (weights frozen; BN running stats still update, as the original's train mode):
    forward, CE, backward, soft clip, Adam. Returns the loss (detached; no host sync)."""
    model.train()
    with _frozen(model.weight_parameters()):
        opt_a.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        soft_clip_([model.alpha])
        opt_a.step()
    return loss.detach()


# ---------------------------------------------------------------------------------------------- JAX -> torch

def _np(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


@torch.no_grad()
def _copy(dst: torch.Tensor, src: np.ndarray, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{what}: shape {tuple(src.shape)} from JAX does not match torch {tuple(dst.shape)}")
    dst.copy_(torch.from_numpy(np.array(src, copy=True, order="C")).to(device=dst.device, dtype=dst.dtype))


def _hwio_to_oihw(w: Any) -> np.ndarray:
    """Conv ``[kh, kw, cin, cout]`` (depthwise ``[k, k, 1, C]``) -> ``[cout, cin, kh, kw]`` (``[C, 1, k, k]``)."""
    return _np(w).transpose(3, 2, 0, 1)


def _load_bn(bn: nn.BatchNorm2d, stats: dict, what: str, params: dict | None = None) -> None:
    _copy(bn.running_mean, _np(stats["mean"]), f"{what}.running_mean")
    _copy(bn.running_var, _np(stats["var"]), f"{what}.running_var")
    if bn.affine:
        _copy(bn.weight, _np(params["scale"]), f"{what}.weight")
        _copy(bn.bias, _np(params["bias"]), f"{what}.bias")


def load_op_from_jax(op: nn.Module, params: dict, stats: dict, what: str = "op") -> None:
    """Copy one primitive's JAX ``(params, stats)`` (``asose_jax.ops.OP_REGISTRY[name].init`` layout) into the
    torch op: every Conv2d child ``k`` takes ``params[k]``, every BatchNorm2d child ``k`` takes ``stats[k]``."""
    n_conv = n_bn = 0
    for name, child in op.named_children():
        if isinstance(child, nn.Conv2d):
            _copy(child.weight, _hwio_to_oihw(params[name]), f"{what}.{name}")
            n_conv += 1
        elif isinstance(child, nn.BatchNorm2d):
            _load_bn(child, stats[name], f"{what}.{name}")
            n_bn += 1
    if n_conv != len(params) or n_bn != len(stats):
        raise ValueError(f"{what}: JAX has params {sorted(params)} / stats {sorted(stats)}, torch used "
                         f"{n_conv} convs / {n_bn} BNs")


def _load_conv_bn(seq: nn.Sequential, params: dict, stats: dict, what: str) -> None:
    _copy(seq[0].weight, _hwio_to_oihw(params["w"]), f"{what}.conv")
    _load_bn(seq[1], stats, f"{what}.bn", params)


@torch.no_grad()
def load_from_jax(model: TorchASOSE, params: dict, batch_stats: dict, alpha: Any = None) -> TorchASOSE:
    """Copy the JAX pytrees of ``asose_jax.model.init_network(key, build_spec('original', C, L, PRIMITIVES))``
    (weights, BN running stats) and optionally alpha ``[L, 10]`` into ``model``. NHWC/HWIO -> NCHW/OIHW;
    head ``w [C, classes]`` -> Linear weight ``[classes, C]``. Every tensor of the torch model is written
    (checked). Returns ``model``."""
    if len(params["blocks"]) != len(model.blocks):
        raise ValueError(f"JAX net has {len(params['blocks'])} blocks, torch {len(model.blocks)}")
    _load_conv_bn(model.stem, params["stem"], batch_stats["stem"], "stem")
    for b, (blk, p, s) in enumerate(zip(model.blocks, params["blocks"], batch_stats["blocks"])):
        if isinstance(blk.input_conv, nn.Sequential):
            _load_conv_bn(blk.input_conv, p["input_conv"], s["input_conv"], f"blocks.{b}.input_conv")
        elif "input_conv" in p:
            raise ValueError(f"block {b}: JAX has an input conv, torch does not")
        if len(p["paths"]) != 1 or "path_scale" in p:
            raise ValueError(f"block {b}: only the original single-path block (no path_scale) is supported")
        pp, ps = p["paths"][0], s["paths"][0]
        if set(pp) != set(blk.ops):
            raise ValueError(f"block {b}: JAX ops {sorted(pp)} != torch ops {sorted(blk.ops)}")
        for name, op in blk.ops.items():
            load_op_from_jax(op, pp[name], ps[name], f"blocks.{b}.ops.{name}")
    _copy(model.classifier.weight, _np(params["head"]["w"]).T, "classifier.weight")
    _copy(model.classifier.bias, _np(params["head"]["b"]), "classifier.bias")
    if alpha is not None:
        _copy(model.alpha, _np(alpha), "alpha")
    return model
