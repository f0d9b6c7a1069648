"""Scores of queries against a large bank from an int8 copy of it: fbgemm's int8 product, fed
so that its rounding can be bounded.

torch's dynamic quantized linear product (quantized::linear_dynamic on the fbgemm engine)
multiplies int8 rows, each with a float32 scale, by inputs it quantises itself to 7-bit
integers, and sums in int32. On a 2-vCPU AVX2 EPYC it took 0.35-0.6 ms for one query against
17,703 x 512 rows, where torch's weight-only int8 kernel (which converts every value to
float32 first) took 0.5-0.8 ms.

Left to itself, the product would quantise a query with one step for its whole range: an error
of up to half a step in every value. Instead each query arrives already on a grid the product
reproduces exactly:

- the query is scaled by a power of two, 2^e, so that its largest value lies in [31.5, 63);
- one input row holds the scaled query rounded to integers, the next its remainder times 64,
  rounded: together they hold it to within 1/128 (q ~ 2^-e (whole + remainder / 64));
- every packed row ends in two zero columns, which hold -63 and 64 in the first input row, so
  the input's range is exactly [-63, 64] (the product takes one range for all its input) and
  their products add nothing: the product's step is then 127 / 127 = 1 and its zero point 63,
  and every input value is quantised exactly. (A third input row had held the range: one
  query's product took 0.50 ms so, 0.41 ms this way.)

The int32 sums are then exact (inputs of at most 127 times weights of at most 127: AVX2's
pairwise int16 sums stay below 32,767; the total below 2^31 up to MAX_WIDTH values), each
output is such a sum converted to float32 and times its row's scale (two roundings), and
dot_error_terms bounds what is left. The quantized tensor API this uses is deprecated from
torch 2.13: pack_rows checks every packed row's products against exact sums of its own
integers, and int8_product_runs checks once per process that the product is there at all.
"""
from __future__ import annotations

import math
import threading
import warnings
from contextlib import contextmanager
from functools import cache
from typing import Iterator

import numpy as np
import torch

QUERY_PEAK = 63  # a scaled query's largest value lies in [QUERY_PEAK / 2, QUERY_PEAK)
REMAINDER_SCALE = 64  # the second row holds the remainder times this
_RANGE_ROW = (-63.0, 64.0)  # with the product's 7-bit range [0, 127]: step 1, zero point 63
_RANGE_COLUMNS = len(_RANGE_ROW)  # zero in every packed row; the first input row holds _RANGE_ROW there
# Queries whose largest value is below 63 * 2^-126 are scaled by 2^126 only: 2^-e must stay a
# normal float32 (such a query's values then rest on the remainder row and the bound).
MAX_EXPONENT = 126
# The widest rows whose sums of input (-63 to 64) times weight (-127 to 127) stay in int32.
MAX_WIDTH = (2 ** 31 - 1) // (64 * 127)
_FLOAT32_ROUNDING = 2.0 ** -24
_HALF_SUBNORMAL = 2.0 ** -150  # the most a float32 result can lose to underflow
_ROWS_PER_CHUNK = 8192  # rows quantised at a time (32 MB of float64 temporaries at 512 wide)
_QUERIES_PER_CALL = 256  # (each call's products take two float32 rows per query: 36 MB at 17,703 rows)
_ENGINE = threading.Lock()  # (the engine and the warning filters are process-wide)


@contextmanager
def _fbgemm() -> Iterator[None]:
    """The fbgemm engine for packing (the packed rows keep it), without the quantized tensor
    API's deprecation warning; the engine setting restored."""
    with _ENGINE, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"
        try:
            yield
        finally:
            torch.backends.quantized.engine = engine


