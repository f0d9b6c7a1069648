"""Versions of the libraries a step used, recorded in the manifest so results can be traced."""
from __future__ import annotations

import importlib
import platform

from . import __version__

_MODULES = {"numpy": "numpy", "opencv": "cv2", "pillow": "PIL", "dlib": "dlib",
            "scikit-image": "skimage", "torch": "torch"}


def tool_versions(*names: str) -> dict[str, str]:
    """{'dfd': ..., 'python': ..., name: version} for the named libraries."""
    versions = {"dfd": __version__, "python": platform.python_version()}
    for name in names:
        versions[name] = str(getattr(importlib.import_module(_MODULES[name]), "__version__", "unknown"))
    return versions
