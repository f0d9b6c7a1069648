"""The inference rewrite (dfd_data.inference_graph) computes the same function as the model
it rewrites, keeps channels-last layout throughout, and casts only what runs under autocast."""
import copy

import pytest
import torch
from torch import nn

from dfd_data.devices import compute_precision, prepare_for_inference
from dfd_data.inference_graph import (ConvActivation, GroupInstanceNorm, InputDtypePad, PairMaxPool,
                                     rewrite_for_inference)
from dfd_data.winograd import WinogradConv3x3
from dfd_model.config import ModelConfig
from dfd_model.sketch_to_face import SketchToFace

CPU = torch.device("cpu")


def trained_looking_network() -> nn.Sequential:
    """Every layer kind the rewrite touches, with batch-norm statistics far from 0 and 1 (so a
    wrong fold shows) and affine instance norms."""
    torch.manual_seed(0)
    network = nn.Sequential(
        nn.ReflectionPad2d(1), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 4, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ReplicationPad2d(2), nn.Conv2d(8, 8, 5), nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1), nn.InstanceNorm2d(4), nn.MaxPool2d(2, 2, ceil_mode=True),
    )
    for layer in network:
        if isinstance(layer, (nn.BatchNorm2d, nn.InstanceNorm2d)) and layer.weight is not None:
            nn.init.uniform_(layer.weight, 0.5, 2.0)
            nn.init.uniform_(layer.bias, -1.0, 1.0)
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-2.0, 2.0)
            layer.running_var.uniform_(0.2, 3.0)
    return network.eval()


def test_the_rewrite_computes_the_same_function_in_channels_last_layout():
    network = trained_looking_network()
    rewritten = prepare_for_inference(copy.deepcopy(network), CPU, "fp32")
    kinds = [type(layer) for layer in rewritten]
    assert nn.BatchNorm2d not in kinds and nn.InstanceNorm2d not in kinds  # folded, replaced
    assert kinds.count(GroupInstanceNorm) == 2 and kinds.count(InputDtypePad) == 2 and kinds.count(PairMaxPool) == 1
    assert kinds.count(ConvActivation) == 1  # the convolution, its folded batch norm and the ReLU
    x = torch.randn(2, 3, 20, 24)
    with torch.inference_mode():
        expected, got = network(x), rewritten(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 0.02)])
def test_convolutions_with_their_activation_fused_compute_the_same(precision, tolerance):
    """ReLU and LeakyReLU (with its slope) fuse into the convolution before them, strided and
    dilated ones too; a reflect-padded convolution does not (oneDNN pads with zeros)."""
    torch.manual_seed(1)
    network = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.ReLU(inplace=True),
        nn.Conv2d(16, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
    ).eval()
    rewritten = prepare_for_inference(copy.deepcopy(network), CPU, precision)
    kinds = [type(layer) for layer in rewritten]
    assert kinds.count(ConvActivation) == 3 and kinds[-2:] == [nn.Conv2d, nn.ReLU]
    x = torch.randn(2, 3, 30, 26).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), compute_precision(rewritten, CPU):
        got = rewritten(x)
    with torch.inference_mode():
        expected = network(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert (got.float() - expected).abs().mean() <= tolerance * expected.abs().mean()
    assert (got.float() - expected).abs().max() <= 50 * tolerance * expected.abs().max()


@pytest.mark.parametrize("kind, tolerance", [("fused", 0.02), ("winograd", 0.05)])
def test_a_convolution_with_float32_weights_under_autocast_computes_in_bf16(kind, tolerance):
    """Shadows decode with the auto-encoders' image decoders under autocast, their weights
    left in float32: a fused or Winograd convolution there must compute in bf16 like the plain
    ones around it (the fused one had run in float32, ten times slower on AMX), and give what
    Conv2d + ReLU give (Winograd's extra sums round a little more)."""
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 16, 3, padding=1).eval()
    module = ConvActivation(conv, nn.ReLU()) if kind == "fused" else WinogradConv3x3(conv, torch.float32, 0.0)
    x = torch.randn(2, 8, 12, 10).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = module(x), torch.relu(conv(x))
    assert {tensor.dtype for tensor in module.state_dict().values()} == {torch.float32}
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("height, width", [(8, 12), (7, 12), (8, 5)])
def test_pair_max_pool_equals_max_pool_with_nans_and_odd_sizes(height, width):
    """Even sizes take the strided-maximum path, odd ones (pooled alone at the edge under
    ceil_mode) max_pool2d itself; a NaN poisons its window either way."""
    pool = nn.MaxPool2d(2, 2, ceil_mode=True)
    x = torch.randn(2, 3, height, width).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x[0, 1, 2, 3] = float("nan")
    got = PairMaxPool(pool)(x)
    torch.testing.assert_close(got, pool(x), rtol=0, atol=0, equal_nan=True)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert not PairMaxPool.replaces(nn.MaxPool2d(3, 2)) and not PairMaxPool.replaces(nn.MaxPool2d(2, 2, padding=1))


