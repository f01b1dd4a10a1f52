"""Small decode steps replayed as the list of kernel calls they make, without the Python that makes them.

On CPU a decode step of one sequence is ~330 calls of kvserve's native kernels (engine/csrc: the matmuls,
norms, rotary, the KV write, the paged attention, the LM head), ~10 a layer. The Python around them (module
calls, views, output allocations, argument checks) took about as long as the kernels themselves (perf on a
2-core Zen 4: 40-45% of a step's main thread).

So, like a CUDA graph: the first decode step of each size runs the model's layers and LM head over static
input tensors (holding that step's inputs) with every native call recorded (engine.native.recording_calls:
its ctypes function and the arguments it was given, pointers into the static inputs, the weights, the KV
cache and the outputs allocated on the way, which are kept alive here), while a TorchFunctionMode checks that
no PyTorch op but allocations, metadata reads and views ran in between. If so, the recorded calls compute
exactly what the modules compute (the same kernels on the same buffers, in the same order: the same bits),
and later steps of that size only copy their inputs into the static tensors and replay them. A model whose
step runs any other op (GPT-2's LayerNorm, PyTorch's matmuls where kvserve's integer kernels do not run, ...)
is not recorded, and its modules run as before. Only the embedding lookup stays a PyTorch op, before the replay.

A graph is recorded for each number of decode rows from 1 to MAX_ROWS (batch 1, its speculative verify steps
of 2-4 rows, and 2-4 sequences); larger steps run the modules, where the Python is a small share of the step.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from engine import native
from engine.attention import AttentionMetadata, DecodeTables

# Steps of up to this many decode rows replay a recorded graph (one per row count, recorded at its first step).
MAX_ROWS = 4

# What may run between two recorded kernel calls, seen at PyTorch's Python API (a TorchFunctionMode: it costs
# nothing to set up, where a TorchDispatchMode's first use imports torch._dynamo, ~0.5 s of a start):
# allocations (the kernels' outputs), reading a tensor's metadata, and ops that return a view of their input
# (checked on every call: flatten, reshape, float and contiguous copy when they cannot view).
_ALLOCATIONS = {"empty", "empty_like", "new_empty"}
_METADATA = {"data_ptr", "stride", "size", "dim", "numel", "element_size", "is_contiguous", "__get__"}
_VIEWS = {"view", "split", "split_with_sizes", "narrow", "select", "unsqueeze", "squeeze", "flatten", "reshape",
          "float", "to", "contiguous", "chunk", "unbind", "__getitem__", "t", "transpose", "detach", "__get__"}


class _ViewsAndAllocationsOnly(TorchFunctionMode):
    """Runs every call, keeps allocated tensors alive (the kernels were handed their pointers) and notes any call
    that computes something, which a replay of the kernel calls alone would skip."""

    def __init__(self) -> None:
        super().__init__()
        self.allocated: list[torch.Tensor] = []
        self.computing: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        if name in _ALLOCATIONS:
            self.allocated.append(out)
        elif not ((name in _METADATA and not _tensors_in(out)) or (name in _VIEWS and _views_of(out, args[0]))):
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
    hidden: torch.Tensor  # (rows, hidden) the embedded tokens, copied in before a replay
    positions: torch.Tensor  # (rows,) long
    slot_mapping: torch.Tensor  # (rows,) long
    block_tables: torch.Tensor  # (rows, max_blocks) int32: each row's table, then zeros
    context_lens: torch.Tensor  # (rows,) int32
    logits: torch.Tensor  # (rows, vocab) the LM head's output, rewritten by every replay
    keep_alive: list  # every tensor the capture allocated: the recorded calls hold their addresses

    @classmethod
    @torch.inference_mode()
    def capture(cls, model: torch.nn.Module, max_blocks: int, hidden: torch.Tensor, positions: list[int],
                slots: list[int], block_tables: list[list[int]]) -> tuple[DecodeGraph | None, torch.Tensor, str | None]:
        """Run a real decode step (arguments as for replay) through the modules while recording it: (the graph or
        None, this step's logits, why not). Where the step runs PyTorch ops beside the kernels the logits are
        still right: the modules computed them. Other threads may run kernels meanwhile, this model's too
        (inspection): their calls are not recorded (engine.native.recording_calls), and the mode is per thread.
        """
        rows = len(positions)
        inputs = (torch.zeros(rows, hidden.shape[1]), torch.zeros(rows, dtype=torch.long),
                  torch.zeros(rows, dtype=torch.long), torch.zeros(rows, max_blocks, dtype=torch.int32),
                  torch.zeros(rows, dtype=torch.int32))
        graph = cls([], *inputs, logits=torch.empty(0), keep_alive=[])
        graph._fill(hidden, positions, slots, block_tables)
        meta = AttentionMetadata(slot_mapping=graph.slot_mapping,
                                 decode_tables=DecodeTables(graph.block_tables, graph.context_lens))
        guard = _ViewsAndAllocationsOnly()
        with native.recording_calls() as calls, guard:
            logits = model.compute_logits(model.run_layers(graph.hidden, graph.positions, meta))
        if guard.computing:
            why = f"its step runs PyTorch ops as well as kvserve's kernels ({', '.join(sorted(set(guard.computing)))})"
            return None, logits, why
        if not calls or logits.data_ptr() != _last_output(calls):
            return None, logits, "its logits do not come straight from a kernel"
        graph.calls = [(native.without_recording(function.__name__, *function.argtypes), arguments)
                       for function, arguments in calls]
        graph.logits, graph.keep_alive = logits, guard.allocated
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
