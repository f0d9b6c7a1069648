"""Winograd's F(2x2, 3x3) convolution (dfd_data.winograd) computes conv2d: exactly up to
float32 rounding in float32, within bf16 rounding in bf16, at every size, in bands, with bias,
padding and a fused activation; the inference rewrite uses it where the channel counts pay."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.measure import eager_copy, forward_flops
from dfd_data.devices import compute_precision, prepare_for_inference
from dfd_data.inference_graph import WINOGRAD_MIN_CHANNELS
from dfd_data.winograd import BAND_ROWS, WinogradConv3x3, transform_weights, winograd_conv3x3

CPU = torch.device("cpu")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("batch, height, width", [
    (1, 10, 10),                      # one band, even output
    (2, 9, 14),                       # odd output height: a zero row is added and cut off
    (1, 2 * BAND_ROWS + 7, 6),        # three bands, the last one short, odd width 4 -> even
    (3, 3, 3),                        # a single output pixel
])
def test_float32_winograd_equals_conv2d_at_any_size(batch, height, width):
    torch.manual_seed(0)
    weight, bias = torch.randn(5, 7, 3, 3), torch.randn(5)
    x = torch.randn(batch, 7, height, width).contiguous(memory_format=torch.channels_last)
    got = winograd_conv3x3(x, transform_weights(weight, torch.float32), bias)
    expected = F.conv2d(x, weight, bias)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_module_applies_padding_and_the_fused_activation_and_recovers_its_layers():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 4, 3, padding=1)
    x = torch.randn(2, 6, 11, 8)
    for slope, activation in [(None, nn.Identity()), (0.0, nn.ReLU()), (0.2, nn.LeakyReLU(0.2))]:
        module = WinogradConv3x3(conv, torch.float32, slope)
        with torch.inference_mode():
            torch.testing.assert_close(module(x), activation(conv(x)), rtol=1e-5, atol=1e-5)
            plain = module.as_layers()  # what benchmarks time as the eager layers
            torch.testing.assert_close(plain(x), activation(conv(x)), rtol=1e-5, atol=1e-5)
        assert type(plain[0]) is nn.Conv2d and len(plain) == (1 if slope is None else 2)
    bias_free = nn.Conv2d(6, 4, 3, bias=False)
    with torch.inference_mode():
        torch.testing.assert_close(WinogradConv3x3(bias_free, torch.float32)(x), bias_free(x), rtol=1e-5, atol=1e-5)
    for other in [nn.Conv2d(6, 4, 3, stride=2), nn.Conv2d(6, 4, 5), nn.Conv2d(6, 4, 3, dilation=2),
                  nn.Conv2d(6, 6, 3, groups=2), nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")]:
        assert not WinogradConv3x3.replaces(other)
        with pytest.raises(ValueError, match="3x3 stride-1"):
            WinogradConv3x3(other, torch.float32)


def test_bf16_winograd_stays_within_bf16_rounding():
    """Its extra sums round too: measured at about 3x a direct bf16 convolution's error (7e-3
    against 2.4e-3 relative, 896 channels); the bound leaves room for the random draw."""
    torch.manual_seed(2)
    channels = 64
    weight, bias = torch.randn(channels, channels, 3, 3) * (2 / (9 * channels)) ** 0.5, torch.randn(channels) * 0.1
    x = torch.randn(1, channels, 18, 18).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x.float(), weight, bias)
    got = winograd_conv3x3(x, transform_weights(weight, torch.bfloat16), bias.to(torch.bfloat16))
    direct = F.conv2d(x, weight.to(torch.bfloat16), bias.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert relative_error(direct, expected) < relative_error(got, expected) < 1.2e-2


def residual_stack(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=1), nn.InstanceNorm2d(channels),
                         nn.Conv2d(channels, channels, 3, stride=2, padding=1)).eval()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_rewrite_uses_winograd_from_its_channel_threshold(precision):
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    threshold = WINOGRAD_MIN_CHANNELS[dtype]
    torch.manual_seed(4)
    below = prepare_for_inference(residual_stack(threshold // 2), CPU, precision)
    assert not any(isinstance(layer, WinogradConv3x3) for layer in below.modules())

    network = residual_stack(threshold)
    rewritten = prepare_for_inference(copy.deepcopy(network), CPU, precision)
    kinds = [type(layer) for layer in rewritten]
    assert kinds.count(WinogradConv3x3) == 2 and kinds[-1] is nn.Conv2d  # the strided one stays direct
    assert rewritten[1].slope == 0.0 and rewritten[3].slope is None  # the ReLU fused, the norm not
    assert rewritten[1].transformed_weight.dtype == dtype
    x = torch.randn(1, threshold, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = network(x)
        with compute_precision(rewritten, CPU):
            got = rewritten(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(got, expected) < (1e-5 if precision == "fp32" else 0.02)

    plain = eager_copy(rewritten)  # the benchmarks' baseline: the original layers and FLOPs
    assert not any(isinstance(layer, WinogradConv3x3) for layer in plain.modules())
    assert forward_flops(lambda: plain(x)) == forward_flops(lambda: network(x))


def test_a_prepared_network_still_runs_with_gradients_unbatched_and_refuses_too_small_inputs():
    """Prepared models are meant for inference mode, but a call with autograd on (a library
    user optimising an input) computes the same function and gives input gradients; an
    unbatched input works as with Conv2d; an input smaller than the kernel is an error."""
    torch.manual_seed(5)
    network = nn.Sequential(nn.Conv2d(3, 256, 1), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()).eval()
    rewritten = prepare_for_inference(copy.deepcopy(network), CPU, "fp32")
    assert isinstance(rewritten[1], WinogradConv3x3)
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    got = rewritten(x)
    got.square().sum().backward()
    gradient, x.grad = x.grad.clone(), None
    expected = network(x)
    expected.square().sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gradient, x.grad, rtol=1e-4, atol=1e-4)

    module = rewritten[1]
    with torch.inference_mode():
        unbatched = torch.randn(256, 5, 7)
        torch.testing.assert_close(module(unbatched), torch.relu(network[1](unbatched)), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="at least 3x3"):
            winograd_conv3x3(torch.randn(1, 4, 2, 5), module.transformed_weight, None)


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 0.02)])
def test_the_full_size_generators_residual_block_runs_by_winograd(precision, tolerance):
    """One of the released generator's nine 896-channel residual blocks (reflect pad, conv,
    instance norm, ReLU, twice), the layers Winograd is for, at their 32x32 grid."""
    from dfd_model.networks import ResidualBlock

    torch.manual_seed(6)
    block = ResidualBlock(896, "instance").eval()
    rewritten = prepare_for_inference(copy.deepcopy(block), CPU, precision)
    assert sum(isinstance(layer, WinogradConv3x3) for layer in rewritten.modules()) == 2
    x = torch.randn(1, 896, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = block(x)
        with compute_precision(rewritten, CPU):
            got = rewritten(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(got, expected) < tolerance


def test_the_weight_transform_does_not_follow_the_default_dtype():
    """transform_weights computes in float32 whatever torch's default dtype is."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        transformed = transform_weights(torch.randn(4, 3, 3, 3, dtype=torch.float32), torch.float32)
    finally:
        torch.set_default_dtype(previous)
    assert transformed.dtype == torch.float32 and transformed.shape == (16, 3, 4)
