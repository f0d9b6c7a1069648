"""Shadow guidance (DESIGN section 3, "Interactive use"): a faint picture of where plausible
lines would go, drawn under the user's strokes.

For each component, the K bank vectors nearest to the sketch's latent are decoded with that
component's image decoder and blended with their locally linear weights (negative weights
skipped, the rest renormalised); each window's blend fades towards the window border, and the
five are combined by taking the darkest value at each pixel.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch

from dfd_data.components import COMPONENTS
from dfd_data.devices import compute_precision

from .sketch_to_face import Match, SketchToFace

# Share of a window's side over which its shadow fades out towards the border.
FADE_FRACTION = 0.2
# Decoded neighbours kept per component (the remainder's are 512 x 512 float16: 0.5 MiB each).
CACHE_PER_COMPONENT = 64


def _fade_mask(size: int, device) -> torch.Tensor:
    """1 in the middle of a size x size window, falling linearly to 0 at its border."""
    ramp = torch.arange(size, dtype=torch.float32, device=device)
    distance = torch.minimum(ramp + 0.5, size - 0.5 - ramp) / max(1.0, FADE_FRACTION * size)
    edge = distance.clamp(0, 1)
    return edge[:, None] * edge[None, :]


class ShadowRenderer:
    """Shadows for one model. Decoding neighbours dominates the cost (at 512 px the remainder's
    image decoder is the largest network after the generator), and successive strokes mostly
    retrieve the same neighbours, so decoded neighbours are kept in a small LRU cache per
    component; only neighbours with a positive weight are decoded at all."""

    def __init__(self, model: SketchToFace, capacity: int = CACHE_PER_COMPONENT):
        self.model, self.capacity = model, capacity
        self._cache: dict[str, OrderedDict] = {name: OrderedDict() for name in COMPONENTS}
        self._banks = None

    def _ink(self, name: str, gender: str | None, indices: list[int]) -> dict[int, torch.Tensor]:
        """Bank row -> decoded ink [S, S] (float16, 1 = black) for the rows asked for."""
        if self.model.banks is not self._banks:  # new banks: row numbers mean other vectors
            self._banks = self.model.banks
            for cache in self._cache.values():
                cache.clear()
        cache = self._cache[name]
        missing = sorted({i for i in indices if (gender, i) not in cache})
        if missing:
            device = next(self.model.parameters()).device
            bank = self.model.banks.get(name, gender)
            with compute_precision(self.model, device):  # the decoders are most of the cost
                decoded = self.model.autoencoders[name].decode(bank[missing].to(device, self.model.io_dtype))
            for row, image in zip(missing, ((1 - decoded[:, 0].float()) / 2).clamp(0, 1).half()):
                cache[(gender, row)] = image
        found = {}
        for row in indices:
            cache.move_to_end((gender, row))
            found[row] = cache[(gender, row)]
        while len(cache) > self.capacity:
            cache.popitem(last=False)
        return found

    @torch.inference_mode()
    def darkness(self, sketch, gender: str | None = None) -> torch.Tensor:
        """Sketch (as SketchToFace accepts) -> darkness [B, R, R] in [0, 1] (1 = black line).

        Needs a model with feature banks; raises ValueError otherwise (encode_and_match)."""
        return self.darkness_of(self.model.encode_and_match(sketch, gender=gender)[1], gender)

    @torch.inference_mode()
    def darkness_of(self, matches: Mapping[str, Match], gender: str | None = None) -> torch.Tensor:
        """Darkness [B, R, R] from every component's neighbours (SketchToFace.encode_and_match
        with the same gender)."""
        windows = self.model.config.windows()
        batch, device = matches["remainder"].indices.shape[0], matches["remainder"].indices.device
        resolution = self.model.config.resolution
        darkness = torch.zeros(batch, resolution, resolution, device=device)
        for name in COMPONENTS:
            indices, weights = matches[name]
            positive = weights.clamp(min=0)
            positive = positive / positive.sum(1, keepdim=True).clamp(min=1e-12)
            window = windows[name]
            wanted = [int(i) for i, w in zip(indices.flatten(), positive.flatten()) if w > 0]
            ink = self._ink(name, gender, wanted)
            blended = torch.zeros(batch, window.size, window.size, device=device)
            for item in range(batch):
                for row, weight in zip(indices[item].tolist(), positive[item].tolist()):
                    if weight > 0:
                        blended[item] += weight * ink[row].float()
            if name != "remainder":
                blended = blended * _fade_mask(window.size, device)
            area = (slice(None), slice(window.y, window.y + window.size), slice(window.x, window.x + window.size))
            darkness[area] = torch.maximum(darkness[area], blended)
        return darkness

    def image(self, sketch, gender: str | None = None) -> torch.Tensor:
        """The shadows as uint8 gray pictures [B, R, R] (255 paper, darker where lines are likely)."""
        return _as_picture(self.darkness(sketch, gender))

    def image_of(self, matches: Mapping[str, Match], gender: str | None = None) -> torch.Tensor:
        """`image` from neighbours already found (see darkness_of)."""
        return _as_picture(self.darkness_of(matches, gender))


def _as_picture(darkness: torch.Tensor) -> torch.Tensor:
    return (255 - darkness * 255).round().clamp(0, 255).to(torch.uint8).cpu()


def shadow_image(model: SketchToFace, sketch, gender: str | None = None) -> torch.Tensor:
    """One-off shadows (no cache kept): uint8 [B, R, R], 255 paper."""
    return ShadowRenderer(model).image(sketch, gender)


__all__ = ["ShadowRenderer", "shadow_image"]