def test_bf16_keeps_the_layout_and_stays_within_rounding():
    network = trained_looking_network()
    rewritten = prepare_for_inference(copy.deepcopy(network), CPU, "bf16")
    assert all(layer.weight.dtype == torch.bfloat16 for layer in rewritten if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)))
    x = torch.randn(2, 3, 20, 24).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), compute_precision(rewritten, CPU):
        got = rewritten(x)
    with torch.inference_mode():
        expected = network(x)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert (got.float() - expected).abs().mean() < 0.02 * expected.abs().mean()


def test_sketch_to_face_computes_in_bf16_and_passes_float32_in_and_out():
    """Every matrix layer, the encoders' too, stores bf16 weights (no cast per call); sketches,
    latents and faces stay float32, the latents within bf16 rounding of the float32 model's."""
    config = ModelConfig(resolution=128, latent_dim=32, ce_base_channels=4, fm_base_channels=4, fm_channels=4,
                         ngf=4, n_blocks=1)
    torch.manual_seed(0)
    model = SketchToFace(config).eval()
    prepared = prepare_for_inference(copy.deepcopy(model), CPU, "bf16")
    matrix_layers = [layer for layer in prepared.modules() if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    assert {layer.weight.dtype for layer in matrix_layers} == {torch.bfloat16}
    assert prepared.io_dtype == torch.float32 and model.io_dtype == torch.float32
    sketch = torch.randint(0, 256, (1, 128, 128), dtype=torch.uint8)
    with torch.inference_mode():
        expected, got = model(sketch), prepared(sketch)
        latents, bf16_latents = model.encode(sketch, refine=0.0), prepared.encode(sketch, refine=0.0)
        expected_drawing, drawing = model.draw(latents), prepared.draw(latents)
    for name, latent in bf16_latents.items():
        assert latent.dtype == torch.float32
        assert (latent - latents[name]).norm() < 0.02 * latents[name].norm(), name
    assert got.dtype == torch.float32 and (got - expected).abs().mean() < 0.01
    assert drawing.dtype == torch.float32 and (drawing - expected_drawing).abs().mean() < 0.01


def test_a_model_in_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        rewrite_for_inference(trained_looking_network().train(), torch.float32)


def test_rewritten_layers_take_unbatched_input_and_pass_gradients_like_the_originals():
    """Conv2d and InstanceNorm2d accept [C, H, W]; group_norm would read C as the batch (a
    silently wrong result), the fused convolution refused it. The fused kernel has no
    gradient: with one asked for, the rewrite must compute the layers in turn."""
    torch.manual_seed(1)
    unbatched = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.InstanceNorm2d(8), nn.Conv2d(8, 4, 3),
                              nn.LeakyReLU(0.2)).eval()
    prepared = prepare_for_inference(copy.deepcopy(unbatched), CPU, "fp32")
    assert {type(m) for m in prepared} >= {ConvActivation, GroupInstanceNorm}
    x = torch.randn(3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), unbatched(x), rtol=1e-4, atol=1e-4)
    network = trained_looking_network()
    prepared = prepare_for_inference(copy.deepcopy(network), CPU, "fp32")
    assert any(isinstance(m, ConvActivation) for m in prepared.modules())
    wanted = x[None].clone().requires_grad_()
    network(wanted).square().sum().backward()
    given = x[None].to(memory_format=torch.channels_last).requires_grad_()
    prepared(given).square().sum().backward()
    assert given.grad is not None
    torch.testing.assert_close(given.grad, wanted.grad, rtol=1e-4, atol=1e-4)


def test_bf16_counts_as_native_on_a_gpu_only_without_emulation(monkeypatch):
    """torch.cuda.is_bf16_supported() says yes on any GPU that can emulate bf16 (a V100, a
    T4), where it runs slower than float32: `auto` must pick float32 there."""
    from dfd_data.devices import native_bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert native_bf16(torch.device("cuda")) is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_cuda_device_object_without_cuda_is_one_line():
    from dfd_data.devices import resolve_device
    from dfd_data.errors import DeviceError

    with pytest.raises(DeviceError, match="sees 0 CUDA device"):
        resolve_device(torch.device("cuda"))
