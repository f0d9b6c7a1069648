"""Rewrites a network for inference: the same function in fewer passes over memory.

What it changes (the README's Speed section gives the effect on the full model):
- A BatchNorm2d right after a Conv2d or ConvTranspose2d (in an nn.Sequential) is folded into
  that convolution's weights and bias: one pass over the activations fewer per norm.
- InstanceNorm2d without running statistics becomes the group norm with one channel per
  group, which equals it and keeps channels-last layout (instance_norm copies to NCHW, and
  the next convolution copies back).
- Reflection and replication pads run in their input's dtype: CPU autocast runs them in
  float32, casting bf16 activations up before each pad and down again after it.
- A Conv2d followed (after any folded norm) by ReLU or LeakyReLU becomes one oneDNN
  convolution that applies the activation as it writes its output, on the CPU: the separate
  in-place activation was one more pass over every activation map (15% of the simplifier's
  time). Elsewhere (CUDA), the two layers run in turn.
- A 2x2 max pool with stride 2 takes the maximum of two strided views twice: max_pool2d
  also computes and writes int64 indices nobody reads, and took six times as long.
- A 3x3 stride-1 convolution with many channels (and the activation fused into it) runs by
  Winograd's F(2x2, 3x3) on the CPU (dfd_data/winograd.py): 4 products per output pixel
  instead of 9, as 16 batched matrix products. Below WINOGRAD_MIN_CHANNELS its transforms cost
  more than the products save.
- The convolution and linear weights are stored in the compute dtype (the model runs under
  autocast to it: see devices.compute_precision): for bf16 they are cast once here, where
  autocast would cast every weight again on every call.

Training never sees this: only models loaded for inference are rewritten.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .devices import weights_as_computed
from .winograd import WinogradConv3x3

_CONVOLUTIONS = (nn.Conv2d, nn.ConvTranspose2d)
_MATRIX_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


class GroupInstanceNorm(nn.Module):
    """InstanceNorm2d (instance statistics, optional affine) computed as group_norm with one
    channel per group."""

    def __init__(self, norm: nn.InstanceNorm2d):
        super().__init__()
        self.channels, self.eps = norm.num_features, norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # unbatched, as InstanceNorm2d accepts it (group_norm would read C as the batch)
            return self(x[None])[0]
        return F.group_norm(x, self.channels, self.weight, self.bias, self.eps)


class InputDtypePad(nn.Module):
    """A reflection or replication pad computed in its input's dtype, also under autocast."""

    def __init__(self, pad: nn.ReflectionPad2d | nn.ReplicationPad2d):
        super().__init__()
        self.padding = tuple(pad.padding)
        self.mode = "reflect" if isinstance(pad, nn.ReflectionPad2d) else "replicate"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.pad(x, self.padding, mode=self.mode)


# oneDNN's convolution with a fused post-op, as torch.compile's CPU backend uses it; a torch
# build without it runs the convolution and the activation in turn (the same function).
_FUSED_CONVOLUTION = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None) \
    if torch.backends.mkldnn.is_available() else None
# Its bf16 path needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: elsewhere (AVX2 CPUs) bf16 runs
# as the layers in turn, which PyTorch computes on any CPU.
_FUSED_DTYPES = (torch.float32, torch.bfloat16) if _FUSED_CONVOLUTION is not None \
    and torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


def _conv_shape(conv: nn.Conv2d) -> tuple:
    """The Conv2d constructor arguments that describe `conv` (zero padding)."""
    return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None)


class ConvActivation(nn.Conv2d):
    """A Conv2d (zero padding given as numbers) and the ReLU or LeakyReLU after it, as one
    oneDNN convolution on CPU float32 tensors, and bf16 ones where the CPU has the
    instructions oneDNN's fused bf16 kernel needs. It computes in the dtype a Conv2d
    would: under autocast, the autocast dtype (the input and, where they are stored in float32,
    the weights are cast to it, as autocast casts them); otherwise the weights' dtype. It is
    still a Conv2d holding the same parameters, so state-dict names and the dtype and layout
    passes stay as they were."""

    def __init__(self, conv: nn.Conv2d, activation: nn.ReLU | nn.LeakyReLU):
        super().__init__(*_conv_shape(conv), device="meta")
        self.weight, self.bias = conv.weight, conv.bias
        self.slope = activation.negative_slope if isinstance(activation, nn.LeakyReLU) else 0.0

    def as_layers(self) -> nn.Sequential:
        """The plain Conv2d and activation this stands for (benchmarks time them as eager layers)."""
        conv = nn.Conv2d(*_conv_shape(self), device="meta")
        conv.weight, conv.bias = self.weight, self.bias
        return nn.Sequential(conv, nn.LeakyReLU(self.slope) if self.slope else nn.ReLU())

    @staticmethod
    def fuses(conv: nn.Module, activation: nn.Module) -> bool:
        return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
                and type(activation) in (nn.ReLU, nn.LeakyReLU))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # unbatched, as Conv2d accepts it
            return self(x[None])[0]
        dtype, weight, bias = weights_as_computed(self.weight, self.bias, "cpu")
        # (the fused kernel has no gradient: for the input's, as WinogradConv3x3, the layers in turn)
        if _FUSED_CONVOLUTION is None or x.device.type != "cpu" or dtype not in _FUSED_DTYPES \
                or (torch.is_grad_enabled() and x.requires_grad):
            return F.leaky_relu(super().forward(x), self.slope) if self.slope else F.relu(super().forward(x))
        attr, scalars = ("leaky_relu", [self.slope]) if self.slope else ("relu", [])
        return _FUSED_CONVOLUTION(x.to(dtype), weight, bias, list(self.padding), list(self.stride),
                                  list(self.dilation), self.groups, attr, scalars, "")


