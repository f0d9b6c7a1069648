"""Manifold projection (DESIGN section 3): feature banks, kNN + locally linear weights, blending.

A component latent f from a rough sketch is replaced by the affine combination of its K
nearest training latents that best reconstructs it: f_proj = sum_k w_k f_k with sum_k w_k = 1
(weights may be negative), then blended with the raw latent: c * f_proj + (1 - c) * f.

Two solves of the locally linear weights are offered (`method`):

- "anchored" (default): parametrise w = (1 - sum x, x) around the nearest neighbour f_1, so
  the sum-to-one constraint holds by construction, and solve the least-squares problem
  min |(f - f_1) - sum_i x_i (f_i - f_1)|^2 with the ridge eps * trace(A^T A) on x. The
  ridge pulls towards the nearest neighbour (the released code pulls towards one neighbour
  too). A bank vector projects onto itself exactly, and near it the result is continuous.
- "gram": textbook LLE: C = (X - f)(X - f)^T, C += eps * trace(C) * I, solve C w = 1,
  w /= sum(w). The ridge pulls towards uniform weights; with eps = 1e-3 a bank vector
  queried projects about 1-2% of a neighbour distance away from itself.

Both solve in float64 (in numpy: the result carries no gradient) and return tensors in the
query's dtype. The neighbour search scores the bank with one matrix product (from an int8 or
bf16 copy of a large bank where that is faster) and re-ranks, by float64 distances, every row
that the scores' rounding error bound leaves a chance of being among the k nearest: the result
is exact, whatever the scores were computed in.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from dfd_data.devices import native_bf16

from .int8_scores import MAX_WIDTH, PackedRows, dot_error_terms, int8_product_runs, int8_scores, pack_rows


ALL = "all"
METHODS = ("anchored", "gram")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check_name(kind: str, name) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"feature bank {kind} name {name!r} must be letters, digits, '_', '.' or '-'")
    return name


class FeatureBank:
    """Latent vectors of the training sketches, per component and optionally per gender.

    `vectors` maps component -> tensor [N, D] (stored under the gender "all") or component ->
    {gender: tensor [N, D]}. Every tensor must be a non-empty, finite, floating [N, D] with
    the same D throughout. Tensors are kept as given (detached); `to()` moves them.
    """

    def __init__(self, vectors: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]]):
        if not isinstance(vectors, Mapping) or not vectors:
            raise ValueError("a feature bank needs at least one component")
        banks: dict[str, dict[str, torch.Tensor]] = {}
        latent_dim = None
        for component, entry in vectors.items():
            _check_name("component", component)
            per_gender = {ALL: entry} if isinstance(entry, torch.Tensor) else entry
            if not isinstance(per_gender, Mapping) or not per_gender:
                raise ValueError(f"feature bank {component}: expected a tensor or a non-empty gender -> tensor mapping")
            banks[component] = {}
            for gender, tensor in per_gender.items():
                _check_name("gender", gender)
                where = f"feature bank {component}/{gender}"
                if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or not torch.is_floating_point(tensor):
                    described = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                    raise ValueError(f"{where}: expected a float tensor [N, D], got {described}")
                if tensor.shape[0] == 0 or tensor.shape[1] == 0:
                    raise ValueError(f"{where} is empty: it needs at least one latent vector of at least one value")
                if latent_dim is None:
                    latent_dim = tensor.shape[1]
                elif tensor.shape[1] != latent_dim:
                    raise ValueError(f"{where}: latent size {tensor.shape[1]} differs from {latent_dim} elsewhere")
                if tensor.device.type != "meta" and not torch.isfinite(tensor).all():
                    raise ValueError(f"{where} contains NaN or infinite values")
                banks[component][gender] = tensor.detach()
        self._banks = banks
        self.latent_dim: int = latent_dim
        self._pooled: dict[str, torch.Tensor] = {}
        self._indexes: dict[tuple[str, str | None], SearchIndex] = {}

    # ---- access ------------------------------------------------------------------------------
    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self._banks)

    def genders(self, component: str | None = None) -> tuple[str, ...]:
        """Genders of one component's bank, or those every component has when None."""
        if component is not None:
            return tuple(self._component(component))
        common = None
        for per_gender in self._banks.values():
            common = list(per_gender) if common is None else [g for g in common if g in per_gender]
        return tuple(common or ())

    def _component(self, component: str) -> dict[str, torch.Tensor]:
        if component not in self._banks:
            raise ValueError(f"feature bank has no component {component!r} (it has {', '.join(self._banks)})")
        return self._banks[component]

    def get(self, component: str, gender: str | None = None) -> torch.Tensor:
        """The [N, D] bank to search. gender None: the "all" bank if there is one, else every
        gender's vectors together (the whole manifold), each vector once: training puts the
        faces without a recorded gender in every gender's bank, and a copy would take a
        neighbour's place."""
        per_gender = self._component(component)
        if gender is None:
            if ALL in per_gender:
                return per_gender[ALL]
            if len(per_gender) == 1:
                return next(iter(per_gender.values()))
            if component not in self._pooled:
                self._pooled[component] = _distinct_rows(torch.cat(list(per_gender.values())))
            return self._pooled[component]
        if gender not in per_gender:
            raise ValueError(f"feature bank {component} has no gender {gender!r} "
                             f"(it has {', '.join(per_gender)}; pass gender=None to search them all)")
        return per_gender[gender]

    def index(self, component: str, gender: str | None = None) -> "SearchIndex":
        """The search index of `get(component, gender)`, built once: every query reuses it."""
        key = (component, gender)
        if key not in self._indexes:
            self._indexes[key] = SearchIndex.of(self.get(component, gender))
        return self._indexes[key]

    def counts(self) -> dict[str, dict[str, int]]:
        """component -> gender -> number of vectors."""
        return {c: {g: int(t.shape[0]) for g, t in per.items()} for c, per in self._banks.items()}

    # ---- conversion --------------------------------------------------------------------------
    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "FeatureBank":
        """A new bank with `fn` applied to every tensor (e.g. a device or dtype move)."""
        return FeatureBank({c: {g: fn(t) for g, t in per.items()} for c, per in self._banks.items()})

    def to(self, *args, **kwargs) -> "FeatureBank":
        return self.apply(lambda tensor: tensor.to(*args, **kwargs))

    def flat(self) -> dict[str, torch.Tensor]:
        """{"component/gender": tensor}, the layout of banks.safetensors."""
        return {f"{c}/{g}": t for c, per in self._banks.items() for g, t in per.items()}

    @classmethod
    def from_flat(cls, tensors: Mapping[str, torch.Tensor]) -> "FeatureBank":
        nested: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            component, sep, gender = key.partition("/")
            if not sep:
                raise ValueError(f"feature bank key {key!r} is not 'component/gender'")
            nested.setdefault(component, {})[gender] = tensor
        return cls(nested)

    def __repr__(self) -> str:
        sizes = "; ".join(f"{c}: " + ", ".join(f"{g} {n}" for g, n in per.items()) for c, per in self.counts().items())
        return f"FeatureBank(latent_dim={self.latent_dim}; {sizes})"


