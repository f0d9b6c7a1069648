"""Scores of queries against a large bank from an int8 copy of it: fbgemm's int8 product, fed
so that its rounding can be bounded.

torch's dynamic quantized linear product (quantized::linear_dynamic on the fbgemm engine)
multiplies int8 rows, each with a float32 scale, by inputs it quantises itself to 7-bit
integers, and sums in int32. On a 2-vCPU AVX2 EPYC it took 0.35-0.5 ms for one query against
17,703 x 512 rows, where torch's weight-only int8 kernel (which converts every value to
float32 first) took 0.5-0.8 ms.

Left to itself, the product would quantise a query with one step for its whole range: an error
of up to half a step in every value. Instead each query arrives already on a grid the product
reproduces exactly:

- the query is scaled by a power of two, 2^e, so that its largest value lies in (31.5, 63];
- one input row holds the scaled query rounded to integers, the next its remainder times 64,
  rounded: together they hold it to within 1/128 (q ~ 2^-e (whole + remainder / 64));
- a last row holds -63 and 64 (its products are dropped), so the input's range is exactly
  [-63, 64]: the product's step is then 127 / 127 = 1 and its zero point 63, and every input
  value is quantised exactly.

The int32 sums are then exact (7-bit inputs times int8 weights: AVX2's pairwise int16 sums stay
below saturation), each output is a sum times its row's scale rounded once, and dot_error_terms
bounds what is left. The quantized tensor API this uses is deprecated from torch 2.13:
int8_product_runs checks once per process that it is there and computes what is said above.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from functools import cache
from typing import Iterator

import numpy as np
import torch

QUERY_PEAK = 63  # a scaled query's largest value is at most this (and above half of it)
REMAINDER_SCALE = 64  # the second row holds the remainder times this
_RANGE_ROW = (-63.0, 64.0)  # with the product's 7-bit range [0, 127]: step 1, zero point 63
# Queries whose largest value is below 63 * 2^-126 are scaled by 2^126 only: 2^-e must stay a
# normal float32 (such a query's values then rest on the remainder row and the bound).
MAX_EXPONENT = 126
_FLOAT32_ROUNDING = 2.0 ** -24
_HALF_SUBNORMAL = 2.0 ** -150  # the most a float32 result can lose to underflow
_ROWS_PER_CHUNK = 8192  # rows quantised at a time (32 MB of float64 temporaries at 512 wide)


@contextmanager
def _fbgemm() -> Iterator[None]:
    """The fbgemm engine for packing (the packed rows keep it), without the quantized tensor
    API's deprecation warning; the engine setting restored."""
    engine = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
        torch.backends.quantized.engine = "fbgemm"
        try:
            yield
        finally:
            torch.backends.quantized.engine = engine