class PackedRows:
    """A bank's int8 rows [N, D] and float32 scales, packed for fbgemm's product, each row with
    the two zero columns of the range (see the module docstring). A copy or a pickle packs them
    again under fbgemm: the packed object alone would repack for whatever engine is current,
    and QNNPACK's product quantises off the grid the bound assumes."""

    def __init__(self, integers: torch.Tensor, scales: torch.Tensor):
        with _fbgemm():
            padded = torch.nn.functional.pad(integers, (0, _RANGE_COLUMNS))
            rows = torch._make_per_channel_quantized_tensor(padded, scales.double(),
                                                            torch.zeros(len(integers), dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(rows, None)

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The integers [N, D] and scales [N] as given."""
        rows = torch.ops.quantized.linear_unpack(self.packed)[0]
        return rows.int_repr()[:, :-_RANGE_COLUMNS], rows.q_per_channel_scales().float()

    def __reduce__(self):
        return PackedRows, self.unpacked()


def pack_rows(bank: torch.Tensor) -> tuple[PackedRows | None, float]:
    """(packed rows, residual) of a float32 CPU `bank` [N, D] (D up to MAX_WIDTH): each row
    scaled so that its largest value is 127 (a float32 scale) and rounded, and the largest
    distance of a row from its copy (scale times integers). A difference of a value and its
    copy is exact in float64 (Sterbenz: the integer is 0, or the two lie within a factor of two
    of each other), and 1.001 covers the rounding of the sum of squares. The packed rows are
    None where the product does not compute what the module docstring says for this bank."""
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
    packed = PackedRows(integers, scales)
    return (packed if _computes_as_said(packed, integers, scales) else None), residual


def _computes_as_said(packed: PackedRows, integers: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether every product of two probe queries (one whose whole values are all +-63, one
    random) with every packed row lies within its two roundings of the product of the same
    integers: summed exactly (float32 holds the sums while D * 64 * 127 < 2^24, float64
    beyond; in numpy, which no torch autocast or matmul precision setting reaches) and times
    the row's scale."""
    width = integers.shape[1]
    generator = torch.Generator().manual_seed(0)
    edge = torch.tensor([7.85, -7.85], dtype=torch.float64).repeat(width // 2 + 1)[:width]  # (62.8 once scaled)
    queries = torch.stack([edge, torch.randn(width, generator=generator, dtype=torch.float64)]).numpy()
    inputs, _ = _input_rows(queries)
    products = _products(packed, inputs)
    exact = np.float32 if width * 64 * 127 < 2 ** 24 else np.float64
    inputs = inputs[:, :width].astype(exact)  # (the range columns meet zeros)
    for start in range(0, len(integers), _ROWS_PER_CHUNK):
        chunk = slice(start, start + _ROWS_PER_CHUNK)
        rows = integers[chunk].numpy().astype(exact)
        sums, sizes = inputs @ rows.T, np.abs(inputs) @ np.abs(rows).T
        step = scales[chunk].numpy().astype(exact)
        rounding = 2 * _FLOAT32_ROUNDING * sizes * step + _HALF_SUBNORMAL
        if not (np.abs(products[:, chunk].astype(exact) - sums * step) <= rounding).all():
            return False
    return True


def query_exponents(queries: np.ndarray) -> np.ndarray:
    """The power e [B] each query [B, D] (float64) is scaled by: its largest value times 2^e
    lies in [31.5, 63), or 2^e = 2^MAX_EXPONENT for a tiny query (0 for a zero one). (The
    division's rounding is monotone and 63 * 2^k is exact: the scaled peak stays below 63.)"""
    _, exponents = np.frexp(np.abs(queries).max(1) / QUERY_PEAK)
    return np.minimum(-exponents, MAX_EXPONENT)


def _input_rows(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs [2B, D + 2] float32, exponents [B]) for queries [B, D] (float64): each query's
    scaled whole values and remainders, the range in the first row's last two columns."""
    batch, width = queries.shape
    exponents = query_exponents(queries)
    scaled = np.ldexp(queries, exponents[:, None])
    inputs = np.zeros((2 * batch, width + _RANGE_COLUMNS), np.float32)
    whole = np.rint(scaled, out=inputs[0::2, :width], casting="same_kind")  # (whole numbers up to 63: exact in float32)
    scaled -= whole  # (exact)
    np.rint(np.multiply(scaled, REMAINDER_SCALE, out=scaled), out=inputs[1::2, :width], casting="same_kind")
    inputs[0, width:] = _RANGE_ROW
    return inputs, exponents


def _products(packed: PackedRows, inputs: np.ndarray) -> np.ndarray:
    """fbgemm's product of `inputs` [M, D + 2] (float32 integers, their range [-63, 64]) and
    every packed row, [M, N] float32."""
    return torch.ops.quantized.linear_dynamic(torch.from_numpy(inputs), packed.packed, True).numpy()


def int8_scores(packed: PackedRows, queries: np.ndarray, squared_norms: np.ndarray) -> np.ndarray:
    """|b|^2 - 2 q.b for finite queries [B, D] (float64) and every packed row b, whose
    `squared_norms` [N] (float32) are given: [B, N] float32. The dot products are 2^-e (whole +
    remainder / 64) . b' (see the module docstring); the numpy steps round twice (the sum of
    the two rows' products, and the sum with the norms)."""
    scores = np.empty((len(queries), len(squared_norms)), np.float32)
    for start in range(0, len(queries), _QUERIES_PER_CALL):
        batch = slice(start, start + _QUERIES_PER_CALL)
        inputs, exponents = _input_rows(queries[batch])
        products = _products(packed, inputs)
        with np.errstate(over="ignore", invalid="ignore"):  # (huge queries: infinite scores, which the search handles)
            part = np.multiply(products[1::2], np.float32(1 / REMAINDER_SCALE), out=scores[batch])
            part += products[0::2]
            part *= np.ldexp(-2.0, -exponents).astype(np.float32)[:, None]
            part += squared_norms
    return scores


def dot_error_terms(width: int, longest: float, residual: float) -> tuple[float, float, float]:
    """(per_length, per_peak, constant): the dot products int8_scores computes err by at most
    per_length |q| + per_peak max|q_i| + constant, for every row b up to `longest` long whose
    copy b' lies within `residual` of it.

    With s = 2^-e <= max(max|q_i| / 31.5, 2^-126) and u float32's unit roundoff:
    q.b - q'.b' = q.(b - b') + (q - q').b', at most |q| residual + |q - q'| |b'|, where each
    value of q - q' is at most s / 128 and |b'| <= longest + residual. The two outputs round
    twice each and their sum once, by at most 3u (|q| + 1.01 s sqrt(D)) |b'| in all (|whole| +
    |remainder| / 64 <= |q| / s + 1.01 sqrt(D)); underflow adds half a subnormal to each output,
    to the remainder's division by 64 and to the final scaling (3 s + 1 of them). 1.01 covers
    the second-order terms and the division by 31.5."""
    u, copy_length, root = _FLOAT32_ROUNDING, longest + residual, math.sqrt(width)
    per_step = root * copy_length / (2 * REMAINDER_SCALE) + 3.03 * u * root * copy_length + 3 * _HALF_SUBNORMAL
    return (1.01 * (residual + 3 * u * copy_length), 1.01 * per_step / (QUERY_PEAK / 2),
            1.01 * (per_step * 2.0 ** -MAX_EXPONENT + _HALF_SUBNORMAL))


@cache
def int8_product_runs() -> bool:
    """Whether this torch has fbgemm's product and it computes what the module docstring says,
    on a probe bank with rows at the int8 limits (checked once per process)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines or not hasattr(torch.ops.quantized,
                                                                                 "linear_dynamic"):
        return False
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(256, 512, generator=generator)
    bank[0], bank[1] = 1.0, torch.tensor([1.0, -1.0]).repeat(256)  # every value at +-127
    try:
        return pack_rows(bank)[0] is not None
    except (RuntimeError, AttributeError, TypeError):  # (the API gone or changed)
        return False


__all__ = ["MAX_WIDTH", "QUERY_PEAK", "PackedRows", "dot_error_terms", "int8_product_runs", "int8_scores", "pack_rows",
           "query_exponents"]