class PairMaxPool(nn.Module):
    """MaxPool2d(2, 2) as two elementwise maxima of strided views (NaN propagates the same).
    An odd height or width (only where ceil_mode pools the last row or column alone) goes to
    max_pool2d."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.ceil_mode = pool.ceil_mode

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        def pair(value) -> bool:
            return value in (2, (2, 2))

        return (isinstance(module, nn.MaxPool2d) and pair(module.kernel_size) and pair(module.stride)
                and module.padding in (0, (0, 0)) and module.dilation in (1, (1, 1)) and not module.return_indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            return F.max_pool2d(x, 2, 2, ceil_mode=self.ceil_mode)
        rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _replace_modules(model: nn.Module, wanted: Callable[[nn.Module], bool],
                     replacement: Callable[[nn.Module], nn.Module]) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if wanted(child):
                setattr(parent, name, replacement(child))


def _fold_batch_norms(model: nn.Module) -> None:
    for sequence in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for index in range(len(sequence) - 1):
            conv, norm = sequence[index], sequence[index + 1]
            if isinstance(conv, _CONVOLUTIONS) and isinstance(norm, nn.BatchNorm2d) \
                    and norm.running_mean is not None:
                sequence[index] = fuse_conv_bn_eval(conv, norm, transpose=isinstance(conv, nn.ConvTranspose2d))
                sequence[index + 1] = nn.Identity()


def _fuse_activations(model: nn.Module) -> None:
    for sequence in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for index, conv in enumerate(sequence):
            after = index + 1
            while after < len(sequence) and isinstance(sequence[after], nn.Identity):  # a folded norm
                after += 1
            if after < len(sequence) and ConvActivation.fuses(conv, sequence[after]):
                sequence[index], sequence[after] = ConvActivation(conv, sequence[after]), nn.Identity()


# The fewest input and output channels at which Winograd's convolution beat oneDNN's direct
# one on this project's CPU (a Xeon with AMX), per compute dtype. On AMX a direct bf16
# convolution is fast enough that the transforms only pay from 512 channels (896: 1.9x, 256:
# 1.07x); a float32 one gains 1.4x at 256 channels, 2.5x at 896.
WINOGRAD_MIN_CHANNELS = {torch.float32: 256, torch.bfloat16: 512}


def _use_winograd(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Replace CPU 3x3 stride-1 convolutions with enough channels by WinogradConv3x3 computing
    in `compute_dtype`."""
    least = WINOGRAD_MIN_CHANNELS.get(compute_dtype, float("inf"))
    chosen = [(parent, name) for parent in model.modules() for name, conv in parent.named_children()
              if WinogradConv3x3.replaces(conv) and conv.weight.device.type == "cpu"
              and min(conv.in_channels, conv.out_channels) >= least]
    for parent, name in chosen:  # each original weight is freed as soon as it is replaced
        conv = getattr(parent, name)
        setattr(parent, name, WinogradConv3x3(conv, compute_dtype,
                                              conv.slope if isinstance(conv, ConvActivation) else None))


def rewrite_for_inference(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Rewrite `model` (in eval mode) in place as the module docstring says; returns it."""
    if model.training:
        raise ValueError("rewrite_for_inference needs a model in eval mode (batch norms use running statistics)")
    with torch.no_grad():
        _fold_batch_norms(model)
    _fuse_activations(model)
    _replace_modules(model, lambda m: isinstance(m, nn.InstanceNorm2d) and not m.track_running_stats,
                     GroupInstanceNorm)
    _replace_modules(model, lambda m: isinstance(m, (nn.ReflectionPad2d, nn.ReplicationPad2d)), InputDtypePad)
    _replace_modules(model, PairMaxPool.replaces, PairMaxPool)
    _use_winograd(model, compute_dtype)
    for layer in model.modules():  # (a second call may change the dtype)
        if isinstance(layer, (*_MATRIX_LAYERS, WinogradConv3x3)):
            layer.to(compute_dtype)
    model.rewritten_for_inference = True  # its state dict no longer has the layout it was trained with
    return model


__all__ = ["ConvActivation", "GroupInstanceNorm", "InputDtypePad", "PairMaxPool", "WINOGRAD_MIN_CHANNELS",
           "rewrite_for_inference"]
