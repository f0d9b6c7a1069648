"""3x3 stride-1 convolutions computed by Winograd's minimal filtering F(2x2, 3x3), for inference.

Why: a direct 3x3 convolution does 9 multiply-adds per input channel, output channel and
output pixel. F(2x2, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016) computes each 2x2 output tile from the 4x4 input tile under it with 16
products per channel pair, 4 per pixel: 2.25 times fewer. The products of all tiles are 16
matrix products [tiles, C_in] x [C_in, C_out], which run on the CPU's matrix units at nearly
a large matmul's rate; sums and differences come before and after them. The full model's
896-channel residual convolutions, half its FLOPs, ran at about 80% of the matmul rate as
direct convolutions (the README's Speed section gives what this changed).

With the transformed weights U = G g G^T (per channel pair, computed once from the float32
weights and rounded to the compute dtype), the input tiles V = B^T d B and the products
M = V U, an output tile is A^T M A. The transforms run as two passes over strided views
(rows, then columns) each way.

What it costs: the transformed weights take 16/9 of the 3x3 weights' memory, and the extra
sums add rounding: in bf16 the result lies about three times as far from the float32
convolution as a direct bf16 convolution does (tests/test_winograd.py bounds it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .devices import weights_as_computed

# G maps 3 filter taps to 4 transformed taps (conv2d's correlation, not a flipped convolution).
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


# Output channels transformed at a time: a few MiB of float32 scratch for the widest layers.
_WEIGHT_CHUNK = 128


def transform_weights(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Conv2d weights [C_out, C_in, 3, 3] -> U [16, C_in, C_out] in `dtype`, computed in
    float32 (each U a sum of at most nine weights times 1/4, 1/2 or 1): the nine taps of every
    channel pair times the 9 x 16 matrix kron(G, G)^T, one matrix product per chunk of output
    channels (sums over strided slices took 1.4-2x as long; loading the full model transforms
    48 layers)."""
    w = weight.detach().float()
    out_channels, in_channels = w.shape[:2]
    g = torch.tensor(_G, dtype=torch.float32, device=w.device)
    taps_to_tile = torch.kron(g, g).T.contiguous()  # [9, 16]: U[i, j] = sum over k, l of G[i, k] G[j, l] g[k, l]
    transformed = torch.empty(16, in_channels, out_channels, dtype=dtype, device=w.device)
    for first in range(0, out_channels, _WEIGHT_CHUNK):
        chunk = w[first:first + _WEIGHT_CHUNK]
        tiles = chunk.reshape(-1, 9) @ taps_to_tile  # [c * C_in, 16]
        transformed[:, :, first:first + _WEIGHT_CHUNK] = tiles.view(chunk.shape[0], in_channels, 16).permute(2, 1, 0)
    return transformed


def _input_tile_pass(source: torch.Tensor, dim: int, tiles: int, out: torch.Tensor) -> None:
    """B^T along `dim`: out[0..3] from the four rows (or columns) under each of `tiles` tiles
    that start every second position."""
    def taps(k: int) -> torch.Tensor:
        return source[(slice(None),) * dim + (slice(k, k + 2 * tiles, 2),)]

    d0, d1, d2, d3 = (taps(k) for k in range(4))
    torch.sub(d0, d2, out=out[0])
    torch.add(d1, d2, out=out[1])
    torch.sub(d2, d1, out=out[2])
    torch.sub(d1, d3, out=out[3])


def _output_tile_pass(m: torch.Tensor, out: torch.Tensor) -> None:
    """A^T along the first dimension of `m` (4 entries) into out[0], out[1]."""
    torch.add(m[0], m[1], out=out[0])
    out[0] += m[2]
    torch.sub(m[1], m[2], out=out[1])
    out[1] -= m[3]


# Tile rows computed together: enough tiles for efficient matrix products, few enough that
# the transformed tiles stay in cache (a 130x130x512 input without bands ran 1.6x slower).
BAND_ROWS = 16


