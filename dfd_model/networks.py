"""The DeepFaceDrawing networks (DESIGN section 3): component encoders and decoders, feature
decoders, feature-map fusion, the pix2pixHD global generator and multi-scale PatchGAN
discriminators, plus the sketch/image normalisation helpers.

Layouts follow the released inference code; see `dfd_model.config.ModelConfig` for every
size. All convolutions keep their bias (as released), so weights converted from the release
have the same shapes. Shapes are NCHW.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from dfd_data.components import COMPONENTS

from .config import ModelConfig

# Fusion writes the component maps over the remainder map in this order; later wins.
FUSION_ORDER = ("mouth", "nose", "left_eye", "right_eye")


# ---- normalisation ---------------------------------------------------------------------------
def normalize_sketch(sketch) -> torch.Tensor:
    """uint8 (0 ink .. 255 paper) -> float32 in [-1, 1]: (x - 127.5) / 127.5, paper = +1.

    Works for any shape and for RGB photos too; numpy arrays are accepted."""
    tensor = torch.as_tensor(sketch)
    if tensor.dtype != torch.uint8:
        raise ValueError(f"normalize_sketch expects uint8 pixels, got {tensor.dtype}")
    return (tensor.to(torch.float32) - 127.5) / 127.5


def denormalize_image(tensor: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] -> uint8 (rounded, clipped): the inverse of `normalize_sketch`."""
    if not torch.is_floating_point(tensor):
        raise ValueError(f"denormalize_image expects a float tensor, got {tensor.dtype}")
    return (tensor.detach() * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)


# ---- initialisation ----------------------------------------------------------------------------
def init_weights(module: nn.Module) -> None:
    """pix2pixHD-style init: conv weights N(0, 0.02), biases 0; norm scales N(1, 0.02), shifts 0.
    Linear layers keep PyTorch's default. Meta tensors (shape-only builds) are left alone:
    there is nothing to fill, and torch's meta `normal_` is slow to set up."""
    for layer in module.modules():
        if getattr(layer, "weight", None) is not None and layer.weight.is_meta:
            continue
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, 0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, (nn.BatchNorm2d, nn.InstanceNorm2d)) and layer.weight is not None:
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)


def _activation(slope: float) -> nn.Module:
    # LeakyReLU(1) is the identity (the released layout); skip the pass it would cost.
    return nn.Identity() if slope == 1.0 else nn.LeakyReLU(slope)


def _check_input(name: str, x: torch.Tensor, channels: int, size: int | None) -> None:
    if x.ndim != 4 or x.shape[1] != channels or (size is not None and tuple(x.shape[2:]) != (size, size)):
        wanted = f"[B, {channels}, {size}, {size}]" if size is not None else f"[B, {channels}, H, W]"
        raise ValueError(f"{name} expects a tensor shaped {wanted}, got {list(x.shape)}")


