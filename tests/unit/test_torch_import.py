"""engine/torch_import.py: torch imported through `engine` records its op registrations' sources from the frame,
the same "file:line" as torch's own get_source; imported before kvserve, torch is left as it is."""

from __future__ import annotations

import inspect
import subprocess
import sys

from engine.torch_import import frame_source

_REGISTER_AND_REPORT = """
import inspect, sys
{first_import}
import torch
import torch._library.utils as utils
from engine import torch_import
lib = torch.library.Library("kvserve_test", "DEF")
lib.define("echo(Tensor x) -> Tensor")
def echo_fake(x):
    return x
torch.library.register_fake("kvserve_test::echo", echo_fake, lib=lib)  # line 11 of this script
from torch._library.simple_registry import singleton
print(utils.get_source is torch_import.frame_source, singleton.find("kvserve_test::echo").fake_impl.kernel.source)
print(any(type(finder).__name__ == "_SwapGetSource" for finder in sys.meta_path))
"""


def _run(first_import: str) -> list[str]:
    script = _REGISTER_AND_REPORT.format(first_import=first_import)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.split()


def test_torch_imported_through_engine_takes_sources_from_the_frame() -> None:
    swapped, source, finder_left = _run("import engine")
    assert swapped == "True"
    assert source == "<string>:11"  # what torch's inspect-based get_source gives for this registration
    assert finder_left == "False"  # it steps aside once used


def test_torch_imported_first_is_left_alone() -> None:
    swapped, source, finder_left = _run("import torch, engine")
    assert swapped == "False"
    assert source == "<string>:11"
    assert finder_left == "False"


def _getframeinfo_source(stacklevel: int) -> str:  # torch._library.utils.get_source's body (torch 2.13)
    frame = inspect.getframeinfo(sys._getframe(stacklevel))
    return f"{frame.filename}:{frame.lineno}"


def test_frame_source_matches_getframeinfo() -> None:
    def register(level: int) -> tuple[str, str]:
        return frame_source(level), _getframeinfo_source(level)

    def register_from_a_helper(level: int) -> tuple[str, str]:
        return register(level)

    for level in (1, 2):
        direct, inspected = register_from_a_helper(level)
        assert direct == inspected, level
    assert register_from_a_helper(1)[0] != register_from_a_helper(2)[0]  # one frame up is another line
