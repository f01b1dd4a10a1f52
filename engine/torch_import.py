"""Importing torch without the source-file reads of its op registrations (~50-70 ms of a ~2 s cold start).

While torch imports, it registers ~115 fake (meta) kernels, and each registration records the "file:line"
that made it with torch._library.utils.get_source. That function asks inspect.getframeinfo, which reads the
registering module's source for one line of context (then dropped) and, for each file it has not seen,
resolves the real path of every module loaded so far. The frame itself holds the same file and line.

install() (engine/__init__.py calls it first, before anything imports torch) puts a finder in front of the
import system that only ever answers for that one module: it loads it as usual, then swaps get_source for
the direct version, and steps aside. If torch was imported already, nothing is changed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

_MODULE = "torch._library.utils"


def frame_source(stacklevel: int) -> str:
    """torch._library.utils.get_source's "file:line" of the caller `stacklevel` frames up, from the frame."""
    frame = sys._getframe(stacklevel)
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class _SwapGetSource(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        loader = spec.loader if spec is not None else None
        if not isinstance(loader, importlib.machinery.SourceFileLoader):
            return spec  # a build laid out otherwise: import it untouched
        load = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            load(module)
            if callable(getattr(module, "get_source", None)):
                module.get_source = frame_source

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Before torch's first import: have its op registrations take their source from the frame."""
    if _MODULE in sys.modules or any(isinstance(finder, _SwapGetSource) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _SwapGetSource())
