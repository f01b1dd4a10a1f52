"""A batch-1 decode step replayed as the list of kernel calls it makes, without the Python that makes them.

On CPU a decode step of one sequence is ~300 calls of kvserve's native kernels (engine/csrc: the matmuls,
norms, rotary, the KV write, the paged attention, the LM head), ~10 a layer. The Python around them (module
calls, views, output allocations, argument checks) took about as long as the kernels themselves (perf on a
2-core Zen 4: 40-45% of a step's main thread).

So, like a CUDA graph: at start the model's layers and LM head run once over static input tensors, with every
native call recorded (its ctypes function and the arguments it was given: pointers into the static inputs, the
weights, the KV cache and the outputs allocated on the way, which are kept alive here), while a
TorchDispatchMode checks that no PyTorch op but allocations and views ran in between. If so, the recorded calls
compute exactly what the modules compute (the same kernels on the same buffers, in the same order: the same
bits), and a step only copies its inputs into the static tensors and replays them. A model whose step runs any
other op (GPT-2's LayerNorm, PyTorch's matmuls where kvserve's integer kernels do not run, ...) is not
captured, and its modules run as before. Only the embedding lookup stays a PyTorch op, before the replay.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine import native
from engine.attention import AttentionMetadata, DecodeTables

aten = torch.ops.aten
# What may run between two recorded kernel calls: allocations (the kernels' outputs), and ops that return views
# of their input (checked on every call: flatten, reshape and to copy when they cannot view).
_ALLOCATIONS = {aten.empty, aten.empty_like, aten.new_empty, aten.empty_strided}
_VIEWS = {aten.view, aten._unsafe_view, aten.split, aten.split_with_sizes, aten.as_strided, aten.slice, aten.select,
          aten.unsqueeze, aten.squeeze, aten.t, aten.transpose, aten.alias, aten.detach, aten.expand, aten.unbind,
          aten.flatten, aten.reshape, aten.to, aten.contiguous}


class _ViewsAndAllocationsOnly(TorchDispatchMode):
    """Runs every op, keeps its outputs alive (the kernels were handed their pointers) and notes any op that
    computes something, which a replay of the kernel calls alone would skip."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list = []
        self.computing: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if not (packet in _ALLOCATIONS or (packet in _VIEWS and _views_of(out, args[0]))):
            self.computing.append(packet.__name__)
        self.outputs.append(out)
        return out


def _views_of(out, source) -> bool:
    """Whether every tensor `out` holds shares `source`'s memory."""
    tensors = out if isinstance(out, (list, tuple)) else [out]
    base = source.untyped_storage().data_ptr()
    return all(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == base for t in tensors)


@contextlib.contextmanager
def _recording_kernel_calls() -> Iterator[list[tuple[ctypes._CFuncPtr, tuple]]]:
    """Every call of the kernel library's functions made by this thread while the block runs: (function,
    arguments) in order.

    ctypes hands a function's `errcheck` the arguments of each call; ctypes keeps one function object per
    symbol of a library, the one engine.native gives out, so hooking them catches every call. Another thread's
    calls meanwhile (another engine's steps) are left out.
    """
    calls: list[tuple[ctypes._CFuncPtr, tuple]] = []
    recording_thread = threading.get_ident()

    def record(result, function, arguments):
        if threading.get_ident() == recording_thread:
            calls.append((function, arguments))
        return result

    functions = [fn for fn in vars(native.load()).values() if isinstance(fn, ctypes._CFuncPtr)]
    for fn in functions:
        fn.errcheck = record
    try:
        yield calls
    finally:
        for fn in functions:
            del fn.errcheck


@dataclass
class DecodeGraph:
    """One decode row's layers and LM head as recorded kernel calls over static tensors (see the module doc)."""

    calls: list[tuple[ctypes._CFuncPtr, tuple]]
    hidden: torch.Tensor  # (1, hidden) the embedded token, copied in before a replay
    positions: torch.Tensor  # (1,) long
    slot_mapping: torch.Tensor  # (1,) long
    block_table: torch.Tensor  # (1, max_blocks) int32: the row's table, then whatever a longer one left
    context_len: torch.Tensor  # (1,) int32
    logits: torch.Tensor  # (1, vocab) the LM head's output, rewritten by every replay
    keep_alive: list  # every tensor the capture allocated: the recorded calls hold their addresses

    @classmethod
    @torch.inference_mode()
    def capture(cls, model: torch.nn.Module, max_blocks: int) -> tuple[DecodeGraph | None, str | None]:
        """The graph of `model`'s decode step at one row, or (None, why not). Writes one key and value into slot
        0 of the KV cache (block 0: overwritten by whichever sequence later holds it, before anything reads it).

        Other threads may run kernels meanwhile (their calls are not recorded), but not this model: its KV
        cache's slot 0 would be written under them.
        """
        if not hasattr(model, "run_layers") or native.unavailable_reason():
            return None, "the model has no separate layer pass, or the kernels are not built"
        weight = model.lm_head_weight
        if weight.device.type != "cpu" or model.model.embed_tokens.weight.dtype != torch.float32:
            return None, "only fp32 models on CPU"
        hidden = torch.zeros(1, model.config.hidden_size)
        positions = torch.zeros(1, dtype=torch.long)
        slot_mapping = torch.zeros(1, dtype=torch.long)
        block_table = torch.zeros(1, max_blocks, dtype=torch.int32)
        context_len = torch.ones(1, dtype=torch.int32)
        meta = AttentionMetadata(slot_mapping=slot_mapping, decode_tables=DecodeTables(block_table, context_len))
        # A first pass makes the kernels' ctypes functions (engine.native makes each on first use), so that
        # the recorded one finds them all to hook.
        model.compute_logits(model.run_layers(hidden, positions, meta))
        guard = _ViewsAndAllocationsOnly()
        with _recording_kernel_calls() as calls, guard:
            logits = model.compute_logits(model.run_layers(hidden, positions, meta))
        if guard.computing:
            return None, f"its step runs PyTorch ops as well as kvserve's kernels ({', '.join(sorted(set(guard.computing)))})"
        if not calls or logits.data_ptr() != _last_output(calls):
            return None, "its logits do not come straight from a kernel"
        return cls(calls, hidden, positions, slot_mapping, block_table, context_len, logits, guard.outputs), None

    def __post_init__(self) -> None:
        # numpy views of the small inputs: setting an element through one is ~0.2 µs, through PyTorch ~4
        self._scalars = (self.positions.numpy(), self.slot_mapping.numpy(), self.context_len.numpy())
        self._table = self.block_table.numpy()

    def replay(self, hidden: torch.Tensor, position: int, slot: int, block_table: list[int]) -> torch.Tensor:
        """Logits (1, vocab), a fresh tensor, of the token embedded as `hidden` (1, hidden) at `position`, its K/V
        written to `slot`, attending to its sequence's keys 0..position through `block_table`."""
        self.hidden.copy_(hidden)
        positions, slots, lengths = self._scalars
        positions[0], slots[0], lengths[0] = position, slot, position + 1
        self._table[0, :len(block_table)] = block_table
        for function, arguments in self.calls:
            function(*arguments)
        return self.logits.clone()


def _last_output(calls: list[tuple[ctypes._CFuncPtr, tuple]]) -> int | None:
    """The output pointer (every kernel's first argument) of the last recorded call."""
    return calls[-1][1][0]