def _distinct_rows(bank: torch.Tensor) -> torch.Tensor:
    """`bank` without repeated rows (equal bits), first occurrences in order."""
    if bank.device.type == "meta":  # shapes only: nothing to compare
        return bank
    first: dict[bytes, int] = {}
    for row, data in enumerate(bank.detach().cpu().contiguous().view(torch.uint8).numpy()):
        first.setdefault(data.tobytes(), row)
    if len(first) == bank.shape[0]:
        return bank
    return bank[torch.tensor(list(first.values()), device=bank.device)]


# ---- projection ------------------------------------------------------------------------------------
def _check_projection_inputs(query, bank, k, eps, method) -> None:
    if not isinstance(query, torch.Tensor) or query.ndim != 2 or not torch.is_floating_point(query):
        described = list(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
        raise ValueError(f"project: query must be a float tensor [B, D], got {described}")
    if not isinstance(bank, torch.Tensor) or bank.ndim != 2 or not torch.is_floating_point(bank):
        described = list(bank.shape) if isinstance(bank, torch.Tensor) else type(bank).__name__
        raise ValueError(f"project: bank must be a float tensor [N, D], got {described}")
    if bank.shape[0] == 0:
        raise ValueError("project: the feature bank is empty; encode some training sketches into it first")
    if bank.shape[1] == 0:
        raise ValueError("project: the feature bank's latents are empty (no values)")
    if bank.shape[1] != query.shape[1]:
        raise ValueError(f"project: query latents have {query.shape[1]} values, the bank's {bank.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"project: k must be a positive integer, got {k!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"project: eps must be a positive number, got {eps!r}")
    if method not in METHODS:
        raise ValueError(f"project: unknown method {method!r}; choose from {', '.join(METHODS)}")


def check_index(index, bank: torch.Tensor) -> None:
    """A one-line ValueError unless `index` is None or was built from `bank`."""
    if index is not None and not index.built_from(bank):  # its norms and copy would be another bank's
        raise ValueError("project: the search index was built from another tensor than the bank searched "
                         "(a copy in another dtype or device?); build it from the bank itself")


def _with_ridge(grams: np.ndarray, eps: float) -> np.ndarray:
    """`grams` [B, n, n] with eps * trace(gram) added to each one's diagonal, in place. A zero
    trace means every neighbour coincides (with the anchor, or with the query): any positive
    ridge then gives the right answer, so use 1."""
    # a writeable view: np.trace and .flat had cost 26 us here, after the bank scan had
    # flushed the caches (2 us each when warm)
    diagonals = np.einsum("bii->bi", grams)
    traces = diagonals.sum(1, keepdims=True)
    diagonals += np.where(traces > 0, eps * traces, 1.0)
    return grams


# CPU banks above this size get a low-precision copy to score; below it the float32 bank is
# read so fast that the copy would not pay for its memory. A GPU reads a float32 bank in
# microseconds, and its bf16 products may add up partial sums in bf16, outside the error bound.
LOW_PRECISION_ROWS = 2048
# On CPUs without native bf16 the copy is int8 rows with a float32 scale each, scored by
# fbgemm's int8 product (int8_scores): it reads a quarter of the float32 bank and sums in
# integers. 17,703 x 512 on a 2-vCPU AVX2 EPYC: the product for one query took 0.35-0.6 ms
# against 0.5-0.8 ms from torch's weight-only int8 kernel (used here before), 1.1 ms from a
# bf16 copy and 2.9 ms in float32. It scores batches of any size: whole searches of 8 / 16 /
# 32 / 128 / 512 queries took 5.0 / 8.5 / 13.6 / 56 / 272 ms from it, against 9.8 / 14.8 /
# 21.0 / 84 / 389 ms from the float32 bank.
# On CPUs with native bf16 (AMX) the copy stays bf16, as measured there. Without native bf16
# a few queries are matrix-vector products, which torch computes from a bf16 copy faster (the
# copy a CPU gets where fbgemm's product is missing); more make a matrix product that such
# CPUs emulate in bf16: 16 queries took 20 ms in bf16, 10 in float32.
BF16_EMULATED_MAX_QUERIES = 4
_FLOAT32_ROUNDING = 2.0 ** -24  # unit roundoff: scores are accumulated and finished in float32
_BF16_ROUNDING = torch.finfo(torch.bfloat16).eps / 2


def _dots(bank: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """query [B, D] . bank [N, D] -> [B, N]. One query is a matrix-vector product: torch.mv reads
    the bank once, at memory speed; more are a product with the bank on the left (16 queries,
    17,703 x 512 float32 rows, 2-vCPU AVX2 EPYC: 5.1 ms, against 8.6 ms the other way round)."""
    return torch.mv(bank, query[0])[None] if query.shape[0] == 1 else (bank @ query.T).T


def _matmul_setting(device_type: str):
    """The torch.backends object whose fp32_precision governs float32 matrix products on
    `device_type` (torch 2.9 and later), else None."""
    backend = getattr(torch.backends.cuda if device_type == "cuda" else torch.backends.mkldnn, "matmul", None)
    return backend if hasattr(backend, "fp32_precision") else None


def _reduced_float32_products(device_type: str) -> bool:
    """Whether float32 products on `device_type` may take TF32 or bf16 passes: a setting a user
    (allow_tf32, set_float32_matmul_precision or fp32_precision) can make for the process."""
    backend = _matmul_setting(device_type)
    if backend is None:
        return torch.get_float32_matmul_precision() != "highest"
    parent = torch.backends.mkldnn if device_type != "cuda" else None
    for setting in (backend, parent, torch.backends):  # the first that is not "none" applies
        value = getattr(setting, "fp32_precision", "none")
        if value != "none":
            return value != "ieee"
    return False


@contextmanager
def _products_as_typed(device_type: str) -> Iterator[None]:
    """Matrix products in their tensors' own dtypes, as the scores' error bound assumes: no
    autocast, and no TF32 or bf16 passes for float32, the settings restored as they were. From
    torch 2.9 that is the backend's fp32_precision (which allow_tf32 and
    set_float32_matmul_precision set too; the latter's getter raises once it is used), before
    it the float32 matmul precision. It changes process-wide settings for the product (so
    SearchIndex.scores enters it only where they, or autocast, would change the product)."""
    backend = _matmul_setting(device_type)
    if backend is not None:
        precision = backend.fp32_precision
        backend.fp32_precision = "ieee"
        restore = partial(setattr, backend, "fp32_precision", precision)
    else:
        restore = partial(torch.set_float32_matmul_precision, torch.get_float32_matmul_precision())
        torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        restore()


@dataclass(frozen=True, eq=False)
class SearchIndex:
    """What the search of one bank needs, computed once per bank: its rows' squared norms,
    the terms of its scores' error bounds and, for a large bank on a CPU, a low-precision
    copy of the rows (int8 with a scale per row, or bf16 where the CPU computes bf16
    natively). One query reads the whole bank, so the copy cuts the memory traffic that bounds
    the search; the bound covers scores from either copy."""

    # The bank it was built from, held so that its memory is not reused while the index lives
    # (see built_from). Its values must not change: an index describes them as they were.
    source: torch.Tensor
    squared_norms: torch.Tensor  # [N] float32, on the bank's device
    # Every score's rounding error is at most |q| * error_slope + max|q_i| * error_peak_slope +
    # error_floor: one bound for all rows (from the largest row norm) costs a few multiplications
    # per query, not N. (The peak term is the int8 copy's: its query grid's step follows max|q_i|.)
    error_slope: float
    error_peak_slope: float
    error_floor: float
    # the slope of the bound for scores computed in float32 from the rows themselves (the first
    # pass of the re-ranking)
    float32_error_slope: float
    rows_bf16: torch.Tensor | None = None
    rows_int8: PackedRows | None = None  # fbgemm's packed int8 rows (see int8_scores)

    @classmethod
    def of(cls, bank: torch.Tensor) -> "SearchIndex":
        """The index of `bank`, with its copy (see _copy_kind) and the worst-case rounding of a
        score |b|^2 - 2 q.b, in any summation order, from that copy or from the bank: the dot
        product errs by at most what _dot_error (from the int8 copy, dot_error_terms) gives,
        the norms by gamma_D |b|^2 (float32 accumulation of D squares), and three float32
        roundings finish the score; 1.01 covers the second-order terms left out."""
        rows = bank.detach().float()
        squared = rows.pow(2).sum(1)
        largest = float(squared.max())
        if not math.isfinite(largest):  # the bound, and every score near such a row, would be NaN
            raise ValueError("project: the bank holds NaN or infinite values, or rows too long for float32 "
                             "squared norms (above about 1.8e19)")
        kind = _copy_kind(bank)
        rows_int8, residual = pack_rows(rows) if kind == "int8" else (None, 0.0)
        if kind == "int8" and rows_int8 is None:  # (the product failed its check on this bank)
            kind, residual = "bf16", 0.0
        rows_bf16 = rows.to(torch.bfloat16) if kind == "bf16" else None
        r, width = _FLOAT32_ROUNDING, bank.shape[1]
        gamma = _accumulation_rounding(width)
        longest = math.sqrt(largest)

        def score_slope(dot: float) -> float:  # a dot product's bound per |q|, and the score's three roundings
            return 1.01 * (2 * dot + 6 * r * longest)

        # Underflow, which the relative bounds above miss: each float32 operation of a norm, a dot
        # and the score may err by half float32's smallest subnormal (4D + 1 of them). A bf16
        # copy's query values and result err by up to half of bf16's, 2^-134 (a query value's
        # error meets at most |b'|_1 <= sqrt(D) |b'|), and its rows by as much again (meeting
        # |q|_1 <= sqrt(D) |q|: a slope). The int8 copy's dot product bounds its own (int8_scores).
        floor = (4 * width + 1) * 2.0 ** -150
        if kind == "int8":
            dot_slope, dot_peak_slope, dot_floor = dot_error_terms(width, longest, residual)
            slope, peak_slope = score_slope(dot_slope), 2 * dot_peak_slope
            floor += 2 * dot_floor
        else:
            slope, peak_slope = score_slope(_dot_error(kind, gamma, longest)), 0.0
            if kind == "bf16":
                floor += 2 * 2.0 ** -134 * (1 + math.sqrt(width) * longest)
                slope += 2 * 2.0 ** -134 * math.sqrt(width)
        return cls(bank, squared, slope, peak_slope, 1.01 * (gamma + 3 * r) * largest + floor,
                   score_slope(_dot_error(None, gamma, longest)), rows_bf16, rows_int8)

    def built_from(self, bank: torch.Tensor) -> bool:
        """Whether `bank` is the tensor this index was built from: the same memory seen the
        same way (a detached view counts)."""
        source = self.source
        return (bank.data_ptr() == source.data_ptr() and bank.shape == source.shape and bank.stride() == source.stride()
                and bank.dtype == source.dtype and bank.device == source.device)

    def scores(self, query: torch.Tensor, rows: torch.Tensor, target: np.ndarray | None = None) -> torch.Tensor:
        """|b|^2 - 2 q.b for every row b (the distance order, shifted by |q|^2), [B, N] in float32
        on the bank's device. `query` is of a floating dtype of at least float32's precision, and
        so is `rows` where it is read (a batch no copy scores), in the query's dtype; `target`,
        where the caller has it, is the query as _as_float64 gives it."""
        device_type = rows.device.type
        if self.copy_scoring(query.shape[0]) == "int8":  # (integer products: no setting changes them)
            # (checked finite first: the product's own quantisation fails on NaN)
            target = _as_float64(query.detach()) if target is None else target
            return torch.from_numpy(int8_scores(self.rows_int8, target, self.squared_norms.numpy()))
        if torch.is_autocast_enabled(device_type) or _reduced_float32_products(device_type):
            with _products_as_typed(device_type):
                dots = self._dots(query, rows)
        else:  # (as nearly always: no process-wide setting is touched)
            dots = self._dots(query, rows)
        return torch.sub(self.squared_norms.to(dots.device), dots, alpha=2)

    def copy_scoring(self, batch: int) -> str | None:
        """The copy that scores `batch` queries the fastest ("int8" or "bf16"), or None where the
        bank itself does (see LOW_PRECISION_ROWS and BF16_EMULATED_MAX_QUERIES)."""
        if self.rows_int8 is not None:
            return "int8"
        if self.rows_bf16 is not None and (batch <= BF16_EMULATED_MAX_QUERIES or native_bf16(self.rows_bf16.device)):
            return "bf16"
        return None

    def _dots(self, query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """query [B, D] . every row, [B, N], from the bf16 copy where copy_scoring names it (the
        int8 copy's scores come whole from int8_scores), else from the rows."""
        copy = self.copy_scoring(query.shape[0])
        if copy == "bf16":
            return _dots(self.rows_bf16, query.to(torch.bfloat16))
        return _dots(rows, query)

    def error_bound(self, lengths, peaks):
        """The bound on every score's rounding error for queries of `lengths` [B] (|q|) and
        `peaks` [B] (max |q_i|), [B]: numpy arrays on the host, float64 tensors on a GPU."""
        return lengths * self.error_slope + peaks * self.error_peak_slope + self.error_floor

    def float32_error_bound(self, lengths: np.ndarray) -> np.ndarray:
        """The bound on the rounding error of scores computed in float32 from the rows
        themselves, for queries of `lengths` [B], [B]."""
        return lengths * self.float32_error_slope + self.error_floor


def _accumulation_rounding(width: int) -> float:
    """gamma_D: the relative error bound of a float32 sum of `width` terms, in any order."""
    return width * _FLOAT32_ROUNDING / (1 - width * _FLOAT32_ROUNDING)


def _copy_kind(bank: torch.Tensor) -> str | None:
    """The low-precision copy a bank is scored from: none on a GPU or for a small bank; int8
    where the CPU lacks native bf16 and the copy runs for the bank's width (int8_copy_runs);
    else bf16."""
    if bank.shape[0] <= LOW_PRECISION_ROWS or bank.device.type != "cpu":
        return None
    return "int8" if not native_bf16(bank.device) and int8_copy_runs(bank.shape[1]) else "bf16"


def int8_copy_runs(width: int) -> bool:
    """Whether rows `width` wide can have the int8 copy here: fbgemm's product runs, and the
    width keeps its sums within int32."""
    return 1 <= width <= MAX_WIDTH and int8_product_runs()


def _dot_error(kind: str | None, gamma: float, longest: float) -> float:
    """The bound on |q.b - computed q.b| per unit of |q|, for rows up to `longest` long, from
    the bank (kind None) or its bf16 copy (the int8 copy's is int8_scores.dot_error_terms).

    float32 (no copy): float32 accumulation of D products, gamma_D |q||b| (Cauchy-Schwarz
    bounds sum |q_i b_i|). bf16 copy: rounding q and b to bf16 (unit roundoff u) errs by
    (2u + u^2)|q||b|, the accumulation by gamma_D (1 + u)^2 |q||b|, and the bf16 result
    rounds the float32 sum once more, by u times its size."""
    if kind is None:
        return gamma * longest
    u = _BF16_ROUNDING
    product = 2 * u + u * u + gamma * (1 + u) ** 2
    return (product + u * (1 + product)) * longest


class Neighbours(NamedTuple):
    """The k nearest bank rows of each of B queries, nearest first, as the projection uses them."""

    squared: np.ndarray  # [B, k] float64 squared distances
    indices: np.ndarray  # [B, k] int64 bank rows
    rows: np.ndarray  # [B, k, D] float64
    offsets: np.ndarray  # [B, k, D] float64: each row minus its query


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors on the host. CUDA tensors are copied without blocking and waited for once
    for all: a GPU search waiting on each of its small copies in turn spent most of its time
    waiting."""
    devices = {tensor.device for tensor in tensors if tensor.is_cuda}
    if not devices:
        return [tensor.cpu() for tensor in tensors]
    copies = [tensor.to("cpu", non_blocking=tensor.is_cuda) for tensor in tensors]
    for device in devices:
        torch.cuda.current_stream(device).synchronize()
    return copies


class _BankSearch:
    """The k nearest bank rows of each query of one [B, D] batch, in the steps `_search_all`
    runs for every batch in turn: scoring (on the bank's device), choosing candidates (on the
    host, from the scores), re-ranking them (on the host, from their rows).

    The bank is scored with one matrix product, whose rounding (from an int8 or bf16 copy above
    all) can reorder rows whose scores lie close together. A row is kept as a candidate when
    its score lies within twice the error bound of the k-th best score (within the bound of
    the k-th best bound, which is at least the true k-th best score); candidates scored from a
    copy are scored again from their own rows under the much tighter float32 bound, and those
    left are re-ranked by distances computed directly in float64: the search is exact, and a
    bank vector is always its own nearest neighbour, at distance 0. Every step after the product is one numpy
    operation over the whole batch's candidates: small operations cost microseconds in numpy
    where torch's cost tens, and one query spends about as long on them as the product takes
    to read a 17.7K bank."""

    def __init__(self, query: torch.Tensor, bank: torch.Tensor, k: int, index: SearchIndex | None):
        check_index(index, bank)
        query, rows = query.detach(), bank.detach()  # numpy takes no tensors that require grad
        if rows.device != query.device:  # (an index describes the bank where it is, not a copy of it)
            rows, index = rows.to(query.device), None
        self.query, self.rows = query, rows
        self.count = min(k, rows.shape[0])
        self.index = self.scores = self.copy = None  # copy: the low-precision copy that scored the batch
        self.target = None  # the query in float64 on the host (see choose)
        if self.count < rows.shape[0]:
            work = torch.promote_types(torch.promote_types(query.dtype, rows.dtype), torch.float32)
            self.index = index or SearchIndex.of(rows)
            # (a low-precision copy leaves the bank unread: a float64 copy of it had cost 40 ms a search)
            self.copy = self.index.copy_scoring(len(query))
            if self.copy == "int8":  # (its product takes the float64 query: converted once, for choose too)
                self.target = _as_float64(query)
            as_read = rows if rows.dtype == work or self.copy else rows.to(work)
            self.scores = self.index.scores(query if query.dtype == work else query.to(work), as_read, self.target)

    def score_tensors(self) -> list[torch.Tensor]:
        """What the host needs to choose candidates: the query, and the scores if any."""
        return [self.query] if self.scores is None else [self.query, self.scores]

    def choose(self, fetched: list[torch.Tensor]) -> None:
        """Choose the candidates from the fetched `score_tensors`: `owners` (the query of each)
        and `candidates` (its bank row), flat, by query and then by row."""
        if self.target is None:
            self.target = _as_float64(fetched[0])
        batch = len(self.target)
        if self.scores is None:  # every row is a neighbour
            self.owners, self.candidates = np.repeat(np.arange(batch), self.count), np.tile(np.arange(self.count), batch)
            return
        scores = fetched[1].numpy()
        self.lengths = np.sqrt(np.square(self.target).sum(1))  # (einsum's parsing alone took 15 us)
        peaks = np.abs(self.target).max(1)
        limits = (np.partition(scores, self.count - 1, axis=1)[:, self.count - 1:self.count]
                  + 2 * self.index.error_bound(self.lengths, peaks)[:, None])
        chosen = scores <= limits  # (finite scores choose `count` rows or more: the k-th best is among them)
        # NaN or infinite scores (products of huge values overflowed) leave no bound to choose by
        short = ~np.isfinite(scores).all(1)
        if short.any():
            chosen[short] = True  # every row, re-ranked in float64
        # (flat: np.nonzero of the 2-D mask took 73 us for one query against 17,703 rows, this 11)
        self.owners, self.candidates = np.divmod(np.flatnonzero(chosen), scores.shape[1])

    def row_tensors(self) -> list[torch.Tensor]:
        """The candidates' rows, for a bank numpy cannot view (on a GPU, or in a low precision)."""
        if self._viewable():
            return []
        return [self.rows[torch.from_numpy(self.candidates).to(self.rows.device, non_blocking=True)].double()]

    def rerank(self, fetched: list[torch.Tensor]) -> Neighbours:
        """Each query's `count` nearest candidates by float64 distances, from the fetched
        `row_tensors`. Each query takes its own candidates, however many another needs."""
        # (a view of the bank: gathering the candidates copies only them)
        picked = self.rows.numpy()[self.candidates] if self._viewable() else fetched[0].numpy()
        owners, candidates = self.owners, self.candidates
        if self.copy is not None:
            kept = self._closest_in_float32(picked)
            picked, owners, candidates = picked[kept], owners[kept], candidates[kept]
        offsets = picked - self.target[owners]  # float64, as target is: exact for float32 rows and query
        squared = np.einsum("td,td->t", offsets, offsets)
        order = np.lexsort((squared, owners))  # by query, then distance; ties keep the lower bank row first
        nearest = order[_firsts(owners, len(self.target))[:, None] + np.arange(self.count)]  # [B, count]
        return Neighbours(squared[nearest], candidates[nearest], picked[nearest].astype(np.float64, copy=False),
                          offsets[nearest])

    def _closest_in_float32(self, picked: np.ndarray) -> np.ndarray:
        """Which candidates stay, by their scores computed again from their own rows in float32
        (or float64, for a float64 bank or query), under the much tighter bound of those
        scores: the choice of candidates again, now among a few hundred rows instead of the
        bank. Float64 distances then cost about 10 rows per query instead of 30-200 (100-200 from
        torch's weight-only int8 kernel's copy, where this pass saved 0.4 ms of a 1.7 ms search
        against 17,703 vectors on a 2-vCPU AVX2 EPYC; 30-100 from fbgemm's, where it saves
        little)."""
        exact_in_float32 = picked.dtype == np.float32 and self.query.dtype != torch.float64
        rows = picked if exact_in_float32 else picked.astype(np.float64)
        target = self.target.astype(rows.dtype)
        with np.errstate(over="ignore", invalid="ignore"):  # (overflowed scores are handled below)
            dots = rows @ target[0] if len(target) == 1 else np.einsum("td,td->t", rows, target[self.owners])
            # the index's norms where numpy can read them (the same float32 sums), else the rows'
            norms = (self.index.squared_norms.numpy()[self.candidates] if self._viewable()
                     else np.einsum("td,td->t", rows, rows))
            scores = norms - 2 * dots
        order = np.lexsort((scores, self.owners))
        kth = scores[order[_firsts(self.owners, len(target)) + self.count - 1]]
        kept = scores <= (kth + 2 * self.index.float32_error_bound(self.lengths))[self.owners]
        doubtful = ~np.isfinite(scores)  # float32 products of huge values overflowed: keep the query's every candidate
        if doubtful.any():
            kept |= np.isin(self.owners, self.owners[doubtful])
        return kept

    def _viewable(self) -> bool:
        return self.rows.device.type == "cpu" and self.rows.dtype in (torch.float32, torch.float64)


def _firsts(owners: np.ndarray, batch: int) -> np.ndarray:
    """Where each of `batch` queries' entries start in `owners` (sorted; each query has some)."""
    return np.searchsorted(owners, np.arange(batch))


def _search_all(requests: Sequence[tuple[torch.Tensor, torch.Tensor, SearchIndex | None]], k: int
                ) -> list[Neighbours]:
    """For each (query [B, D], bank [N, D], index or None): the k nearest bank rows of each
    query row. Every bank is scored before any result is read, so a GPU is waited for twice in
    all, not twice per bank."""
    searches = [_BankSearch(query, bank, k, index) for query, bank, index in requests]
    _fetch_each(searches, _BankSearch.score_tensors, _BankSearch.choose)
    return _fetch_each(searches, _BankSearch.row_tensors, _BankSearch.rerank)


def _fetch_each(searches: list[_BankSearch], wanted, then) -> list:
    """`then(search, tensors)` for each search, with the `wanted(search)` tensors of all of
    them brought to the host together."""
    lists = [wanted(search) for search in searches]
    fetched = iter(_to_host([tensor for tensors in lists for tensor in tensors]))
    return [then(search, [next(fetched) for _ in tensors]) for search, tensors in zip(searches, lists)]


# torch dtypes that numpy shares: values in these convert in numpy, a few microseconds cheaper
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _as_float64(query: torch.Tensor) -> np.ndarray:
    """The (host) query as float64 numpy, checked finite (the check costs microseconds here,
    not tens)."""
    target = query.numpy().astype(np.float64) if query.dtype in _NUMPY_DTYPES else query.double().numpy()
    if not np.isfinite(target).all():
        raise ValueError("project: the query contains NaN or infinite values")
    return target


def _as_query(values: np.ndarray, query: torch.Tensor) -> torch.Tensor:
    """float64 `values` as a tensor of the query's dtype and device."""
    if query.device.type == "cpu" and query.dtype in _NUMPY_DTYPES:
        return torch.from_numpy(values.astype(_NUMPY_DTYPES[query.dtype], copy=False))
    # a GPU copies from the host while the next upload is prepared (numpy's memory is staged)
    return torch.from_numpy(values).to(device=query.device, non_blocking=True).to(query.dtype)


def _indices(found: Neighbours, query: torch.Tensor) -> torch.Tensor:
    """The neighbours' bank rows [B, k] as a LongTensor on the query's device."""
    indices = torch.from_numpy(found.indices)
    return indices if query.device.type == "cpu" else indices.to(query.device, non_blocking=True)


def nearest(query: torch.Tensor, bank: torch.Tensor, k: int,
            index: SearchIndex | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances [B, k], indices [B, k]) of the k nearest bank rows by L2, nearest first.
    Pass the bank's `index` (e.g. from FeatureBank.index) to reuse it across queries."""
    [found] = _search_all([(query, bank, index)], k)
    return _as_query(np.sqrt(found.squared), query), _indices(found, query)


def project(query: torch.Tensor, bank: torch.Tensor, k: int = 10, eps: float = 1e-3,
            method: str = "anchored", index: SearchIndex | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project each query latent onto the bank's manifold.

    query [B, D], bank [N, D] -> (projected [B, D], indices LongTensor [B, k], weights [B, k]),
    neighbours nearest first, weights summing to 1 (possibly negative). k larger than N uses
    all N rows (the returned tensors then have N columns). See the module docstring for the
    two `method`s and what `eps` regularises; `index` as for `nearest`."""
    return project_many([(query, bank, index)], k, eps, method)[0]


def project_many(requests: Sequence[tuple[torch.Tensor, torch.Tensor, SearchIndex | None]], k: int = 10,
                 eps: float = 1e-3, method: str = "anchored"
                 ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`project` for several (query, bank, index) at once, e.g. every component of a sketch:
    the same results. Requests of DEVICE_MIN_QUERIES or more queries whose query and bank are
    on one GPU are computed there (see projection_on_device); the others, and any the GPU
    could not settle, are searched here, every bank scored before any result is read."""
    for query, bank, _ in requests:
        _check_projection_inputs(query, bank, k, eps, method)
    computed: list = [None] * len(requests)
    if any(_computed_on_device(query, bank) for query, bank, _ in requests):
        from .projection_on_device import project_on_device

        computed = [project_on_device(query, bank, k, eps, method, index) if _computed_on_device(query, bank)
                    else None for query, bank, index in requests]
    return settle(requests, computed, k, eps, method)


def settle(requests: Sequence[tuple[torch.Tensor, torch.Tensor, SearchIndex | None]], computed: Sequence,
           k: int, eps: float, method: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each request's (projected, indices, weights): from `computed` where it holds
    projection_on_device's results for it and their trust flag is set (the flags are read
    back together: one wait for the device), else searched here."""
    results: list = [None] * len(requests)
    on_device = [number for number, result in enumerate(computed) if result is not None]
    for number, trusted in zip(on_device, _to_host([computed[number][3] for number in on_device])):
        if trusted:
            results[number] = tuple(computed[number][:3])
    on_host = [number for number, result in enumerate(results) if result is None]
    for number, found in zip(on_host, _search_all([requests[number] for number in on_host], k)):
        query = requests[number][0]
        weights = _lle_weights(found, eps, method)
        projected = np.einsum("bk,bkd->bd", weights, found.rows)
        results[number] = (_as_query(projected, query), _indices(found, query), _as_query(weights, query))
    return results


# The fewest queries project_many computes on a GPU. Its device way launches about 60 kernels
# a bank whatever the batch, where the host's way costs per query: five banks of the released
# sizes took 6.0 ms the device's way at 1 and 16 queries on an H200, the host's way 2.9 ms at
# 1 and 14.7 ms at 16. (SketchToFace searches on its GPU at any batch where its search is
# replayed as a CUDA graph, one launch; elsewhere it calls project_many.)
DEVICE_MIN_QUERIES = 8


def _computed_on_device(query: torch.Tensor, bank: torch.Tensor) -> bool:
    """Whether project_many computes this request on its device: a GPU holding both, and
    enough queries to pay for the launches."""
    return query.is_cuda and bank.device == query.device and query.shape[0] >= DEVICE_MIN_QUERIES


def _lle_weights(neighbours: Neighbours, eps: float, method: str) -> np.ndarray:
    """Locally linear weights [B, k] (each row summing to one) of each query's neighbours."""
    batch, count = neighbours.indices.shape
    offsets = neighbours.offsets
    if count == 1:
        return np.ones((batch, 1))
    if method == "anchored":
        # the spans from the rows themselves: from the offsets they would cancel for a query
        # far from a tight group of neighbours
        spans = neighbours.rows[:, 1:] - neighbours.rows[:, :1]  # [B, k-1, D]
        grams = _with_ridge(spans @ spans.transpose(0, 2, 1), eps)
        steps = np.linalg.solve(grams, spans @ -offsets[:, 0, :, None])[..., 0]
        return np.concatenate([1 - steps.sum(1, keepdims=True), steps], axis=1)
    raw = np.linalg.solve(_with_ridge(offsets @ offsets.transpose(0, 2, 1), eps), np.ones((batch, count, 1)))[..., 0]
    return raw / raw.sum(1, keepdims=True)


def check_refine(refine, name: str = "refine") -> float:
    """`refine` as a float in [0, 1], or a one-line ValueError."""
    if isinstance(refine, bool) or not isinstance(refine, (int, float)) or not 0.0 <= refine <= 1.0:
        raise ValueError(f"{name} must be a number from 0 (raw sketch) to 1 (fully projected), got {refine!r}")
    return float(refine)


def blend(f: torch.Tensor, f_proj: torch.Tensor, refine: float) -> torch.Tensor:
    """refine * f_proj + (1 - refine) * f; refine 0 returns `f`, 1 returns `f_proj` unchanged."""
    refine = check_refine(refine)
    if f.shape != f_proj.shape:
        raise ValueError(f"blend: raw latents {list(f.shape)} and projected {list(f_proj.shape)} differ in shape")
    if refine == 0.0:
        return f
    if refine == 1.0:
        return f_proj
    return refine * f_proj + (1.0 - refine) * f


__all__ = ["ALL", "DEVICE_MIN_QUERIES", "METHODS", "FeatureBank", "SearchIndex", "blend", "check_index", "check_refine", "int8_copy_runs",
           "nearest", "project", "project_many", "settle"]
