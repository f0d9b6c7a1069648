"""Fixed-shape inference steps replayed as CUDA graphs: one launch where eager PyTorch makes hundreds.

Why: one face at batch 1 launches about 1,200 kernels, and on a fast GPU the host issuing them
is the bottleneck (README: 24 ms a face on an H200 against 0.7 ms of arithmetic), which is
what the drawing app waits for after every stroke. A CUDA graph records the kernels of one
call and replays them all with one launch.

A step is captured the second time it runs, without error, with the same input shapes,
dtypes, layouts, autocast state and model compute dtype, so shapes met once (the last,
smaller batch of `dfd-model generate`) never pay for a capture. Inputs are copied into the
graph's own buffers and outputs out of them, so callers get tensors of their own.

A graph reads the weights at the addresses they had when it was captured (and keeps them
alive). Before every replay the model's weights are checked: where any tensor moved (`.to()`
on the model or a part of it, `load_state_dict(assign=True)`, a new Parameter or module set
on any part), the graphs are dropped and captured afresh; `load_state_dict` copying into the
weights keeps them. Weights swapped in without registering them (torch.func.functional_call,
a parameter deleted or set to None) are not seen: turn graphs off for such uses.
"""
from __future__ import annotations

import sys
import threading
import warnings
from typing import Callable

import torch
from torch import nn

# Shapes captured per step; further shapes run eagerly. A model's graphs share one memory
# pool and one capture stream, so a graph reuses the memory earlier ones freed there.
MAX_SHAPES = 4
# Shapes remembered as seen once (a capture waits for the second call), per model.
_SEEN_LIMIT = 64

# Bumped whenever any module anywhere gets a new submodule, parameter or buffer: only then
# must a model's structure be walked again (about 10 ms for the full model, against 0.1 ms
# to check the addresses of the weights already known).
_structure_changes = 0
# PyTorch allows one capture at a time in a process, whatever the model.
_capturing = threading.Lock()


def _count_change(*_args) -> None:
    global _structure_changes
    _structure_changes += 1


for _register in (nn.modules.module.register_module_module_registration_hook,
                  nn.modules.module.register_module_parameter_registration_hook,
                  nn.modules.module.register_module_buffer_registration_hook):
    _register(_count_change)


def _signature(tensors: tuple[torch.Tensor, ...]) -> tuple:
    device = tensors[0].device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return (autocast,) + tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


class _Weights:
    """The tensors a model's graphs read, and the addresses they had at capture. Their memory
    is held, so no other tensor (the weights in another dtype, say) can take an address the
    check compares, and a replay that the check cannot see through reads old weights, never
    freed memory."""

    def __init__(self, model: nn.Module):
        self.owner, self.changes = id(model), _structure_changes
        self.tensors = [*model.parameters(), *model.buffers()]
        self.addresses = [t.data_ptr() for t in self.tensors]
        self.held = [t.detach() for t in self.tensors]

    def still_in(self, model: nn.Module) -> bool:
        if id(model) != self.owner:  # a replica sharing this object (nn.DataParallel)
            return False
        if _structure_changes != self.changes:
            changes, tensors = _structure_changes, [*model.parameters(), *model.buffers()]
            if len(tensors) != len(self.tensors) or any(a is not b for a, b in zip(tensors, self.tensors)):
                return False
            self.changes = changes
        return all(t.data_ptr() == address for t, address in zip(self.tensors, self.addresses))


