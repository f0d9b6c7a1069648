"""The whole DeepFaceDrawing inference pipeline as one module: sketch in, RGB face out.

    model = SketchToFace.from_pretrained("runs/celeba-512")       # or SketchToFace(ModelConfig())
    with torch.inference_mode():
        face = model(sketch_uint8, refine={"nose": 0.5}, gender="female")   # [B, 3, R, R] in [-1, 1]

Steps: crop the four feature windows and the remainder (the whole sketch with those windows
painted white), encode each with its component encoder, project each latent onto its
component's feature bank and blend (skipped without banks), decode each latent to a feature
map, fuse the maps by hard overwrite, and run the generator.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Mapping, NamedTuple

import torch
from torch import nn

from dfd_data.components import COMPONENTS
from dfd_data.devices import compute_precision

from .config import ModelConfig
from .cuda_graphs import CudaGraphs, graphs_apply
from .networks import ComponentAutoEncoder, FeatureDecoder, GlobalGenerator, fuse_feature_maps, normalize_sketch
from .projection import FeatureBank, blend, check_refine, project_many, settle
from .projection_on_device import project_on_device

# Float sketches must already be normalised; allow a little slack around [-1, 1].
_FLOAT_RANGE_SLACK = 1e-3


class Match(NamedTuple):
    """A component's neighbours in its bank: rows [B, k], nearest first, and their locally
    linear weights [B, k] (summing to 1)."""
    indices: torch.Tensor
    weights: torch.Tensor


def prepare_sketch(sketch, resolution: int) -> torch.Tensor:
    """A sketch batch as float [B, 1, R, R] in [-1, 1] (paper +1, ink -1).

    Accepts a tensor or numpy array shaped [R, R], [B, R, R] or [B, 1, R, R]: uint8 pixels
    (0 ink .. 255 paper) are normalised; floats must already be in [-1, 1]."""
    tensor = torch.as_tensor(sketch)
    if tensor.ndim == 2:
        tensor = tensor[None, None]
    elif tensor.ndim == 3:
        tensor = tensor[:, None]
    if tensor.ndim != 4 or tensor.shape[1] != 1 or tuple(tensor.shape[2:]) != (resolution, resolution):
        raise ValueError(f"expected sketches shaped [B, 1, {resolution}, {resolution}] (or [B, {resolution}, "
                         f"{resolution}] or one [{resolution}, {resolution}]), got {list(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        return normalize_sketch(tensor)
    if not torch.is_floating_point(tensor):
        raise ValueError(f"sketches must be uint8 pixels or floats in [-1, 1], got {tensor.dtype}")
    if tensor.device.type != "meta" and tensor.numel():
        low, high = float(tensor.min()), float(tensor.max())
        if not (-1 - _FLOAT_RANGE_SLACK <= low and high <= 1 + _FLOAT_RANGE_SLACK):
            raise ValueError(f"float sketches must be normalised to [-1, 1] (paper +1, ink -1), got values "
                             f"{low:g}..{high:g}; pass uint8 pixels to have them normalised")
    return tensor


def searches_on_device(device: torch.device) -> bool:
    """Whether a model on `device` searches its banks there (projection_on_device) rather than
    on the host: on a GPU."""
    return device.type == "cuda"


def crop_sketch_components(sketch: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Normalised sketches [B, 1, R, R] -> component name -> crop [B, 1, S, S].

    The remainder is the whole sketch with the four feature windows set to paper (+1), as in
    training; the input is not modified."""
    windows = config.windows()
    crops = {}
    remainder = sketch.clone()
    for name in COMPONENTS:
        if name == "remainder":
            continue
        w = windows[name]
        crops[name] = sketch[:, :, w.y:w.y + w.size, w.x:w.x + w.size]
        remainder[:, :, w.y:w.y + w.size, w.x:w.x + w.size] = 1.0
    crops["remainder"] = remainder
    return crops


