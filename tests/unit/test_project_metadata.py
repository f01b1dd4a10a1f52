"""The project's own metadata: one Python version everywhere it is named, and a license setuptools accepts as is."""

from __future__ import annotations

import re
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _minimum_python() -> str:
    """The X.Y that requires-python starts at."""
    match = re.fullmatch(r">=\s*(\d+\.\d+)", PYPROJECT["project"]["requires-python"])
    assert match, "requires-python should be a plain lower bound"
    return match.group(1)


def test_python_version_agrees_everywhere() -> None:
    version = _minimum_python()
    readme = (ROOT / "README.md").read_text()
    assert f"Needs Python {version} and make" in readme
    assert f"python{version} -m venv" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert f"Needs Python {version} and make" in makefile
    assert re.search(rf"^PYTHON \?= python{re.escape(version)}$", makefile, re.M), "make test (CI) must use it"
    assert re.search(rf"^ARG BASE_IMAGE=python:{re.escape(version)}-", (ROOT / "Dockerfile").read_text(), re.M)
    assert f"`python:{version}-slim-bookworm`" in readme  # the Docker build-argument docs
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py" + version.replace(".", "")


def test_the_interpreter_running_the_tests_is_the_named_one() -> None:
    """CI runs these tests with the Makefile's python: it must be the version the project names."""
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert running in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert running == _minimum_python()


def test_license_is_an_spdx_expression_setuptools_takes_without_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    setuptools_config = pytest.importorskip("setuptools.config.pyprojecttoml")
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)  # readme = "README.md" is relative
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = setuptools_config.apply_configuration(Distribution(), "pyproject.toml")
    assert [str(w.message) for w in caught] == []
    assert dist.metadata.license_expression == "Apache-2.0"
    assert any(req.startswith("setuptools>=77") for req in PYPROJECT["build-system"]["requires"])