def pack_rows(bank: torch.Tensor) -> tuple[torch.ScriptObject, float]:
    """(packed rows, residual) of a float32 CPU `bank` [N, D]: each row scaled so that its largest
    value is 127 (a float32 scale) and rounded, and the largest distance of a row from its copy
    (scale times integers). A difference of a value and its copy is exact in float64 (Sterbenz:
    the integer is 0, or the two lie within a factor of two of each other), and 1.001 covers the
    rounding of the sum of squares."""
    rows = bank.detach().float().contiguous()
    integers = torch.empty(rows.shape, dtype=torch.int8)
    peaks = torch.linalg.vector_norm(rows, math.inf, dim=1) / 127
    scales = torch.where(peaks > 0, peaks, 1.0)  # (a zero row: any scale)
    residual = 0.0
    for start in range(0, len(rows), _ROWS_PER_CHUNK):
        chunk = slice(start, start + _ROWS_PER_CHUNK)
        work = torch.div(rows[chunk], scales[chunk, None]).round_().clamp_(-127, 127)  # (in place: fresh pages cost more)
        integers[chunk] = work
        gaps = work.double().mul_(scales[chunk, None].double()).sub_(rows[chunk])
        residual = max(residual, 1.001 * float(torch.linalg.vector_norm(gaps, dim=1).max()))
    with _fbgemm():
        quantised = torch._make_per_channel_quantized_tensor(integers, scales.double(),
                                                             torch.zeros(len(rows), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(quantised, None), residual


def query_exponents(queries: np.ndarray) -> np.ndarray:
    """The power e [B] each query [B, D] (float64) is scaled by: its largest value times 2^e
    lies in (31.5, 63], or 2^e = 2^MAX_EXPONENT for a tiny query (0 for a zero one)."""
    peaks = np.abs(queries).max(1)
    _, exponents = np.frexp(peaks / QUERY_PEAK)
    exponents = np.minimum(-exponents, MAX_EXPONENT)
    return exponents - (np.ldexp(peaks, exponents) > QUERY_PEAK)  # (where the division rounded up past 63)


def _input_rows(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs [2B + 1, D] float32, exponents [B]) for queries [B, D] (float64): each query's
    scaled whole values and remainders, then the range row."""
    batch, width = queries.shape
    exponents = query_exponents(queries)
    scaled = np.ldexp(queries, exponents[:, None])
    whole = np.rint(scaled)
    inputs = np.zeros((2 * batch + 1, width), np.float32)
    inputs[0:-1:2] = whole
    inputs[1:-1:2] = np.rint((scaled - whole) * REMAINDER_SCALE)  # (scaled - whole is exact)
    inputs[-1, :2] = _RANGE_ROW
    return inputs, exponents


def int8_scores(packed: torch.ScriptObject, queries: np.ndarray, squared_norms: np.ndarray) -> np.ndarray:
    """|b|^2 - 2 q.b for queries [B, D] (float64) and every packed row b, whose `squared_norms`
    [N] (float32) are given: [B, N] float32. The dot products are 2^-e (whole + remainder / 64)
    . b' (see the module docstring): in numpy, every step but two additions exact."""
    inputs, exponents = _input_rows(queries)
    products = torch.ops.quantized.linear_dynamic(torch.from_numpy(inputs), packed, True).numpy()
    with np.errstate(over="ignore", invalid="ignore"):  # (huge queries: infinite scores, which the search handles)
        scores = products[1:-1:2] * np.float32(1 / REMAINDER_SCALE)
        scores += products[0:-1:2]
        scores *= np.ldexp(-2.0, -exponents).astype(np.float32)[:, None]
        scores += squared_norms
    return scores


def dot_error_terms(width: int, longest: float, residual: float) -> tuple[float, float, float]:
    """(per_length, per_peak, constant): the dot products int8_scores computes err by at most
    per_length |q| + per_peak max|q_i| + constant, for every row b up to `longest` long whose
    copy b' lies within `residual` of it.

    With s = 2^-e <= max(max|q_i| / 31.5, 2^-126) and u float32's unit roundoff:
    q.b - q'.b' = q.(b - b') + (q - q').b', at most |q| residual + |q - q'| |b'|, where each
    value of q - q' is at most s / 128 and |b'| <= longest + residual. The two outputs and their
    sum round once each, by at most 2u (|q| + 1.01 s sqrt(D)) |b'| in all (|whole| + |remainder|
    / 64 <= |q| / s + 1.01 sqrt(D)); underflow adds half a subnormal to each of them and to the
    final scaling (3 s + 1 of them). 1.01 covers the second-order terms and the division by 63."""
    u, copy_length, root = _FLOAT32_ROUNDING, longest + residual, math.sqrt(width)
    per_step = root * copy_length / (2 * REMAINDER_SCALE) + 2.02 * u * root * copy_length + 3 * _HALF_SUBNORMAL
    return (1.01 * (residual + 2 * u * copy_length), 1.01 * per_step / (QUERY_PEAK / 2),
            1.01 * (per_step * 2.0 ** -MAX_EXPONENT + _HALF_SUBNORMAL))


@cache
def int8_product_runs() -> bool:
    """Whether fbgemm's product is in this torch and computes what the module docstring says,
    checked once per process on a small bank against float64 products of the same integers:
    each output within its one rounding, with rows at the int8 limits and queries at the
    inputs' limits (where AVX2's pairwise sums would saturate if the inputs were wider)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines or not hasattr(torch.ops.quantized,
                                                                                 "linear_dynamic"):
        return False
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(96, 64, generator=generator)
    bank[0], bank[1] = 1.0, torch.tensor([1.0, -1.0]).repeat(32)  # every value at +-127
    queries = torch.randn(3, 64, generator=generator, dtype=torch.float64).numpy()
    queries[0], queries[1] = 7.875, np.tile([7.875, -7.875], 32)  # every whole value at +-63
    try:
        packed, _ = pack_rows(bank)
        norms = bank.pow(2).sum(1).numpy()
        dots = (norms - int8_scores(packed, queries, norms).astype(np.float64)) / 2
        weights = torch.ops.quantized.linear_unpack(packed)[0]
        rows = (weights.int_repr().double() * weights.q_per_channel_scales()[:, None]).numpy()
    except (RuntimeError, AttributeError, TypeError):  # (the API gone or changed)
        return False
    inputs, exponents = _input_rows(queries)
    parts = inputs[:-1].astype(np.float64).reshape(len(queries), 2, -1) / [[1], [REMAINDER_SCALE]]
    steps = np.ldexp(1.0, -exponents)[:, None]
    exact = steps * (parts.sum(1) @ rows.T)
    # the two outputs, their sum and the sum with the norms each round once
    rounding = 3 * _FLOAT32_ROUNDING * (steps * (np.abs(parts[:, 0]) @ np.abs(rows.T)
                                                 + np.abs(parts[:, 1]) @ np.abs(rows.T)) + norms)
    return bool((np.abs(dots - exact) <= rounding).all())


__all__ = ["QUERY_PEAK", "dot_error_terms", "int8_scores", "int8_product_runs", "pack_rows", "query_exponents"]
