"""Shadow guidance (DESIGN section 3, "Interactive use"): a faint picture of where plausible
lines would go, drawn under the user's strokes.

For each component, the K bank vectors nearest to the sketch's latent are decoded with that
component's image decoder and blended with their locally linear weights (negative weights
skipped, the rest renormalised); each window's blend fades towards the window border, and the
five are combined by taking the darkest value at each pixel.
"""
from __future__ import annotations

import torch

from dfd_data.components import COMPONENTS

from .projection import project
from .sketch_to_face import SketchToFace, crop_sketch_components, prepare_sketch

# Share of a window's side over which its shadow fades out towards the border.
FADE_FRACTION = 0.2


def _fade_mask(size: int, device) -> torch.Tensor:
    """1 in the middle of a size x size window, falling linearly to 0 at its border."""
    ramp = torch.arange(size, dtype=torch.float32, device=device)
    distance = torch.minimum(ramp + 0.5, size - 0.5 - ramp) / max(1.0, FADE_FRACTION * size)
    edge = distance.clamp(0, 1)
    return edge[:, None] * edge[None, :]


@torch.inference_mode()
def shadow_darkness(model: SketchToFace, sketch, gender: str | None = None) -> torch.Tensor:
    """Sketch (as SketchToFace accepts) -> darkness [B, R, R] in [0, 1] (1 = black line).

    Needs a model with feature banks; raises ValueError otherwise."""
    if model.banks is None:
        raise ValueError("shadow guidance needs a model with feature banks (train stage 1 to make them)")
    parameter = next(model.parameters())
    x = prepare_sketch(sketch, model.config.resolution).to(device=parameter.device, dtype=parameter.dtype)
    crops = crop_sketch_components(x, model.config)
    windows = model.config.windows()
    batch, resolution = x.shape[0], model.config.resolution
    darkness = torch.zeros(batch, resolution, resolution, device=x.device)
    for name in COMPONENTS:
        autoencoder = model.autoencoders[name]
        latent = autoencoder.encoder(crops[name])
        bank = model.banks.get(name, gender).to(device=latent.device, dtype=latent.dtype)
        _, indices, weights = project(latent, bank, model.config.knn, model.config.lle_eps, model.config.projection,
                                      model.banks.squared_norms(name, gender))
        positive = weights.clamp(min=0)
        positive = positive / positive.sum(1, keepdim=True).clamp(min=1e-12)
        window = windows[name]
        decoded = autoencoder.decode(bank[indices.reshape(-1)])  # [B*k, 1, S, S]
        ink = ((1 - decoded) / 2).clamp(0, 1).view(batch, indices.shape[1], window.size, window.size)
        blended = torch.einsum("bk,bkhw->bhw", positive.to(ink.dtype), ink)
        if name != "remainder":
            blended = blended * _fade_mask(window.size, ink.device)
        region = darkness[:, window.y:window.y + window.size, window.x:window.x + window.size]
        darkness[:, window.y:window.y + window.size, window.x:window.x + window.size] = torch.maximum(region, blended)
    return darkness


def shadow_image(model: SketchToFace, sketch, gender: str | None = None) -> torch.Tensor:
    """The shadows as uint8 gray pictures [B, R, R] (255 paper, darker where lines are likely)."""
    return (255 - shadow_darkness(model, sketch, gender) * 255).round().clamp(0, 255).to(torch.uint8).cpu()


__all__ = ["shadow_darkness", "shadow_image"]
