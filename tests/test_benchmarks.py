"""The benchmark suite's baselines measure what they claim: the eager copy of a model
prepared for inference runs plain layers and counts the FLOPs of the original network."""
import copy

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


def test_the_mixed_bound_times_the_encoders_at_the_float32_rate_and_the_rest_at_bf16():
    """The full model's encoders compute in float32 by design: its bound at the rates it
    computes in charges their FLOPs at the float32 matmul rate, the rest at bf16's."""
    from benchmarks.suite import MATMUL_FLOPS, mixed_bound_rows

    result = {"ours": 1.0, "flops": 10e9, "encoder_flops": 2e9, "dtype": "bfloat16"}
    seconds = {torch.float32: MATMUL_FLOPS / 100e9, torch.bfloat16: MATMUL_FLOPS / 400e9}  # 100 and 400 GFLOP/s
    (row,) = mixed_bound_rows("generate_s_512", result, seconds, {})
    assert row.name == "generate_s_512_vs_mixed_bound" and row.value == 1.0
    assert abs(row.baseline_value - (2e9 / 100e9 + 8e9 / 400e9)) < 1e-12
    assert mixed_bound_rows("generate_s_512", {**result, "dtype": "float32"}, seconds, {}) == []
