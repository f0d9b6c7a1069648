"""The architecture of the DeepFaceDrawing model as one frozen, validated dataclass.

`ModelConfig` describes every network of the inference model (five component auto-encoders,
five feature decoders, the image generator), the discriminators used in training, and the
projection settings, so that a saved model folder can be rebuilt from its `config.json`
alone. The defaults are the released model's sizes (DESIGN section 3) except the slope of the
activation after the strided convolutions of the component networks: the release used
LeakyReLU(1), which is the identity; we default to 0.2 and keep 1.0 as an option for
weight-compatible re-creations.

Every value is checked when the config is built, with one-line ValueErrors, so an absurd
config (a typo in a JSON file, a hostile checkpoint) is refused before any tensor exists.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from dfd_data.components import BASE_RESOLUTION, COMPONENTS, Window, component_windows

# The nose map is pasted only down to this row on the 512 canvas (the release cuts its bottom
# 36 of 160 rows); at other resolutions the count scales with resolution/512.
BASE_NOSE_FUSION_ROWS = 124
# Refuse configs whose inference networks would hold more parameters than this (32 GiB of
# float32 weights; the default widths at 2048 hold 4.7G): larger is surely a mistake.
MAX_PARAMETERS = 8_000_000_000


PROJECTION_METHODS = ("anchored", "gram")
D_CONDITIONS = ("features", "sketch")

# name -> (type, smallest, largest) for numbers; (type, choices) for strings; (type,) for bools.
_LIMITS: dict[str, tuple] = {
    "resolution": (int, 64, 2048),
    "latent_dim": (int, 1, 4096),
    "ce_base_channels": (int, 1, 64),
    "fm_base_channels": (int, 1, 64),
    "fm_channels": (int, 1, 512),
    "ngf": (int, 1, 256),
    "n_downsample": (int, 1, 6),
    "n_blocks": (int, 0, 64),
    "num_d": (int, 1, 5),
    "ndf": (int, 1, 512),
    "n_layers_d": (int, 1, 8),
    "d_condition": (str, D_CONDITIONS),
    "encoder_slope": (float, 0.0, 1.0),
    "bn_momentum": (float, 1e-6, 1.0),
    "instance_norm_affine": (bool,),
    "nose_fusion_rows": (int, 1, 2048),
    "knn": (int, 1, 1024),
    "lle_eps": (float, 1e-12, 1.0),
    "projection": (str, PROJECTION_METHODS),
}


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the DeepFaceDrawing networks; defaults are the released 512 model's.

    resolution: side of the square sketch and face (multiple of 32, 64..2048); component
        windows come from `dfd_data.components.component_windows(resolution)`.
    latent_dim: length of each component's latent vector (released: 512).
    ce_base_channels: width of the first conv of the component encoders; the encoder doubles
        it four times (32 -> 512) and the image decoder mirrors it (16b, 8b, 4b, 2b, b, b).
    fm_base_channels: the feature decoders' widths are 16b, 8b, 8b, 4b, 2b, 2b (512 -> 64).
    fm_channels: channels of the fused feature map, i.e. the generator's input (released: 32).
    ngf, n_downsample, n_blocks: the pix2pixHD global generator (released: 56, 4, 9).
    num_d, ndf, n_layers_d, d_condition: the multi-scale PatchGAN discriminators used in
        training (pix2pixHD defaults; `d_condition` picks what is concatenated with the image:
        the fused feature map or the sketch).
    encoder_slope: negative slope of the LeakyReLU after every strided or transposed conv of
        the component encoders and decoders (release: 1.0, the identity).
    bn_momentum: momentum of the BatchNorm after those strided convs (PyTorch's default 0.1;
        the release used 0.9, i.e. running statistics of almost only the last batch).
    instance_norm_affine: learnable scale/shift in the generator's and discriminators'
        InstanceNorms (pix2pixHD: False; the Jittor release: True).
    nose_fusion_rows: rows of the nose map written into the fused map; None means 124 at 512,
        scaled by resolution/512 and capped at the nose window.
    knn, lle_eps, projection: manifold projection (K neighbours, ridge factor, and the
        weight solve; see `dfd_model.projection.project`).
    """

    resolution: int = 512
    latent_dim: int = 512
    ce_base_channels: int = 32
    fm_base_channels: int = 32
    fm_channels: int = 32
    ngf: int = 56
    n_downsample: int = 4
    n_blocks: int = 9
    num_d: int = 2
    ndf: int = 64
    n_layers_d: int = 3
    d_condition: str = "features"
    encoder_slope: float = 0.2
    bn_momentum: float = 0.1
    instance_norm_affine: bool = False
    nose_fusion_rows: int | None = None
    knn: int = 10
    lle_eps: float = 1e-3
    projection: str = "anchored"

    def __post_init__(self):
        for name, limits in _LIMITS.items():
            value = getattr(self, name)
            if name == "nose_fusion_rows" and value is None:
                continue
            kind = limits[0]
            if kind is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"model config: {name} must be true or false, got {value!r}")
                continue
            if kind is str:
                if not isinstance(value, str) or value not in limits[1]:
                    raise ValueError(f"model config: {name} must be one of {', '.join(limits[1])}, got {value!r}")
                continue
            if kind is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"model config: {name} must be an integer, got {value!r}")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"model config: {name} must be a finite number, got {value!r}")
                object.__setattr__(self, name, float(value))
                value = float(value)
            low, high = limits[1], limits[2]
            if not low <= value <= high:
                raise ValueError(f"model config: {name}={value} is outside {low}..{high}")
        if self.resolution % 32:
            raise ValueError(f"model config: resolution={self.resolution} must be a multiple of 32")
        if self.resolution % (2 ** self.n_downsample) or self.resolution // 2 ** self.n_downsample < 2:
            # (the generator's instance norms need at least 2x2 values at its deepest layer)
            raise ValueError(f"model config: resolution={self.resolution} cannot be halved "
                             f"n_downsample={self.n_downsample} times and keep at least 2x2 pixels")
        if self.ngf * 2 ** self.n_downsample > 8192:
            raise ValueError(f"model config: ngf={self.ngf} doubled n_downsample={self.n_downsample} times "
                             "exceeds 8192 channels")
        nose = self.component_sizes()["nose"]
        if self.nose_fusion_rows is not None and self.nose_fusion_rows > nose:
            raise ValueError(f"model config: nose_fusion_rows={self.nose_fusion_rows} exceeds the nose window "
                             f"({nose} rows at resolution {self.resolution})")
        total = sum(self.parameter_counts(training=False).values())
        if total > MAX_PARAMETERS:
            raise ValueError(f"model config: the networks would hold {total / 1e9:.1f}G parameters "
                             f"(more than {MAX_PARAMETERS / 1e9:.0f}G); reduce resolution, latent_dim or widths")

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Every field, JSON-ready; `from_dict(to_dict())` rebuilds an equal config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data, *, complete: bool = False) -> "ModelConfig":
        """Build a config from a mapping (e.g. parsed JSON), refusing unknown keys.

        Missing keys take their defaults unless `complete` is true (checkpoints use that, so
        a change of default can never silently change a saved model)."""
        if not isinstance(data, dict):
            raise ValueError(f"model config must be a JSON object, got {type(data).__name__}")
        names = [field.name for field in fields(cls)]
        unknown = sorted(str(key) for key in data if key not in names)
        if unknown:
            raise ValueError(f"model config: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                             f"(known: {', '.join(names)})")
        missing = [name for name in names if name not in data]
        if complete and missing:
            raise ValueError(f"model config: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        return cls(**data)

    # ---- derived sizes -------------------------------------------------------------------
    def windows(self) -> dict[str, Window]:
        """Component name -> Window(x, y, size) on this resolution's canvas."""
        return component_windows(self.resolution)

    def component_sizes(self) -> dict[str, int]:
        """Component name -> side of its square crop (a multiple of 32)."""
        windows = self.windows()
        return {name: windows[name].size for name in COMPONENTS}

    @property
    def nose_rows(self) -> int:
        """Rows of the nose feature map that fusion writes (from the top of the window)."""
        if self.nose_fusion_rows is not None:
            return self.nose_fusion_rows
        scaled = int(math.floor(BASE_NOSE_FUSION_ROWS * self.resolution / BASE_RESOLUTION + 0.5))
        return max(1, min(scaled, self.component_sizes()["nose"]))

    @property
    def encoder_channels(self) -> list[int]:
        """Channels after the stem and each of the four doubling convs of a component encoder."""
        return [self.ce_base_channels * 2 ** i for i in range(5)]

    @property
    def image_decoder_channels(self) -> list[int]:
        base = self.ce_base_channels
        return [16 * base, 8 * base, 4 * base, 2 * base, base, base]

    @property
    def feature_decoder_channels(self) -> list[int]:
        base = self.fm_base_channels
        return [16 * base, 8 * base, 8 * base, 4 * base, 2 * base, 2 * base]

    @property
    def discriminator_input_channels(self) -> int:
        condition = self.fm_channels if self.d_condition == "features" else 1
        return condition + 3

    # ---- parameter counts without building anything --------------------------------------
    def parameter_counts(self, training: bool = True) -> dict[str, int]:
        """Parameters per network, computed from the sizes alone (no allocation).

        Keys: `encoder.<component>`, `image_decoder.<component>`, `feature_decoder.<component>`,
        `generator`, and with `training` also `discriminator` (all scales together). The
        test suite checks these against the built modules."""
        counts = {}
        for name, size in self.component_sizes().items():
            counts[f"encoder.{name}"] = _encoder_parameters(self, size)
            counts[f"image_decoder.{name}"] = _decoder_parameters(self, size, self.image_decoder_channels, 1)
            counts[f"feature_decoder.{name}"] = _decoder_parameters(self, size, self.feature_decoder_channels,
                                                                    self.fm_channels)
        counts["generator"] = _generator_parameters(self)
        if training:
            counts["discriminator"] = self.num_d * _discriminator_parameters(self)
        return counts


def _conv(cin: int, cout: int, kernel: int) -> int:
    return cin * cout * kernel * kernel + cout


def _residual_bn(channels: int) -> int:
    return 2 * (_conv(channels, channels, 3) + 2 * channels)


def _encoder_parameters(config: ModelConfig, size: int) -> int:
    chans = config.encoder_channels
    total = _conv(1, chans[0], 4) + 2 * chans[0]
    for cin, cout in zip(chans[:-1], chans[1:]):
        total += _residual_bn(cin) + _conv(cin, cout, 4) + 2 * cout
    total += _residual_bn(chans[-1])
    flat = chans[-1] * (size // 32) ** 2
    return total + flat * config.latent_dim + config.latent_dim


def _decoder_parameters(config: ModelConfig, size: int, chans: list[int], out_channels: int) -> int:
    flat = chans[0] * (size // 32) ** 2
    total = config.latent_dim * flat + flat + _residual_bn(chans[0])
    for cin, cout in zip(chans[:-1], chans[1:]):
        total += _conv(cin, cout, 4) + 2 * cout + _residual_bn(cout)
    return total + _conv(chans[-1], out_channels, 5)


def _generator_parameters(config: ModelConfig) -> int:
    norm = 2 if config.instance_norm_affine else 0
    ngf = config.ngf
    total = _conv(config.fm_channels, ngf, 7) + norm * ngf
    for i in range(config.n_downsample):
        cin = ngf * 2 ** i
        total += _conv(cin, 2 * cin, 3) + norm * 2 * cin
    deep = ngf * 2 ** config.n_downsample
    total += config.n_blocks * 2 * (_conv(deep, deep, 3) + norm * deep)
    for i in range(config.n_downsample, 0, -1):
        cin = ngf * 2 ** i
        total += _conv(cin, cin // 2, 3) + norm * (cin // 2)
    return total + _conv(ngf, 3, 7)


def _discriminator_parameters(config: ModelConfig) -> int:
    norm = 2 if config.instance_norm_affine else 0
    total = _conv(config.discriminator_input_channels, config.ndf, 4)
    channels = config.ndf
    for _ in range(1, config.n_layers_d):
        nxt = min(channels * 2, 512)
        total += _conv(channels, nxt, 4) + norm * nxt
        channels = nxt
    nxt = min(channels * 2, 512)
    total += _conv(channels, nxt, 4) + norm * nxt
    return total + _conv(nxt, 1, 4)
