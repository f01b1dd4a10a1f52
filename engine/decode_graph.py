"""Decode steps replayed as the list of kernel calls they make, without the Python that makes them.

On CPU a decode step of one sequence is ~330 calls of kvserve's native kernels (engine/csrc: the matmuls,
norms, rotary, the KV write, the paged attention, the LM head), ~10 a layer. The Python around them (module
calls, views, output allocations, argument checks) took about as long as the kernels themselves (perf on a
2-core Zen 4: 40-45% of a step's main thread).

So, like a CUDA graph: the first decode step of each size runs the model's layers and LM head over static
input tensors (holding that step's inputs) with every native call recorded (engine.native.recording_calls:
its ctypes function and the arguments it was given, pointers into the static inputs, the weights, the KV
cache and the outputs allocated on the way, which come from an Arena kept alive here), while a
TorchFunctionMode checks that no PyTorch op but allocations, metadata reads and views ran in between. If so,
the recorded calls compute exactly what the modules compute (the same kernels on the same buffers, in the
same order: the same bits), and later steps of that size only copy their inputs into the static tensors and
replay them. A model whose step runs any other op (GPT-2's LayerNorm, PyTorch's matmuls where kvserve's
integer kernels do not run, ...) is not recorded, and its modules run as before. Only the embedding lookup
stays a PyTorch op, before the replay.

A graph is recorded for each number of decode rows a step has (batch 1, speculative verify steps, any number of
sequences). Their outputs come from one Arena, shared by all of them and reused within a step as the modules
free what they allocated: it holds what the largest step has live at once, not every output of every step. On a
2-core Zen 4 (SmolLM2, in one process, alternated with the modules' steps) a replay saved 2.3 ms of
a 4-row step, 3.1 of a 16-row one and 7.3 of a 64-row one (7%: besides the Python, the modules' step builds its
attention tables and allocates ~90 MB of outputs, which the kernel hands out as fresh pages).
"""

from __future__ import annotations

import ctypes
import math
import sys
import weakref
from dataclasses import dataclass

import numpy
import torch
from torch.overrides import TorchFunctionMode

from engine import native
from engine.attention import AttentionMetadata, DecodeTables

_ALIGN = 64  # bytes: each output taken from the arena starts at a cache line, as PyTorch's CPU allocator aligns


