"""The benchmark suite's baselines measure what they claim: the eager copy of a model
prepared for inference runs plain layers and counts the FLOPs of the original network."""
import copy

import pytest
import torch
from torch import nn

from benchmarks.measure import eager_copy, forward_flops, interleaved_medians
from dfd_data.devices import prepare_for_inference
from dfd_data.inference_graph import ConvActivation, PairMaxPool


def test_the_eager_copy_of_a_prepared_network_is_plain_layers_with_the_same_flops():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                            nn.Conv2d(8, 8, 3, padding=1), nn.LeakyReLU(0.2)).eval()
    prepared = prepare_for_inference(copy.deepcopy(network), torch.device("cpu"), "fp32")
    assert any(isinstance(m, (ConvActivation, PairMaxPool)) for m in prepared.modules())
    plain = eager_copy(prepared)
    assert not any(isinstance(m, (ConvActivation, PairMaxPool)) for m in plain.modules())
    x = torch.randn(1, 3, 32, 32)
    assert forward_flops(lambda: plain(x)) == forward_flops(lambda: network(x)) > 0
    with torch.inference_mode():
        torch.testing.assert_close(plain(x), network(x), rtol=1e-5, atol=1e-5)


def test_interleaved_medians_time_each_function_in_turn():
    calls = []
    medians = interleaved_medians([lambda: calls.append("a"), lambda: calls.append("b")], runs=3, warmup=1)
    assert calls == ["a", "b"] * 4 and len(medians) == 2 and all(m >= 0 for m in medians)


def test_the_table_prints_a_zero_difference_without_a_ratio():
    """benchmarks.gpu's agreement rows are differences: exactly 0 where two runs agree (fp32
    on a CPU without native bf16), which once crashed the table after everything was measured."""
    from benchmarks.measure import Row, table

    printed = table([Row("agreement", 0.0, "mean abs", "fp32", 0.01), Row("speed", 2.0, "img/s", "eager", 1.0)])
    agreement, speed = printed.splitlines()[1:]
    assert agreement.split()[:3] == ["agreement", "0.000", "mean"] and not agreement.endswith("x")
    assert speed.endswith("2.00x")


def test_the_bound_of_the_products_computed_leaves_out_what_winograd_skips():
    """The nominal FLOP count charges every convolution as a direct one; the bound of the
    products computed charges only what the toolkit computes, at its dtype's rate."""
    from benchmarks.suite import MATMUL_FLOPS, computed_bound_row

    seconds = {torch.float32: MATMUL_FLOPS / 100e9, torch.bfloat16: MATMUL_FLOPS / 400e9}  # 100 and 400 GFLOP/s
    (row,) = computed_bound_row("generate_s_512", 1.0, {torch.bfloat16: 6e9}, 4e9, seconds, "s", {})
    assert row.name == "generate_s_512_vs_computed_bound" and row.value == 1.0
    assert abs(row.baseline_value - 6e9 / 400e9) < 1e-12
    assert computed_bound_row("generate_s_512", 1.0, {torch.bfloat16: 6e9}, 0, seconds, "s", {}) == []


def test_the_products_winograd_layers_skip_are_counted_per_call():
    """A 3x3 convolution over a 7x9 output by F(2x2, 3x3) computes 4x5 tiles of 16 products per
    channel pair where the direct convolution does 9 per output pixel."""
    from benchmarks.measure import winograd_flops_saved
    from dfd_data.winograd import WinogradConv3x3

    conv = WinogradConv3x3(nn.Conv2d(16, 24, 3), torch.float32)
    x = torch.randn(2, 16, 9, 11)
    nominal = forward_flops(lambda: nn.Conv2d(16, 24, 3)(x))
    assert nominal == 2 * 2 * 16 * 24 * 9 * 7 * 9
    assert winograd_flops_saved(nn.Sequential(conv), lambda: conv(x)) == nominal - 2 * 2 * 16 * 24 * 16 * 4 * 5
    assert winograd_flops_saved(nn.Sequential(conv), lambda: conv(x[0])) == (nominal - 2 * 2 * 16 * 24 * 16 * 4 * 5) // 2


def test_the_numpy_projection_baseline_does_the_same_work():
    """The well-done numpy baseline finds the same neighbours and weights as the toolkit."""
    from benchmarks.suite import numpy_projection
    from dfd_model.projection import project

    generator = torch.Generator().manual_seed(2)
    bank, query = torch.randn(3_000, 64, generator=generator), torch.randn(1, 64, generator=generator)
    ours = project(query, bank, 10)[0][0].double().numpy()
    theirs = numpy_projection(bank.numpy(), (bank.double() ** 2).sum(1).float().numpy(), query.numpy()[0])
    assert abs(ours - theirs).max() < 1e-5


def test_the_other_copy_baseline_searches_from_the_other_copy():
    """The projection rows' second-copy baseline must search from the copy it names (bf16
    beside int8, int8 beside bf16), with the same results as the toolkit's own copy."""
    from benchmarks.suite import _index_with_copy, _other_copy
    from dfd_model.projection import LOW_PRECISION_ROWS, SearchIndex, project

    generator = torch.Generator().manual_seed(4)
    bank = torch.randn(LOW_PRECISION_ROWS + 1, 512, generator=generator)
    index = SearchIndex.of(bank)
    other = _other_copy(index)
    if other is None:
        pytest.skip("this CPU scores from one copy only (bf16; torch's int8 kernel is not vectorised here)")
    alternative = _index_with_copy(bank, other)
    assert {index.copy_scoring(1), alternative.copy_scoring(1)} == {"bf16", "int8"}
    query = bank[5:6] + 0.3 * torch.randn(1, 512, generator=generator)
    for ours, theirs in zip(project(query, bank, 10, index=index), project(query, bank, 10, index=alternative)):
        assert torch.equal(ours, theirs)


