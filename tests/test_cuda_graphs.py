"""CUDA graphs for inference (dfd_model/cuda_graphs.py).

The bookkeeping (first sight eager, capture on the second, replay after, inputs copied in,
outputs copied out, a shape limit, a failed capture not retried) is checked on the CPU with a
stand-in graph that recomputes on replay. The real graphs are checked where there is a CUDA
device: replayed faces equal eager ones, graphs follow weights loaded in place, and are
dropped when `.to()` replaces the weights.
"""
from __future__ import annotations

import copy

import pytest
import torch

from dfd_data.devices import prepare_for_inference
from dfd_model import cuda_graphs
from dfd_model.config import ModelConfig
from dfd_model.cuda_graphs import CudaGraphs
from dfd_model.sketch_to_face import SketchToFace

from .test_model_networks import TINY, random_banks, random_sketches

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: CUDA graphs exist only there")


class RecomputingGraphs(CudaGraphs):
    """CudaGraphs whose 'graph' runs the function again into the captured output buffers."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.captures, self.fail = 0, fail

    def _capture(self, function, inputs):
        self.captures += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        static_inputs = tuple(value.clone() for value in inputs)
        static_outputs = function(*static_inputs)

        class Replay:
            @staticmethod
            def replay():
                for buffer, value in zip(static_outputs, function(*static_inputs)):
                    buffer.copy_(value)
        return Replay(), static_inputs, static_outputs


def double_and_sum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x * 2, x.sum(dim=1)


def test_a_step_is_captured_on_its_second_call_and_replayed_on_new_inputs():
    graphs = RecomputingGraphs()
    first, second, third = (torch.full((2, 3), float(v)) for v in (1, 2, 3))
    assert torch.equal(graphs.run("step", double_and_sum, first)[0], first * 2)
    assert (graphs.captures, len(graphs)) == (0, 0)  # a shape met once never pays for a capture
    doubled, summed = graphs.run("step", double_and_sum, second)
    assert (graphs.captures, len(graphs)) == (1, 1)
    again = graphs.run("step", double_and_sum, third)
    assert graphs.captures == 1
    # every call computes on its own inputs, and earlier results are not overwritten by replays
    assert torch.equal(doubled, second * 2) and torch.equal(summed, second.sum(dim=1))
    assert torch.equal(again[0], third * 2) and torch.equal(again[1], third.sum(dim=1))


def test_shapes_layouts_and_steps_are_captured_apart_up_to_a_limit(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "MAX_SHAPES", 2)
    graphs = RecomputingGraphs()
    inputs = [torch.ones(1, 3), torch.ones(2, 3), torch.ones(3, 2).t(), torch.ones(4, 3)]
    for x in inputs + inputs:
        graphs.run("step", double_and_sum, x)
    assert graphs.captures == 2  # the first two shapes; the others run eagerly
    graphs.run("other", double_and_sum, inputs[0])
    graphs.run("other", double_and_sum, inputs[0])
    assert graphs.captures == 3
    # a transposed view has the shape of a [2, 3] tensor but not its strides: not the same graph
    assert torch.equal(graphs.run("step", double_and_sum, inputs[2])[0], inputs[2] * 2)


def test_a_failed_capture_raises_once_then_the_step_runs_eagerly():
    graphs = RecomputingGraphs(fail=True)
    x = torch.ones(2, 3)
    graphs.run("step", double_and_sum, x)
    with pytest.raises(RuntimeError, match="capturing"):
        graphs.run("step", double_and_sum, x)
    assert torch.equal(graphs.run("step", double_and_sum, x)[0], x * 2)
    assert graphs.captures == 1


def test_copies_of_a_model_start_without_graphs():
    graphs = RecomputingGraphs()
    graphs.run("step", double_and_sum, torch.ones(2, 3))
    graphs.run("step", double_and_sum, torch.ones(2, 3))
    assert len(graphs) == 1
    assert len(copy.deepcopy(graphs)) == 0


# ---- on a CUDA device ---------------------------------------------------------------------------
CUDA = torch.device("cuda")


def prepared_tiny(precision: str, seed: int = 0) -> SketchToFace:
    torch.manual_seed(seed)
    return prepare_for_inference(SketchToFace(ModelConfig(**TINY), random_banks(TINY["latent_dim"])), CUDA, precision)


# How far a replayed face may be from an eager one, in output units ([-1, 1]): cuDNN may pick
# other convolution algorithms while capturing, which round differently; a stale input or
# weight would be off by tenths.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def assert_same_face(ours: torch.Tensor, eager: torch.Tensor, model: SketchToFace) -> None:
    difference = largest_difference(ours, eager)
    print(f"largest difference from eager ({model.compute_dtype}): {difference:.3g}")
    assert difference <= TOLERANCE[model.compute_dtype]


def faces(model: SketchToFace, sketches: torch.Tensor, graphs: bool) -> list[torch.Tensor]:
    model.use_cuda_graphs = graphs
    with torch.inference_mode():
        return [model(sketch[None], refine=0.7, gender="female") for sketch in sketches]


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_replayed_faces_equal_eager_ones(precision):
    model = prepared_tiny(precision)
    sketches = random_sketches(4, TINY["resolution"], seed=3)
    expected = faces(model, sketches, graphs=False)
    assert len(model.cuda_graphs) == 0
    got = faces(model, sketches, graphs=True)
    assert len(model.cuda_graphs) == 2  # the encoders and the synthesis, at batch 1
    for index, ours in enumerate(got):
        assert_same_face(ours, expected[index], model)
        if model.compute_dtype == torch.float32:
            # computed from its own sketch, not a stale one: nearer its eager face than any
            # other (random weights make faces differ little: about 1e-4 between these
            # sketches, which bf16 may round away; the replay code is the same in both)
            own = largest_difference(ours, expected[index])
            assert all(own < largest_difference(ours, other) for other in expected[:index] + expected[index + 1:])


@needs_cuda
def test_graphs_follow_weights_loaded_in_place_and_are_dropped_when_weights_move():
    model, other = prepared_tiny("fp32"), prepared_tiny("fp32", seed=1)
    sketches = random_sketches(2, TINY["resolution"], seed=4)
    faces(model, sketches, graphs=True)
    assert len(model.cuda_graphs) == 2
    model.load_state_dict(other.state_dict())  # copied into the captured weights
    assert_same_face(faces(model, sketches[:1], graphs=True)[0], faces(other, sketches[:1], graphs=False)[0], model)
    model.half().float()  # new weight tensors: the graphs would read freed memory
    assert len(model.cuda_graphs) == 0
    assert_same_face(faces(model, sketches, graphs=True)[1], faces(model, sketches, graphs=False)[1], model)


@needs_cuda
def test_no_graphs_outside_inference_mode_or_for_batches_met_once():
    model = prepared_tiny("fp32")
    sketches = random_sketches(3, TINY["resolution"], seed=5)
    with torch.no_grad():
        model(sketches[:1])
        model(sketches[:1])
    with torch.inference_mode():
        model(sketches)  # a batch of 3, once
    assert len(model.cuda_graphs) == 0
