"""Data preparation for DeepFaceDrawing: image I/O, face alignment, component crops,
dataset records and manifest, and the parallel batch runner every command uses."""

__version__ = "0.1.0"