class SketchToFace(nn.Module):
    """Five component auto-encoders (their encoders serve inference, their image decoders
    stage 1 training and shadows), five feature decoders, the generator, and optional banks.

    `banks`, when given, must cover all five components with latents of `latent_dim`; they
    follow the module across `.to()` and are saved beside the weights, not in the state dict.
    """

    # What the networks and the bank search compute in; from_pretrained may choose bf16.
    compute_dtype: torch.dtype = torch.float32
    # On a CUDA device, a model rewritten for inference (from_pretrained) replays its encoders
    # and its synthesis as CUDA graphs under inference mode (see cuda_graphs); False: eagerly.
    use_cuda_graphs: bool = True

    def __init__(self, config: ModelConfig = ModelConfig(), banks: FeatureBank | None = None):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        sizes = config.component_sizes()
        self.autoencoders = nn.ModuleDict({name: ComponentAutoEncoder(sizes[name], config) for name in COMPONENTS})
        self.feature_decoders = nn.ModuleDict({name: FeatureDecoder(sizes[name], config) for name in COMPONENTS})
        self.generator = GlobalGenerator(config)
        self._feature_banks: FeatureBank | None = None
        self.set_banks(banks)

    # ---- banks -------------------------------------------------------------------------------
    @property
    def banks(self) -> FeatureBank | None:
        """The feature banks the projection searches (None: sketches are used as drawn).
        Assigning them calls set_banks."""
        return self._feature_banks

    @banks.setter
    def banks(self, banks: FeatureBank | None) -> None:
        self.set_banks(banks)

    def set_banks(self, banks: FeatureBank | None) -> None:
        """Attach (or with None remove) the feature banks used by the projection."""
        if banks is not None:
            if not isinstance(banks, FeatureBank):
                raise TypeError(f"banks must be a FeatureBank, got {type(banks).__name__}")
            missing = [name for name in COMPONENTS if name not in banks.components]
            if missing:
                raise ValueError(f"feature banks lack the component{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
            extra = [name for name in banks.components if name not in COMPONENTS]
            if extra:
                raise ValueError(f"feature banks have unknown components {', '.join(extra)}")
            if banks.latent_dim != self.config.latent_dim:
                raise ValueError(f"feature banks hold {banks.latent_dim}-value latents, the model "
                                 f"{self.config.latent_dim}")
            parameter = next(self.parameters(), None)
            if parameter is not None and parameter.device.type != "meta":
                banks = banks.to(parameter.device)
        self._feature_banks = banks
        self.cuda_graphs = CudaGraphs()  # a graph of the search reads the banks it was captured with

    @property
    def io_dtype(self) -> torch.dtype:
        """The dtype sketches, latents and faces are passed in: float32 for a model rewritten
        for inference (its weights are stored in its compute dtype, its results are not), else
        its parameters' dtype."""
        if getattr(self, "rewritten_for_inference", False):
            return torch.float32
        return next(self.parameters()).dtype

    @property
    def genders(self) -> tuple[str, ...]:
        """Genders every component's bank has (empty without banks)."""
        return self.banks.genders() if self.banks is not None else ()

    def _apply(self, fn, *args, **kwargs):
        # `.to()`, `.cuda()`, `.half()` and friends go through here: move the banks as well.
        result = super()._apply(fn, *args, **kwargs)
        if self.banks is not None:
            self._feature_banks = self.banks.apply(fn)
        self.cuda_graphs = CudaGraphs()  # frees at once the graphs of the weights this replaced
        return result

    # ---- pipeline ----------------------------------------------------------------------------
    def _refine_per_component(self, refine) -> dict[str, float]:
        if isinstance(refine, Mapping):
            unknown = [str(name) for name in refine if name not in COMPONENTS]
            if unknown:
                raise ValueError(f"refine has unknown components {', '.join(unknown)} (known: {', '.join(COMPONENTS)})")
            return {name: check_refine(refine.get(name, 1.0), f"refine[{name!r}]") for name in COMPONENTS}
        value = check_refine(refine)
        return {name: value for name in COMPONENTS}

    def encode(self, sketch, refine: float | Mapping[str, float] = 1.0,
               gender: str | None = None) -> dict[str, torch.Tensor]:
        """Sketches -> component name -> latent [B, latent_dim], projected and blended.

        sketch: uint8 pixels (0 ink .. 255 paper) or floats in [-1, 1]; [B, 1, R, R], [B, R, R]
            or [R, R].
        refine: 0 (use the sketch as drawn) .. 1 (fully projected onto the training data),
            one number or per component (missing components take 1). Ignored without banks.
        gender: which bank to search (see `genders`); None searches every vector.
        """
        return self._encode(sketch, refine, gender, match_all=False)[0]

    def encode_and_match(self, sketch, refine: float | Mapping[str, float] = 1.0, gender: str | None = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Match]]:
        """`encode`, and every component's neighbours in its bank, whatever its refine (what
        shadow guidance draws: one encoding serves both). Needs banks (ValueError otherwise)."""
        if self.banks is None:
            raise ValueError("matching sketches (and shadow guidance) needs a model with feature banks "
                             "(train stage 1 to make them)")
        return self._encode(sketch, refine, gender, match_all=True)

    def _encode(self, sketch, refine, gender, match_all: bool
                ) -> tuple[dict[str, torch.Tensor], dict[str, Match]]:
        weights = self._refine_per_component(refine)
        if gender is not None and not isinstance(gender, str):
            raise ValueError(f"gender must be a string or None, got {gender!r}")
        device, io_dtype = next(self.parameters()).device, self.io_dtype
        x = prepare_sketch(sketch, self.config.resolution).to(device=device, dtype=io_dtype)
        searched = [name for name in COMPONENTS if self.banks is not None and (match_all or weights[name] > 0)]
        settings = (self.config.knn, self.config.lle_eps, self.config.projection)
        if searched and self._searches_on_device(x):
            # the banks that have this gender are searched after the encoders, in one step (one
            # graph); a step per gender and settings, as a graph keeps the banks and values it met
            for name in searched:
                self.banks.get(name, gender)  # (a gender one lacks: its error, before any work)
            searchable = [name for name in COMPONENTS if gender is None or gender in self.banks.genders(name)]
            step = f"encode and search {', '.join(searchable)} ({gender!r}; {settings})"
            encoded = self._step(step, partial(self._encode_and_search, searchable, gender), x)
            latents = dict(zip(COMPONENTS, encoded[:len(COMPONENTS)]))
            searches = encoded[len(COMPONENTS):]
            computed = {name: searches[4 * number:4 * number + 4] for number, name in enumerate(searchable)}
            found = settle([self._request(name, latents[name], gender) for name in searched],
                           [computed.get(name) for name in searched], *settings)
        else:
            latents = dict(zip(COMPONENTS, self._step("encode", self._encode_components, x)))
            found = project_many([self._request(name, latents[name], gender) for name in searched], *settings)
        matches = {}
        for name, (projected, indices, lle_weights) in zip(searched, found):
            matches[name] = Match(indices, lle_weights)
            latents[name] = blend(latents[name], projected, weights[name])
        return latents, matches

    def _request(self, name: str, latent: torch.Tensor, gender: str | None) -> tuple:
        """(latent, bank, index): what project_many and settle take to search `name`'s bank."""
        return latent, self.banks.get(name, gender), self.banks.index(name, gender)

    def _searches_on_device(self, x: torch.Tensor) -> bool:
        """Whether the banks are searched on the model's device with the encoders, as one step
        (they are there: set_banks and .to() move them): on a GPU, where that step replays as a
        graph. Elsewhere project_many decides (on a GPU, by the batch: DEVICE_MIN_QUERIES)."""
        return searches_on_device(x.device) and self._graphs_apply((x,))

    def _encode_and_search(self, searched: list[str], gender: str | None, x: torch.Tensor
                           ) -> tuple[torch.Tensor, ...]:
        """`_encode_components`, then the projection_on_device results of each `searched`
        component (four tensors each), all queued on the GPU without waiting for it."""
        latents = self._encode_components(x)
        results = list(latents)
        for name, latent in zip(COMPONENTS, latents):
            if name not in searched:
                continue
            query, bank, index = self._request(name, latent, gender)
            results += project_on_device(query, bank, self.config.knn, self.config.lle_eps, self.config.projection,
                                         index)
        return tuple(results)

    def _encode_components(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normalised sketches -> each component's latent as its encoder gives it, in COMPONENTS
        order and `io_dtype`."""
        crops = crop_sketch_components(x, self.config)
        with compute_precision(self, x.device):
            return tuple(self.autoencoders[name].encoder(crops[name]).to(self.io_dtype) for name in COMPONENTS)

    def synthesize(self, latents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Component latents -> RGB faces [B, 3, R, R] in [-1, 1] (feature decoders, fusion,
        generator), in `io_dtype`. Like the encoders, this step, nearly all of the inference
        work, computes in the dtype from_pretrained chose."""
        return self._step("synthesize", self._synthesize, *(latents[name] for name in COMPONENTS))[0]

    def _synthesize(self, *latents: torch.Tensor) -> tuple[torch.Tensor]:
        with compute_precision(self, next(self.parameters()).device):
            maps = {name: self.feature_decoders[name](latent) for name, latent in zip(COMPONENTS, latents)}
            face = self.generator(fuse_feature_maps(maps, self.config))
        return (face.to(self.io_dtype),)

    def _step(self, name: str, function, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`function(*inputs)`, replayed as a CUDA graph where that applies (`use_cuda_graphs`)."""
        if self._graphs_apply(inputs):
            return self.cuda_graphs.run(self, name, function, *inputs)
        if not self.use_cuda_graphs and self.cuda_graphs.in_use:
            self.cuda_graphs = CudaGraphs()  # turned off: free the graphs and what they hold
        return function(*inputs)

    def _graphs_apply(self, inputs: tuple[torch.Tensor, ...]) -> bool:
        return (self.use_cuda_graphs and getattr(self, "rewritten_for_inference", False) and graphs_apply(inputs)
                and not self.cuda_graphs.failed)

    def draw(self, latents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Component latents -> the sketch they stand for [B, 1, R, R] in [-1, 1]: each component's
        image decoder output on its window, the remainder underneath (what a projected sketch
        looks like; stage 1's reconstructions). Computes as `synthesize` does."""
        with compute_precision(self, next(self.parameters()).device):
            images = {name: self.autoencoders[name].decode(latents[name]) for name in COMPONENTS}
            drawn = fuse_feature_maps(images, self.config)  # composed as the face's feature maps are
        return drawn.to(self.io_dtype).clamp(-1, 1)

    def forward(self, sketch, refine: float | Mapping[str, float] = 1.0, gender: str | None = None) -> torch.Tensor:
        """Sketches -> RGB faces [B, 3, R, R] in [-1, 1]; arguments as for `encode`."""
        return self.synthesize(self.encode(sketch, refine, gender))

    # ---- persistence -------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, trained: dict | None = None) -> None:
        """Write config.json, model.safetensors and (with banks) banks.safetensors to `folder`
        (`trained`: see checkpoint.save_pretrained)."""
        from .checkpoint import save_pretrained

        save_pretrained(self, folder, trained)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "auto",
                        precision: str = "auto") -> "SketchToFace":
        """Rebuild a model saved by `save_pretrained` from the folder alone, ready for
        inference (eval mode, channels-last, bf16 where the hardware has it natively unless
        `precision` is "fp32"; see dfd_data.devices.resolve_precision)."""
        from .checkpoint import load_pretrained

        return load_pretrained(folder, device, precision)


__all__ = ["SketchToFace", "crop_sketch_components", "prepare_sketch"]
