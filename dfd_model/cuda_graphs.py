"""Fixed-shape inference steps replayed as CUDA graphs: one launch where eager PyTorch makes hundreds.

Why: one face at batch 1 launches about 1,200 kernels, and on a fast GPU the host issuing them
is the bottleneck (README: 32 ms a face on an H200 against 0.7 ms of arithmetic), which is
what the drawing app waits for after every stroke. A CUDA graph records the kernels of one
call and replays them all with one launch.

A step is captured the second time it is called with the same input shapes, dtypes and
layouts, so shapes met once (the last, smaller batch of `dfd-model generate`) never pay for a
capture. Inputs are copied into the graph's own buffers, and outputs are copied out of them,
so callers get tensors of their own. A graph reads the weights where they were when it was
captured: `SketchToFace` drops its graphs whenever `.to()` and friends replace them
(`load_state_dict` copies into them in place, which graphs see).
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

# Shapes kept captured per step; a shape beyond them runs eagerly. Each graph keeps the
# activation memory of one call.
MAX_SHAPES = 4
_SEEN, _EAGER = "seen once", "capture failed"


def _signature(tensors: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


class CudaGraphs:
    """The captured steps of one model. Steps share one memory pool and one lock: a pool can
    be shared only by graphs that never run at the same time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pool = None
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple, tuple] | str] = {}

    def __deepcopy__(self, memo) -> "CudaGraphs":
        return CudaGraphs()  # a copy has weights of its own: its graphs must be captured afresh

    def __reduce__(self):
        return CudaGraphs, ()

    def __len__(self) -> int:
        """How many graphs are captured."""
        return sum(isinstance(entry, tuple) for entry in self._graphs.values())

    def run(self, step: str, function: Callable[..., tuple[torch.Tensor, ...]],
            *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`function(*inputs)`, a tuple of tensors, computed by replaying its graph where one
        is (or can now be) captured for these inputs; eagerly otherwise."""
        key = (step, _signature(inputs))
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None and sum(k[0] == step for k in self._graphs) < MAX_SHAPES:
                self._graphs[key] = entry = _SEEN  # first sight: eager, and remembered
                return function(*inputs)
            if entry is None or entry is _EAGER:
                return function(*inputs)
            if entry is _SEEN:
                self._graphs[key] = _EAGER  # (stays so if the capture raises: it is not tried again)
                self._graphs[key] = entry = self._capture(function, inputs)
            graph, static_inputs, static_outputs = entry
            for buffer, value in zip(static_inputs, inputs):
                buffer.copy_(value)
            graph.replay()
            return tuple(output.clone() for output in static_outputs)

    def _capture(self, function, inputs: tuple[torch.Tensor, ...]):
        static_inputs = tuple(value.clone() for value in inputs)
        device = inputs[0].device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device)  # warm up off the default stream, as capture requires
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            function(*static_inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_outputs = function(*static_inputs)
        return graph, static_inputs, static_outputs


def graphs_apply(inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether a step on these inputs can run as a graph: every input on a CUDA device, under
    inference mode (the graph's buffers are inference tensors, and no autograd is recorded)."""
    return torch.is_inference_mode_enabled() and all(t.device.type == "cuda" for t in inputs)


__all__ = ["CudaGraphs", "MAX_SHAPES", "graphs_apply"]