class CudaGraphs:
    """The captured steps of one model. Steps share one memory pool and one lock, and each
    replay waits for the one before it on the GPU too: a shared pool must never be used by
    two graphs at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seen: set[tuple] = set()
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple, tuple]] = {}  # graph, outputs, inputs
        self._pool = self._stream = self._weights = self._done = None
        self.failed: str | None = None  # why capturing failed: the model then runs eagerly

    def __deepcopy__(self, memo) -> "CudaGraphs":
        return CudaGraphs()  # a copy has weights of its own: its graphs must be captured afresh

    def __reduce__(self):
        return CudaGraphs, ()

    def __len__(self) -> int:
        """How many graphs are captured."""
        return len(self._graphs)

    @property
    def in_use(self) -> bool:
        """Whether anything was captured, remembered or held (weights, a pool, a failure)."""
        return bool(self._graphs or self._seen or self._weights or self._pool or self.failed)

    def run(self, model: nn.Module, step: str, function: Callable[..., tuple[torch.Tensor, ...]],
            *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`function(*inputs)`, a tuple of tensors computed by `model`'s weights, replayed from
        its graph where one is (or can now be) captured for these inputs; eagerly otherwise."""
        key = (step, getattr(model, "compute_dtype", None)) + _signature(inputs)
        with self._lock:
            if self._weights is not None and not self._weights.still_in(model):
                self._drop()
            entry = self._graphs.get(key)
            if entry is None:
                if self.failed or key not in self._seen \
                        or sum(k[0] == step for k in self._graphs) >= MAX_SHAPES:
                    outputs = function(*inputs)
                    if len(self._seen) >= _SEEN_LIMIT:
                        self._seen.clear()
                    self._seen.add(key)  # (a call that raised is not a shape seen)
                    return outputs
                entry = self._capture(model, step, function, inputs)
                if entry is None:
                    return function(*inputs)
                self._graphs[key] = entry
            return self._replay(*entry, inputs)

    def _drop(self) -> None:
        self._graphs.clear()
        self._seen.clear()
        self._pool = self._stream = self._weights = self._done = None

    def _capture(self, model: nn.Module, step: str, function, inputs: tuple[torch.Tensor, ...]):
        """The graph, its output and its input buffers; None (with a warning, and the model
        eager from then on) where capturing fails. An error of the warm-up run (out of
        memory, say) is the call's own, as it would be eagerly."""
        static_inputs = tuple(value.clone() for value in inputs)
        self._warm_up(function, static_inputs)
        if self._weights is None:
            self._weights = _Weights(model)
        try:
            return (*self._record(function, static_inputs), static_inputs)
        except Exception as error:  # noqa: BLE001 - any failure: report it, run eagerly
            self._drop()
            self.failed = f"capturing the {step} step failed ({type(error).__name__}: {error})"
            warnings.warn(f"CUDA graphs are off for this model: {self.failed}; it runs eagerly",
                          RuntimeWarning, stacklevel=_outside_this_package())
            return None

    def _warm_up(self, function, static_inputs: tuple[torch.Tensor, ...]) -> None:
        """One run on the stream the capture will use, which needs its own library
        workspaces (cuBLAS) made before capturing; one stream for all the model's captures,
        so that its graphs reuse one another's memory in their pool."""
        device = static_inputs[0].device
        with torch.cuda.device(device):
            if self._stream is None:
                self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)
            self._stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self._stream):
                function(*static_inputs)

    def _record(self, function, static_inputs: tuple[torch.Tensor, ...]) -> tuple[torch.cuda.CUDAGraph, tuple]:
        """`function` on the buffers `static_inputs`, captured: the graph and its outputs."""
        device = static_inputs[0].device
        with torch.cuda.device(device):
            caller = torch.cuda.current_stream(device)
            try:
                graph = torch.cuda.CUDAGraph()
                # ("thread_local": another thread's synchronising calls meanwhile are no error)
                with _capturing, torch.cuda.graph(graph, pool=self._pool, stream=self._stream,
                                                  capture_error_mode="thread_local"):
                    static_outputs = function(*static_inputs)
                caller.wait_stream(self._stream)
                return graph, static_outputs
            finally:
                torch.cuda.set_stream(caller)  # (a failed capture leaves its stream current)

    def _replay(self, graph: torch.cuda.CUDAGraph, static_outputs: tuple, static_inputs: tuple,
                inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        device = inputs[0].device
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            if self._done is not None:
                stream.wait_event(self._done)  # (the last replay ran on another caller's stream)
            for buffer, value in zip(static_inputs, inputs):
                buffer.copy_(value)
            graph.replay()
            outputs = tuple(output.clone() for output in static_outputs)
            self._done = stream.record_event()
        return outputs


def _outside_this_package() -> int:
    """The warnings stacklevel of the first caller outside dfd_model and torch (a model's
    __call__), counted from the caller of this."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("dfd_model.", "torch.")):
        frame, level = frame.f_back, level + 1
    return level


def graphs_apply(inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether a step on these inputs can run as a graph: every input on one CUDA device,
    under inference mode (the graph's buffers are inference tensors, and no autograd is
    recorded)."""
    return torch.is_inference_mode_enabled() and inputs[0].device.type == "cuda" \
        and all(t.device == inputs[0].device for t in inputs)


__all__ = ["CudaGraphs", "MAX_SHAPES", "graphs_apply"]