class Arena:
    """The memory a capture takes its kernels' outputs from, handed out again as the step frees them.

    Each output is a tensor of its own over a run of the arena's bytes; when PyTorch frees it (the modules dropped
    every view of it) the run goes back to the free list and a later output of the step may take it, as PyTorch's
    allocator would have reused it. The recorded calls replay in the capture's order, so a run is rewritten only
    after its last reader ran, as in the capture. Every capture starts with the whole arena free: one engine
    thread runs the steps one at a time, so the graphs share it, and it holds the most any one step has live at
    once (a few layers' outputs and the logits), not every output of every step.

    `wanted` is that most, for the latest capture, counted as if the arena were unbounded; past its end outputs
    are allocated as usual and `outgrown` says so (the runner then makes a larger arena and records anew).
    """

    def __init__(self, nbytes: int = 0) -> None:
        raw = numpy.empty(nbytes + _ALIGN, dtype=numpy.uint8)  # pages are backed as they are first written
        skip = -raw.ctypes.data % _ALIGN
        self.buffer = raw[skip:skip + nbytes]
        self._capture = 0
        self.start_capture()

    def start_capture(self) -> None:
        """All of the arena is free: outputs of earlier captures are only read during their graphs' replays."""
        self._capture += 1
        self._free: list[list[int]] = [[0, sys.maxsize]]  # sorted, disjoint [start, end) runs; the last unbounded
        self.wanted = 0
        self.taken = 0  # bytes handed out in all: what the capture's outputs would take without reuse

    @property
    def outgrown(self) -> bool:
        return self.wanted > self.buffer.size

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """An uninitialized tensor in the arena (the first free run that fits), or None past its end."""
        nbytes = math.prod(shape) * dtype.itemsize
        size = max(-(-nbytes // _ALIGN) * _ALIGN, _ALIGN)
        run = next(run for run in self._free if run[1] - run[0] >= size)
        start = run[0]
        run[0] += size
        if run[0] == run[1]:
            self._free.remove(run)
        self.wanted = max(self.wanted, start + size)
        self.taken += size
        if start + size > self.buffer.size:
            return None  # the run stays taken until the next capture: `wanted` counts it
        region = self.buffer[start:start + size]
        # The tensor's storage holds `region` (torch.from_numpy); it is collected once no view of the output is left
        # (nothing to give back at exit: not called then)
        weakref.finalize(region, self._give_back, self._capture, start, size).atexit = False
        return torch.from_numpy(region)[:nbytes].view(dtype).view(shape)

    def _give_back(self, capture: int, start: int, size: int) -> None:
        if capture != self._capture:
            return  # freed after its capture ended: the arena is all free again since
        end = start + size
        at = next(i for i, run in enumerate(self._free) if run[0] >= end)  # the unbounded last run, at the latest
        self._free.insert(at, [start, end])
        if end == self._free[at + 1][0]:  # merged with the run after it, then with the one before
            self._free[at][1] = self._free.pop(at + 1)[1]
        if at > 0 and self._free[at - 1][1] == start:
            self._free[at - 1][1] = self._free.pop(at)[1]


class StepInputs:
    """The input tensors every recorded step reads, for up to `capacity` rows: a step of r rows reads their first
    r rows. One engine thread runs one step at a time (as for the Arena), so the graphs share them, and they take
    the largest step's memory rather than the sum of every step size's (a block table row is the model's whole
    context: 2 KB for SmolLM2, more for longer contexts, times every row of every size)."""

    def __init__(self, capacity: int, hidden_size: int, max_blocks: int) -> None:
        self.capacity = capacity
        self.hidden = torch.zeros(capacity, hidden_size)
        self.positions = torch.zeros(capacity, dtype=torch.long)
        self.slot_mapping = torch.zeros(capacity, dtype=torch.long)
        self.block_tables = torch.zeros(capacity, max_blocks, dtype=torch.int32)
        self.context_lens = torch.zeros(capacity, dtype=torch.int32)

    def first(self, rows: int) -> tuple[torch.Tensor, ...]:
        """The first `rows` rows of each: hidden, positions, slot_mapping, block_tables, context_lens."""
        return (self.hidden[:rows], self.positions[:rows], self.slot_mapping[:rows], self.block_tables[:rows],
                self.context_lens[:rows])


def _allocation(name: str, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], torch.dtype] | None:
    """(shape, dtype) of a contiguous CPU allocation (torch.empty, torch.empty_like, Tensor.new_empty), or None for
    any other kind (a layout, a memory format, another device): those are allocated as usual."""
    if set(kwargs) - {"dtype", "device"} or torch.device(kwargs.get("device") or "cpu").type != "cpu":
        return None
    if name == "empty_like":
        source = args[0]
        if len(args) > 1 or source.device.type != "cpu" or not source.is_contiguous():
            return None
        return tuple(source.shape), kwargs.get("dtype") or source.dtype
    size = args[1:] if name == "new_empty" else args
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = tuple(size[0])
    if name == "new_empty" and args[0].device.type != "cpu":
        return None
    if not all(isinstance(n, int) for n in size):
        return None
    return tuple(size), kwargs.get("dtype") or (args[0].dtype if name == "new_empty" else torch.get_default_dtype())

# What may run between two recorded kernel calls, seen at PyTorch's Python API (a TorchFunctionMode: it costs
# nothing to set up, where a TorchDispatchMode's first use imports torch._dynamo, ~0.5 s of a start):
# allocations (the kernels' outputs), reading a tensor's metadata, and ops that return a view of their input
# (checked on every call: flatten, reshape, float and contiguous copy when they cannot view).
_ALLOCATIONS = {"empty", "empty_like", "new_empty"}
_METADATA = {"data_ptr", "stride", "size", "dim", "numel", "element_size", "is_contiguous", "__get__"}
_VIEWS = {"view", "split", "split_with_sizes", "narrow", "select", "unsqueeze", "squeeze", "flatten", "reshape",
          "float", "to", "contiguous", "chunk", "unbind", "__getitem__", "t", "transpose", "detach", "__get__"}


class _ViewsAndAllocationsOnly(TorchFunctionMode):
    """Runs every call, takes allocations from the arena (or keeps those it cannot take alive: the kernels were
    handed their pointers), and notes any call that computes something, which a replay of the kernel calls
    alone would skip."""

    def __init__(self, arena: Arena) -> None:
        super().__init__()
        self.arena = arena
        self.allocated: list[torch.Tensor] = []
        self.computing: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _ALLOCATIONS:
            request = _allocation(name, args, kwargs)
            out = self.arena.take(*request) if request else None
            if out is None:
                out = func(*args, **kwargs)
                self.allocated.append(out)
            return out
        out = func(*args, **kwargs)
        if not ((name in _METADATA and not _tensors_in(out)) or (name in _VIEWS and _views_of(out, args[0]))):
            self.computing.append(name)
        return out


def _tensors_in(out) -> list[torch.Tensor]:
    items = out if isinstance(out, (list, tuple)) else [out]
    return [item for item in items if isinstance(item, torch.Tensor)]


def _views_of(out, source) -> bool:
    """Whether `out` is tensors only, every one sharing `source`'s memory."""
    tensors = _tensors_in(out)
    count = len(out) if isinstance(out, (list, tuple)) else 1
    if not isinstance(source, torch.Tensor) or not tensors or len(tensors) != count:
        return False
    base = source.untyped_storage().data_ptr()
    return all(t.untyped_storage().data_ptr() == base for t in tensors)


@dataclass
class DecodeGraph:
    """A step of `rows` decode rows: the layers and LM head as recorded kernel calls over static tensors."""

    calls: list[tuple[ctypes._CFuncPtr, tuple]]
    # The first `rows` rows of the StepInputs, filled before a replay:
    hidden: torch.Tensor  # (rows, hidden) the embedded tokens
    positions: torch.Tensor  # (rows,) long
    slot_mapping: torch.Tensor  # (rows,) long
    block_tables: torch.Tensor  # (rows, max_blocks) int32: each row's table, then zeros
    context_lens: torch.Tensor  # (rows,) int32
    logits: torch.Tensor  # (rows, vocab) the LM head's output, rewritten by every replay
    keep_alive: list  # the inputs, the arena and what the capture allocated outside it: the calls hold their addresses

    @classmethod
    @torch.inference_mode()
    def capture(cls, model: torch.nn.Module, inputs: StepInputs, arena: Arena, hidden: torch.Tensor,
                positions: list[int], slots: list[int],
                block_tables: list[list[int]]) -> tuple[DecodeGraph | None, torch.Tensor, str | None]:
        """Run a real decode step (arguments as for replay) through the modules while recording it: (the graph or
        None, this step's logits, why not). Where the step runs PyTorch ops beside the kernels the logits are
        still right: the modules computed them. Other threads may run kernels meanwhile, this model's too
        (inspection): their calls are not recorded (engine.native.recording_calls), and the mode is per thread.
        The step reads the first rows of `inputs` (at least as many as it has) and takes its kernels' outputs
        from `arena`, both shared with every other graph of the model; where the arena is outgrown
        (Arena.outgrown) the graph is still right but should not be kept.
        """
        graph = cls([], *inputs.first(len(positions)), logits=torch.empty(0), keep_alive=[])
        graph._fill(hidden, positions, slots, block_tables)
        meta = AttentionMetadata(slot_mapping=graph.slot_mapping,
                                 decode_tables=DecodeTables(graph.block_tables, graph.context_lens))
        arena.start_capture()
        guard = _ViewsAndAllocationsOnly(arena)
        with native.recording_calls() as calls, guard:
            logits = model.compute_logits(model.run_layers(graph.hidden, graph.positions, meta))
        if guard.computing:
            why = f"its step runs PyTorch ops as well as kvserve's kernels ({', '.join(sorted(set(guard.computing)))})"
            return None, logits, why
        if not calls or logits.data_ptr() != _last_output(calls):
            return None, logits, "its logits do not come straight from a kernel"
        graph.calls = [(native.without_recording(function.__name__, *function.argtypes), arguments)
                       for function, arguments in calls]
        graph.logits, graph.keep_alive = logits, [inputs, arena, *guard.allocated]
        return graph, logits, None

    def __post_init__(self) -> None:
        # numpy views of the small inputs: setting elements through one takes ~1 µs, through PyTorch ~5
        self._inputs = (self.positions.numpy(), self.slot_mapping.numpy(), self.context_lens.numpy())
        self._tables = self.block_tables.numpy()

    def _fill(self, hidden: torch.Tensor, positions: list[int], slots: list[int], block_tables: list[list[int]]) -> None:
        self.hidden.copy_(hidden)
        position_view, slot_view, length_view = self._inputs
        position_view[:] = positions
        slot_view[:] = slots
        length_view[:] = [p + 1 for p in positions]
        for row, table in enumerate(block_tables):
            self._tables[row, :len(table)] = table
            self._tables[row, len(table):] = 0  # so rows with one table compare equal (the kernel shares their reads)

    def replay(self, hidden: torch.Tensor, positions: list[int], slots: list[int],
               block_tables: list[list[int]]) -> torch.Tensor:
        """Logits (rows, vocab) of the tokens embedded as `hidden` (rows, hidden), row r at positions[r], its K/V
        written to slots[r], attending to its sequence's keys 0..positions[r] through block_tables[r]. The
        tensor is the graph's own, rewritten by the next replay: copy what is kept."""
        self._fill(hidden, positions, slots, block_tables)
        for function, arguments in self.calls:
            function(*arguments)
        return self.logits


def _last_output(calls: list[tuple[ctypes._CFuncPtr, tuple]]) -> int | None:
    """The output pointer (every kernel's first argument) of the last recorded call."""
    return calls[-1][1][0]