# ---- building blocks -----------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """x + [reflect pad 1, conv3x3, norm, ReLU, reflect pad 1, conv3x3, norm](x).

    `norm` is "batch" (component networks) or "instance" (generator, pix2pixHD style).
    `grid` is the spatial side when known: reflection needs at least 2 pixels, so on a 1x1
    grid (32-px component windows of 128-px models) the block pads by replication, which is
    what reflection tends to as the grid shrinks."""

    def __init__(self, channels: int, norm: str = "batch", affine: bool = False, grid: int | None = None):
        super().__init__()
        pad = nn.ReplicationPad2d if grid == 1 else nn.ReflectionPad2d
        if norm == "batch":
            make_norm = lambda: nn.BatchNorm2d(channels)  # noqa: E731
        elif norm == "instance":
            make_norm = lambda: nn.InstanceNorm2d(channels, affine=affine)  # noqa: E731
        else:
            raise ValueError(f"unknown norm {norm!r}; choose batch or instance")
        self.block = nn.Sequential(
            pad(1), nn.Conv2d(channels, channels, 3), make_norm(), nn.ReLU(True),
            pad(1), nn.Conv2d(channels, channels, 3), make_norm(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _check_component_size(size: int) -> None:
    if size < 32 or size % 32:
        raise ValueError(f"component size {size} must be a positive multiple of 32 (the networks halve it five times)")


class ComponentEncoder(nn.Module):
    """One component's sketch crop [B, 1, S, S] in [-1, 1] -> latent [B, latent_dim] (S a multiple of 32)."""

    def __init__(self, size: int, config: ModelConfig = ModelConfig()):
        super().__init__()
        _check_component_size(size)
        self.size = size
        chans = config.encoder_channels
        slope, momentum = config.encoder_slope, config.bn_momentum
        self.stem = nn.Sequential(nn.Conv2d(1, chans[0], 4, 2, 1), nn.BatchNorm2d(chans[0], momentum=momentum),
                                  _activation(slope))
        self.stages = nn.Sequential(*[
            nn.Sequential(ResidualBlock(cin), nn.Conv2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout, momentum=momentum),
                          _activation(slope))
            for cin, cout in zip(chans[:-1], chans[1:])
        ])
        self.last_block = ResidualBlock(chans[-1], grid=size // 32)
        self.fc = nn.Linear(chans[-1] * (size // 32) ** 2, config.latent_dim)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("ComponentEncoder", x, 1, self.size)
        return self.fc(torch.flatten(self.last_block(self.stages(self.stem(x))), 1))


class _LatentDecoder(nn.Module):
    """Linear -> reshape -> residual block -> five [convT k4 s2, BN, act, residual block]
    -> reflect pad 2, conv5x5 (no output activation)."""

    def __init__(self, size: int, config: ModelConfig, chans: list[int], out_channels: int):
        super().__init__()
        _check_component_size(size)
        self.size, self.latent_dim, self.grid = size, config.latent_dim, size // 32
        self.first_channels = chans[0]
        slope, momentum = config.encoder_slope, config.bn_momentum
        self.fc = nn.Linear(config.latent_dim, chans[0] * self.grid ** 2)
        self.first_block = ResidualBlock(chans[0], grid=self.grid)
        self.stages = nn.Sequential(*[
            nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout, momentum=momentum),
                          _activation(slope), ResidualBlock(cout))
            for cin, cout in zip(chans[:-1], chans[1:])
        ])
        self.head = nn.Sequential(nn.ReflectionPad2d(2), nn.Conv2d(chans[-1], out_channels, 5))
        init_weights(self)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim != 2 or latent.shape[1] != self.latent_dim:
            raise ValueError(f"{type(self).__name__} expects latents shaped [B, {self.latent_dim}], "
                             f"got {list(latent.shape)}")
        grid = self.fc(latent).view(latent.shape[0], self.first_channels, self.grid, self.grid)
        return self.head(self.stages(self.first_block(grid)))


class ComponentDecoder(_LatentDecoder):
    """Latent [B, latent_dim] -> one-channel component sketch [B, 1, S, S] (stage 1, shadows).
    Channels 16b -> 8b -> 4b -> 2b -> b -> b with b = ce_base_channels (512 -> 32)."""

    def __init__(self, size: int, config: ModelConfig = ModelConfig()):
        super().__init__(size, config, config.image_decoder_channels, 1)


class FeatureDecoder(_LatentDecoder):
    """Latent [B, latent_dim] -> feature map [B, fm_channels, S, S] (the FM module).
    Channels 16b -> 8b -> 8b -> 4b -> 2b -> 2b with b = fm_base_channels (512 -> 64)."""

    def __init__(self, size: int, config: ModelConfig = ModelConfig()):
        super().__init__(size, config, config.feature_decoder_channels, config.fm_channels)


class ComponentAutoEncoder(nn.Module):
    """A component's encoder and image decoder; calling it reconstructs the crop."""

    def __init__(self, size: int, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.encoder = ComponentEncoder(size, config)
        self.decoder = ComponentDecoder(size, config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


# ---- fusion ----------------------------------------------------------------------------------------
def fuse_feature_maps(maps: Mapping[str, torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """Fuse the five component feature maps into one [B, C, R, R] map by hard overwrite.

    Starts from (a copy of) the remainder map and writes, in this order, the mouth map, the
    top `config.nose_rows` rows of the nose map, the left eye and the right eye at their
    windows. The inputs are not modified; gradients flow to every written region."""
    missing = [name for name in COMPONENTS if name not in maps]
    if missing:
        raise ValueError(f"fuse_feature_maps: missing maps for {', '.join(missing)}")
    windows = config.windows()
    canvas = maps["remainder"]
    if canvas.ndim != 4 or tuple(canvas.shape[2:]) != (config.resolution, config.resolution):
        raise ValueError(f"fuse_feature_maps: the remainder map must be [B, C, {config.resolution}, "
                         f"{config.resolution}], got {list(canvas.shape)}")
    batch, channels = canvas.shape[:2]
    fused = canvas.clone()
    for name in FUSION_ORDER:
        window, part = windows[name], maps[name]
        if tuple(part.shape) != (batch, channels, window.size, window.size):
            raise ValueError(f"fuse_feature_maps: the {name} map must be [{batch}, {channels}, {window.size}, "
                             f"{window.size}], got {list(part.shape)}")
        rows = config.nose_rows if name == "nose" else window.size
        fused[:, :, window.y:window.y + rows, window.x:window.x + window.size] = part[:, :, :rows]
    return fused


# ---- image synthesis ---------------------------------------------------------------------------------
class GlobalGenerator(nn.Module):
    """pix2pixHD global generator: fused map [B, fm_channels, R, R] -> RGB [B, 3, R, R] in [-1, 1].

    reflect pad 3, conv7 (-> ngf), IN, ReLU; n_downsample x [conv3 s2 doubling, IN, ReLU];
    n_blocks residual blocks (IN); n_downsample x [convT3 s2 halving, IN, ReLU];
    reflect pad 3, conv7 (-> 3), tanh."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.input_channels = config.fm_channels
        ngf, affine = config.ngf, config.instance_norm_affine
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(config.fm_channels, ngf, 7),
                                   nn.InstanceNorm2d(ngf, affine=affine), nn.ReLU(True)]
        for i in range(config.n_downsample):
            cin = ngf * 2 ** i
            layers += [nn.Conv2d(cin, 2 * cin, 3, 2, 1), nn.InstanceNorm2d(2 * cin, affine=affine), nn.ReLU(True)]
        deep = ngf * 2 ** config.n_downsample
        layers += [ResidualBlock(deep, "instance", affine) for _ in range(config.n_blocks)]
        for i in range(config.n_downsample, 0, -1):
            cin = ngf * 2 ** i
            layers += [nn.ConvTranspose2d(cin, cin // 2, 3, 2, 1, output_padding=1),
                       nn.InstanceNorm2d(cin // 2, affine=affine), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("GlobalGenerator", x, self.input_channels, None)
        return self.model(x)


# ---- discriminators ------------------------------------------------------------------------------------
class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pixHD): conv4 s2 (ndf), LReLU; n_layers-1 x [conv4 s2 doubling (max 512),
    IN, LReLU]; conv4 s1 doubling, IN, LReLU; conv4 s1 -> 1. Padding 2 as in pix2pixHD.
    Returns the output of every layer group (the last is the patch score map) for
    discriminator feature matching."""

    def __init__(self, input_channels: int, ndf: int = 64, n_layers: int = 3, affine: bool = False):
        super().__init__()
        self.input_channels = input_channels
        groups = [nn.Sequential(nn.Conv2d(input_channels, ndf, 4, 2, 2), nn.LeakyReLU(0.2, True))]
        channels = ndf
        for stride in [2] * (n_layers - 1) + [1]:
            nxt = min(channels * 2, 512)
            groups.append(nn.Sequential(nn.Conv2d(channels, nxt, 4, stride, 2), nn.InstanceNorm2d(nxt, affine=affine),
                                        nn.LeakyReLU(0.2, True)))
            channels = nxt
        groups.append(nn.Sequential(nn.Conv2d(channels, 1, 4, 1, 2)))
        self.groups = nn.ModuleList(groups)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        _check_input("NLayerDiscriminator", x, self.input_channels, None)
        features = []
        for group in self.groups:
            x = group(x)
            features.append(x)
        return features


class MultiscaleDiscriminator(nn.Module):
    """`num_d` PatchGANs on the input at scales 1, 1/2, 1/4, ... (AvgPool 3, s2, p1,
    count_include_pad=False between scales). `forward(condition, image)` concatenates the two
    along channels and returns one feature list per scale, full scale first."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.input_channels = config.discriminator_input_channels
        self.scales = nn.ModuleList([
            NLayerDiscriminator(self.input_channels, config.ndf, config.n_layers_d, config.instance_norm_affine)
            for _ in range(config.num_d)
        ])
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> list[list[torch.Tensor]]:
        if condition.ndim != 4 or image.ndim != 4 or condition.shape[0] != image.shape[0] \
                or condition.shape[2:] != image.shape[2:]:
            raise ValueError(f"MultiscaleDiscriminator: condition {list(condition.shape)} and image "
                             f"{list(image.shape)} must share batch and spatial size")
        x = torch.cat([condition, image], dim=1)
        outputs = []
        for index, scale in enumerate(self.scales):
            if index:
                x = self.downsample(x)
            outputs.append(scale(x))
        return outputs


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


__all__ = [
    "FUSION_ORDER", "ComponentAutoEncoder", "ComponentDecoder", "ComponentEncoder", "FeatureDecoder",
    "GlobalGenerator", "MultiscaleDiscriminator", "NLayerDiscriminator", "ResidualBlock", "count_parameters",
    "denormalize_image", "fuse_feature_maps", "init_weights", "normalize_sketch",
]
