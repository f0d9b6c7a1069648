"""The DeepFaceDrawing model: component embedding, manifold projection, feature mapping and
image synthesis, with two-stage training and generation."""

from dfd_data import __version__

__all__ = ["__version__"]
