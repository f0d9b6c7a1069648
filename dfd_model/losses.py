"""Training losses of stage 2 (pix2pixHD's set, DESIGN section 3): LSGAN, discriminator
feature matching, and the VGG19 perceptual loss when the user supplies VGG19 weights.

VGG weights cannot be downloaded at run time, so `VGG19Features.from_safetensors` reads a
file the user converted (torchvision's `vgg19` state dict layout, `features.<i>.weight/bias`,
saved with safetensors); nothing is ever unpickled.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

# pix2pixHD's VGG19 slices end at relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (layer indices
# of torchvision's vgg19().features) and weigh them 1/32 .. 1.
VGG_SLICE_ENDS = (2, 7, 12, 21, 30)
VGG_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
# torchvision's vgg19 "features": conv output channels, "M" for a 2x2 max pool.
_VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def lsgan_loss(outputs: list[list[torch.Tensor]], real: bool) -> torch.Tensor:
    """Least-squares GAN loss summed over discriminator scales: mean (score - target)^2 with
    target 1 for real, 0 for fake; `outputs` is MultiscaleDiscriminator's return value."""
    target = 1.0 if real else 0.0
    # float32 even under autocast: the squared scores of half-precision outputs lose too much
    return sum(F.mse_loss(scale[-1].float(), torch.full_like(scale[-1], target, dtype=torch.float32))
               for scale in outputs)


def feature_matching_loss(fake: list[list[torch.Tensor]], real: list[list[torch.Tensor]]) -> torch.Tensor:
    """L1 between the discriminators' intermediate features on fake and real images (the real
    side detached), each layer weighted 4 / (layers + 1) and each scale 1 / scales."""
    total = fake[0][0].new_zeros((), dtype=torch.float32)
    scales = len(fake)
    for fake_scale, real_scale in zip(fake, real):
        layer_weight = 4.0 / (len(fake_scale) - 1)  # n_layers_d + 2 groups: 4 / (n_layers_d + 1)
        for fake_layer, real_layer in zip(fake_scale[:-1], real_scale[:-1]):
            total = total + layer_weight / scales * F.l1_loss(fake_layer.float(), real_layer.detach().float())
    return total


class VGG19Features(nn.Module):
    """The convolutional part of VGG19, frozen, returning the five pix2pixHD feature slices."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG19_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers[:VGG_SLICE_ENDS[-1]])
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    @classmethod
    def from_safetensors(cls, path: str | os.PathLike) -> "VGG19Features":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        model = cls()
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(error).split())})") from None
        wanted = model.features.state_dict()
        state = {key.removeprefix("features."): value for key, value in state.items()
                 if key.removeprefix("features.") in wanted}
        missing = [key for key in wanted if key not in state]
        if missing:
            raise ValueError(f"{path}: lacks VGG19 tensor features.{missing[0]} (expected torchvision's vgg19 layout)")
        for key, value in state.items():
            if value.shape != wanted[key].shape:
                raise ValueError(f"{path}: features.{key} has shape {list(value.shape)}, VGG19 needs "
                                 f"{list(wanted[key].shape)}")
        model.features.load_state_dict(state)
        return model.eval()

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = ((image + 1) / 2 - self.mean) / self.std
        outputs, start = [], 0
        for end in VGG_SLICE_ENDS:
            x = self.features[start:end](x)
            outputs.append(x)
            start = end
        return outputs


def perceptual_loss(vgg: VGG19Features, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """pix2pixHD's VGG loss: weighted L1 between VGG19 features of fake and (detached) real."""
    fake_features, real_features = vgg(fake), vgg(real)
    return sum(w * F.l1_loss(f, r.detach()) for w, f, r in zip(VGG_WEIGHTS, fake_features, real_features))


__all__ = ["VGG19Features", "feature_matching_loss", "lsgan_loss", "perceptual_loss"]
