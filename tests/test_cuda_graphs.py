"""CUDA graphs for inference (dfd_model/cuda_graphs.py).

The bookkeeping (first sight eager, capture on the second, replay after, inputs copied in,
outputs copied out, a shape limit, graphs dropped when weights move, a failed capture
reported and not retried) is checked on the CPU with a stand-in graph that recomputes on
replay. The real graphs are checked where there is a CUDA
device: replayed faces equal eager ones, graphs follow weights loaded in place, and are
dropped when `.to()` replaces the weights.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from dfd_data.devices import prepare_for_inference
from dfd_model import cuda_graphs
from dfd_model.config import ModelConfig
from dfd_model.cuda_graphs import CudaGraphs
from dfd_model.projection import FeatureBank
from dfd_model.sketch_to_face import SketchToFace

from .test_model_networks import TINY, random_banks, random_sketches

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: CUDA graphs exist only there")


class RecomputingGraphs(CudaGraphs):
    """CudaGraphs whose 'graph' runs the function again into the captured output buffers."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.captures, self.fail = 0, fail

    def _warm_up(self, function, static_inputs):
        function(*static_inputs)

    def _record(self, function, static_inputs):
        self.captures += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        static_outputs = function(*static_inputs)

        class Replay:
            @staticmethod
            def replay():
                for buffer, value in zip(static_outputs, function(*static_inputs)):
                    buffer.copy_(value)
        return Replay(), static_outputs

    def _replay(self, graph, static_outputs, static_inputs, inputs):
        for buffer, value in zip(static_inputs, inputs):
            buffer.copy_(value)
        graph.replay()
        return tuple(output.clone() for output in static_outputs)


def double_and_sum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x * 2, x.sum(dim=1)


MODEL = nn.Linear(3, 3)  # the weights the graphs check; double_and_sum does not read them


def test_a_step_is_captured_on_its_second_call_and_replayed_on_new_inputs():
    graphs = RecomputingGraphs()
    first, second, third = (torch.full((2, 3), float(v)) for v in (1, 2, 3))
    assert torch.equal(graphs.run(MODEL, "step", double_and_sum, first)[0], first * 2)
    assert (graphs.captures, len(graphs)) == (0, 0)  # a shape met once never pays for a capture
    doubled, summed = graphs.run(MODEL, "step", double_and_sum, second)
    assert (graphs.captures, len(graphs)) == (1, 1)
    again = graphs.run(MODEL, "step", double_and_sum, third)
    assert graphs.captures == 1
    # every call computes on its own inputs, and earlier results are not overwritten by replays
    assert torch.equal(doubled, second * 2) and torch.equal(summed, second.sum(dim=1))
    assert torch.equal(again[0], third * 2) and torch.equal(again[1], third.sum(dim=1))


def test_shapes_layouts_and_steps_are_captured_apart_up_to_a_limit(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "MAX_SHAPES", 2)
    graphs = RecomputingGraphs()
    inputs = [torch.ones(1, 3), torch.ones(2, 3), torch.ones(3, 2).t(), torch.ones(4, 3)]
    for x in inputs + inputs:
        graphs.run(MODEL, "step", double_and_sum, x)
    assert graphs.captures == 2  # the first two shapes; the others run eagerly
    graphs.run(MODEL, "other", double_and_sum, inputs[0])
    graphs.run(MODEL, "other", double_and_sum, inputs[0])
    assert graphs.captures == 3
    # a transposed view has the shape of a [2, 3] tensor but not its strides: not the same graph
    assert torch.equal(graphs.run(MODEL, "step", double_and_sum, inputs[2])[0], inputs[2] * 2)


def test_shapes_met_once_do_not_use_up_the_limit(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "MAX_SHAPES", 1)
    graphs = RecomputingGraphs()
    for rows in (1, 2, 3, 5):  # a run's odd batches, each once
        graphs.run(MODEL, "step", double_and_sum, torch.ones(rows, 3))
    graphs.run(MODEL, "step", double_and_sum, torch.ones(4, 3))
    graphs.run(MODEL, "step", double_and_sum, torch.ones(4, 3))
    assert graphs.captures == 1