def winograd_conv3x3(x: torch.Tensor, transformed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, weight, bias) without padding for a 3x3 stride-1 weight given as
    `transform_weights(weight)`; x [N, C_in, H, W] with H, W >= 3. Computes in `transformed`'s
    dtype; the result is channels-last."""
    x = x.to(transformed.dtype)
    out_h, out_w = x.shape[2] - 2, x.shape[3] - 2
    if out_h < 1 or out_w < 1:
        raise ValueError(f"a 3x3 convolution needs at least 3x3 (padded) pixels, got {list(x.shape)}")
    if out_h % 2 or out_w % 2:  # whole tiles only: one more zero row or column, cut off below
        x = F.pad(x, (0, out_w % 2, 0, out_h % 2))
    batch, channels, height, width = x.shape
    rows, cols, out_channels = (height - 2) // 2, (width - 2) // 2, transformed.shape[2]
    pixels = x.permute(0, 2, 3, 1)  # NHWC: a plain view of a channels-last tensor
    tiles = x.new_empty(batch, rows, 2, cols, 2, out_channels)  # = the NHWC output, 2x2 tiles interleaved
    for first in range(0, rows, BAND_ROWS):
        band = min(BAND_ROWS, rows - first)
        row_pass = x.new_empty(4, batch, band, width, channels)
        _input_tile_pass(pixels[:, 2 * first:2 * (first + band) + 2], 1, band, row_pass)
        v = x.new_empty(4, 4, batch, band, cols, channels)
        _input_tile_pass(row_pass, 3, cols, v.transpose(0, 1))

        m = torch.bmm(v.view(16, batch * band * cols, channels), transformed)
        m = m.view(4, 4, batch, band, cols, out_channels)
        if bias is not None:
            m[1, 1] += bias  # the one product that reaches every output pixel once, with sign +1
        half = x.new_empty(2, 4, batch, band, cols, out_channels)
        _output_tile_pass(m, half)
        _output_tile_pass(half.transpose(0, 1), tiles[:, first:first + band].permute(4, 2, 0, 1, 3, 5))
    y = tiles.view(batch, 2 * rows, 2 * cols, out_channels).permute(0, 3, 1, 2)
    if (2 * rows, 2 * cols) != (out_h, out_w):
        y = y[:, :, :out_h, :out_w].contiguous(memory_format=torch.channels_last)
    return y


# The left inverse of G: the taps are u0, u1 - u2 and u3.
_G_LEFT_INVERSE = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, -1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)


class WinogradConv3x3(nn.Module):
    """A 3x3 stride-1 Conv2d (zero padding, no groups or dilation), optionally with the ReLU or
    LeakyReLU after it, computed by `winograd_conv3x3` in the dtype of its transformed weights.
    It holds those instead of the original weights (inference only)."""

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype, slope: float | None = None):
        super().__init__()
        if not self.replaces(conv):
            raise ValueError(f"WinogradConv3x3 computes 3x3 stride-1 convolutions only, not {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.padding = tuple(conv.padding)
        self.slope = slope  # None: no activation; 0.0: ReLU
        self.register_buffer("transformed_weight", transform_weights(conv.weight, dtype))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().to(dtype))

    @staticmethod
    def replaces(conv: nn.Module) -> bool:
        """Whether `conv` is a layer this computes: a plain Conv2d, or the fused convolution and
        activation of the inference rewrite (a subclass with another forward would not be)."""
        from .inference_graph import ConvActivation  # (inference_graph imports this module)

        return (type(conv) in (nn.Conv2d, ConvActivation) and tuple(conv.kernel_size) == (3, 3)
                and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # unbatched, as Conv2d accepts it
            return self(x[None])[0]
        if torch.is_grad_enabled() and x.requires_grad:
            # the tile passes write in place, which autograd cannot follow: the plain layers,
            # recovered from the transformed weights, give gradients for the input
            return self.as_layers()(x)
        device = x.device.type
        _, weight, bias = weights_as_computed(self.transformed_weight, self.bias, device)
        pad_h, pad_w = self.padding
        with torch.autocast(device, enabled=False):
            if pad_h or pad_w:
                x = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
            y = winograd_conv3x3(x, weight, bias)
            if self.slope is None:
                return y
            return F.leaky_relu_(y, self.slope) if self.slope else F.relu_(y)

    def as_layers(self) -> nn.Sequential:
        """The plain Conv2d (and activation) this stands for, in the transformed weights' dtype,
        its weights recovered from them (exact up to their rounding): what benchmarks time as
        the eager layers, and what computes when gradients are wanted."""
        inverse = _G_LEFT_INVERSE.to(self.transformed_weight.device)
        u = self.transformed_weight.to(torch.float64).reshape(4, 4, self.in_channels, self.out_channels)
        conv = nn.Conv2d(self.in_channels, self.out_channels, 3, padding=self.padding, bias=self.bias is not None,
                         device=self.transformed_weight.device, dtype=self.transformed_weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(torch.einsum("ki,ijco,lj->ockl", inverse, u, inverse))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.requires_grad_(False)  # (the transformed weights are buffers: they take no gradient either)
        layers = [conv] + ([] if self.slope is None else [nn.LeakyReLU(self.slope) if self.slope else nn.ReLU()])
        return nn.Sequential(*layers)


__all__ = ["BAND_ROWS", "WinogradConv3x3", "transform_weights", "winograd_conv3x3"]