def test_the_plain_filter_and_crop_baselines_compute_what_the_toolkit_computes(shared_data):
    """The baselines of the filter and crop rows do the toolkit's work, so their ratios are the
    cost of its way of doing it; on real CelebA-HQ faces at 512 px."""
    import cv2
    import numpy as np

    from benchmarks import plain_filters
    from dfd_data import sketch_filters
    from dfd_data.components import crop_components
    from dfd_data.image_io import decode_image, encode_png, read_image
    from dfd_data.sketch_methods import DEFAULT_PARAMS, resolve_method, run_method

    photos = sorted((shared_data / "celebahq").glob("*.jpg"))[::2]  # (the bounds below hold on all 56)
    faces = [cv2.resize(read_image(path), (512, 512), interpolation=cv2.INTER_AREA) for path in photos]
    for face in faces:
        for params in (DEFAULT_PARAMS["photocopy"], {"mask_radius": 4.0, "sharpness": 0.5, "pct_black": 0.4}):
            difference = np.abs(sketch_filters.photocopy(face, **params).astype(int)
                                - plain_filters.photocopy(face, **params))
            # (blur rounding moves a few pixels across GIMP's cut to solid toner at a neighbourhood
            # of 2 tones: up to 0.33% of a face)
            assert (difference <= 1).mean() > 0.99
        difference = np.abs(sketch_filters.pencil(face).astype(int) - plain_filters.pencil(face))
        # OpenCV blurs uint8 in fixed point: the blurs differ by at most 1 tone, which the dodge's
        # division magnifies where the blurred negative is nearly white
        assert (difference <= 1).mean() > 0.98 and difference.mean() < 0.15  # (worst face: 0.984, 0.088)
        ours, plain = sketch_filters.canny(face) == 0, plain_filters.canny(face) == 0
        near_ours = cv2.dilate(ours.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert plain.sum() > 0.3 * ours.sum() and (plain & near_ours).sum() > 0.95 * plain.sum()  # (0.37, 0.974)
        cropped = crop_components(face)
        for name, png in plain_filters.crop_and_encode(face).items():
            assert np.array_equal(decode_image(png, name), cropped[name])
            assert np.array_equal(decode_image(encode_png(cropped[name]), name), cropped[name])
    batched = run_method(resolve_method("photocopy"), faces[:8], "cpu", 8)  # (threads over the faces)
    assert all(np.array_equal(sketch, sketch_filters.photocopy(face, **DEFAULT_PARAMS["photocopy"]))
               for sketch, face in zip(batched, faces))


def test_a_network_method_s_baseline_runs_it_with_plain_eager_networks(sample_dataset):
    """The baseline of a network sketch method's row is the same method whose networks are the
    eager copies (plain layers, float32, NCHW); outside the block, the toolkit's own again."""
    import numpy as np

    from benchmarks.suite import eager_networks
    from dfd_data import sketch_methods
    from dfd_data.image_io import read_image
    from dfd_data.inference_graph import ConvActivation
    from dfd_data.sketch_methods import resolve_method, run_method

    def fused_layers(model) -> int:
        return sum(isinstance(module, ConvActivation) for module in model.modules())

    method = resolve_method("pencil+simplify")
    weights = method.params["simplify"]["weights"]
    face = read_image(sample_dataset / "images" / "astronaut.png")
    ours = run_method(method, [face], "cpu", 1)[0]
    copies = {}
    for _ in range(2):  # (the suite enters the block for each eager call, timed in turn with the toolkit's)
        with eager_networks(copies):
            plain = sketch_methods._simplifier_model(weights, "cpu", "auto")
            assert fused_layers(plain) == 0 and plain.compute_dtype == torch.float32
            eager = run_method(method, [face], "cpu", 1)[0]
        assert fused_layers(sketch_methods._simplifier_model(weights, "cpu", "auto")) > 0
    assert list(copies.values()) == [plain]  # (copied once)
    difference = np.abs(ours.astype(int) - eager)
    assert difference.mean() < 2  # (float32 rounding, or bf16's where the toolkit infers in it)


def test_a_network_method_s_row_times_the_toolkit_beside_its_eager_baseline(sample_dataset, monkeypatch):
    """Each row times the toolkit's own networks and, in turn, the eager copies (once both ran
    inside the copies' block, and the row compared the baseline with itself)."""
    import numpy as np

    from benchmarks import suite
    from dfd_data import simplifier
    from dfd_data.image_io import read_image
    from dfd_data.inference_graph import ConvActivation

    models = []
    real_simplify = simplifier.simplify

    def simplify(model, *args, **kwargs):
        models.append(any(isinstance(module, ConvActivation) for module in model.modules()))
        return real_simplify(model, *args, **kwargs)

    monkeypatch.setattr(simplifier, "simplify", simplify)
    monkeypatch.setattr(suite, "METHODS", ("pencil+simplify",))
    monkeypatch.setattr(suite, "hed_rows", lambda *args: [])
    monkeypatch.setattr(suite, "simplifier_rows", lambda *args: [])
    face = read_image(sample_dataset / "images" / "astronaut.png")
    rows = suite.sketch_rows([face, np.ascontiguousarray(face[:, ::-1])] * 2, None, 1)
    assert [row.name for row in rows] == ["sketch_pencil+simplify_img_per_s_512", "sketch_pencil+simplify_img_per_s_512_b4"]
    assert all(row.baseline == "same method, eager fp32 NCHW networks" for row in rows)
    assert models == [True, False] * 4  # (warm-up and one timed run per batch size, the toolkit's then the copy's)