def test_autocast_and_the_model_compute_dtype_are_part_of_a_step():
    graphs, model = RecomputingGraphs(), nn.Linear(3, 3)
    x = torch.ones(2, 3)
    for _ in range(2):
        graphs.run(model, "step", double_and_sum, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            graphs.run(model, "step", double_and_sum, x)
    model.compute_dtype = torch.bfloat16
    for _ in range(2):
        graphs.run(model, "step", double_and_sum, x)
    assert graphs.captures == 3


@pytest.mark.parametrize("change", ["load_state_dict", "assign", "new_parameter", "new_module", "half",
                                    "replica"])
def test_graphs_are_dropped_when_the_weights_they_read_move(change):
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    graphs = RecomputingGraphs()
    x = torch.ones(2, 3)

    def call(on=model):
        return graphs.run(on, "step", lambda value: (on(value),), x)
    call(), call()
    assert (graphs.captures, len(graphs)) == (1, 1)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    if change == "load_state_dict":  # copied into the weights the graph reads: it stays
        model.load_state_dict(state)
    elif change == "assign":
        model.load_state_dict(state, assign=True)
    elif change == "new_parameter":
        model[0].bias = nn.Parameter(torch.zeros(3))
    elif change == "new_module":
        model[1] = nn.Linear(3, 3)
    elif change == "half":
        model[0].half().float()  # a part of the model: new tensors behind the same Parameters
    on = copy.copy(model) if change == "replica" else model  # (nn.DataParallel copies modules so)
    call(on)
    assert len(graphs) == (1 if change == "load_state_dict" else 0)
    call(on)  # captured again on the second call after the change
    assert graphs.captures == (1 if change == "load_state_dict" else 2)


def test_a_failed_capture_warns_once_and_leaves_the_model_eager():
    graphs = RecomputingGraphs(fail=True)
    x = torch.ones(2, 3)
    graphs.run(MODEL, "step", double_and_sum, x)
    with pytest.warns(RuntimeWarning, match="CUDA graphs are off for this model: capturing the step step "
                                            "failed .RuntimeError: operation not permitted") as caught:
        assert torch.equal(graphs.run(MODEL, "step", double_and_sum, x)[0], x * 2)
    assert caught[0].filename == __file__  # the caller's line, not the toolkit's
    for _ in range(2):
        assert torch.equal(graphs.run(MODEL, "other", double_and_sum, x)[0], x * 2)
    assert graphs.captures == 1 and graphs.failed


def test_calls_that_raise_are_not_shapes_seen_and_do_not_turn_graphs_off():
    graphs, calls = RecomputingGraphs(), []

    def picky(x):  # its 1st and 3rd runs fail, as a caller's bad input or a passing error would
        calls.append(x)
        if len(calls) in (1, 3):
            raise ValueError("not this time")
        return (x + 1,)
    x = torch.ones(2, 3)
    with pytest.raises(ValueError):
        graphs.run(MODEL, "step", picky, x)
    graphs.run(MODEL, "step", picky, x)
    assert graphs.captures == 0  # the failed call did not count as the shape's first
    with pytest.raises(ValueError):  # the warm-up before capturing fails: the call's own error
        graphs.run(MODEL, "step", picky, x)
    assert not graphs.failed
    assert torch.equal(graphs.run(MODEL, "step", picky, x)[0], x + 1)
    assert graphs.captures == 1 and not graphs.failed


def test_copies_of_a_model_start_without_graphs():
    graphs = RecomputingGraphs()
    graphs.run(MODEL, "step", double_and_sum, torch.ones(2, 3))
    graphs.run(MODEL, "step", double_and_sum, torch.ones(2, 3))
    assert len(graphs) == 1
    assert len(copy.deepcopy(graphs)) == 0


def test_the_encoders_and_the_search_on_the_device_are_one_step_giving_the_host_searchs_results(monkeypatch):
    """On a GPU the five encoders and the five bank searches (projection_on_device) are one
    step, captured as one graph, whose trust flags are read back once. Here on the CPU, through
    the stand-in graphs, against the host's search; banks set afresh drop the graph, which
    read the old ones."""
    from dfd_model import sketch_to_face

    torch.manual_seed(0)
    model = prepare_for_inference(SketchToFace(ModelConfig(**TINY), random_banks(TINY["latent_dim"])),
                                  torch.device("cpu"), "fp32")
    sketches = random_sketches(3, TINY["resolution"], seed=3)

    def encoded() -> list:
        with torch.inference_mode():
            return [model.encode_and_match(sketch[None], refine={"nose": 0.0, "mouth": 0.5}, gender="female")
                    for sketch in sketches]

    expected = encoded()  # (on the CPU the search runs on the host)
    monkeypatch.setattr(sketch_to_face, "searches_on_device", lambda device: True)
    monkeypatch.setattr(sketch_to_face, "graphs_apply", lambda inputs: True)
    model.cuda_graphs = graphs = RecomputingGraphs()
    got = encoded()
    assert (graphs.captures, len(graphs)) == (1, 1)
    for (latents, matches), (expected_latents, expected_matches) in zip(got, expected):
        for name in latents:
            assert torch.allclose(latents[name], expected_latents[name], atol=1e-6)
            assert torch.equal(matches[name].indices, expected_matches[name].indices)
            assert torch.allclose(matches[name].weights, expected_matches[name].weights, atol=1e-6)
    # a graph keeps the settings it met: other settings are another step
    model.config = dataclasses.replace(model.config, knn=3)
    with torch.inference_mode():
        assert model.encode_and_match(sketches[:1], gender="female")[1]["mouth"].indices.shape == (1, 3)
    model.set_banks(random_banks(TINY["latent_dim"], seed=1))
    assert len(model.cuda_graphs) == 0 and not model.cuda_graphs.in_use
    # a component whose bank lacks the gender is not searched unless asked for, as on the host
    banks = random_banks(TINY["latent_dim"]).flat()
    del banks["nose/male"]
    model.set_banks(FeatureBank.from_flat(banks))
    model.cuda_graphs = RecomputingGraphs()
    with torch.inference_mode():
        ours = model.encode(sketches[:1], refine={"nose": 0.0}, gender="male")
        with pytest.raises(ValueError, match="feature bank nose has no gender 'male'"):
            model.encode(sketches[:1], gender="male")
        monkeypatch.setattr(sketch_to_face, "searches_on_device", lambda device: False)
        on_host = model.encode(sketches[:1], refine={"nose": 0.0}, gender="male")
    assert all(torch.allclose(ours[name], on_host[name], atol=1e-6) for name in on_host)


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
    third = prepared_tiny("fp32", seed=2)
    model.load_state_dict(third.state_dict(), assign=True)  # new weight tensors: graphs captured again
    del third
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
    faces(model, sketches[:2], graphs=True)
    assert len(model.cuda_graphs) == 2
    faces(model, sketches[:1], graphs=False)  # turned off: the graphs and their memory go
    assert len(model.cuda_graphs) == 0


@needs_cuda
def test_a_capture_that_fails_on_the_gpu_warns_and_leaves_the_model_working():
    model = nn.Linear(4, 4).to(CUDA)
    graphs, x = CudaGraphs(), torch.ones(2, 4, device=CUDA)

    def syncing(value):  # reads a value back to the host: not allowed while capturing
        return (model(value) * float(value.sum()),)
    with torch.inference_mode():
        graphs.run(model, "step", syncing, x)
        with pytest.warns(RuntimeWarning, match="CUDA graphs are off for this model"):
            got = graphs.run(model, "step", syncing, x)
        assert torch.equal(got[0], syncing(x)[0])
        assert torch.cuda.current_stream() == torch.cuda.default_stream()
        assert torch.equal(graphs.run(model, "step", syncing, x)[0], got[0]) and len(graphs) == 0
