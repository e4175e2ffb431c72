"""Tokenizer of an HF model folder: encode, decode and chat templating without transformers.

Uses the `tokenizers` library (tokenizer.json) and renders the folder's chat
template with Jinja2, the way Hugging Face does, so rendering and planning can
run before (and without) loading any weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    """Token ids <-> text for one model folder, plus its chat template."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"model: {str(self.folder)!r} has no tokenizer.json")
        self._tok = HFTokenizer.from_file(str(path))
        self._config = _read_json(self.folder / "tokenizer_config.json")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _special(self, name: str) -> str | None:
        value = self._config.get(name)
        if isinstance(value, dict):  # older configs store AddedToken dicts
            value = value.get("content")
        return value

    @property
    def bos_token(self) -> str | None:
        return self._special("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special("eos_token")

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: the tokenizer's eos plus the model/generation config's eos ids."""
        ids = set(config_eos_token_ids(self.folder))
        if self.eos_token is not None and (tid := self.token_to_id(self.eos_token)) is not None:
            ids.add(tid)
        return frozenset(ids)

    @cached_property
    def special_tokens(self) -> tuple[str, ...]:
        """The text of each special token: in a prompt's text it encodes as that control token."""
        return tuple(t.content for t in self._tok.get_added_tokens_decoder().values() if t.special)

    @cached_property
    def chat_template(self) -> str | None:
        jinja = self.folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        template = self._config.get("chat_template")
        return template if isinstance(template, str) else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[np.ndarray]:
        """Token ids of many texts (parallel in the Rust tokenizer), as int32 arrays."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render chat messages to the prompt text the model was trained on."""
        if self.chat_template is None:
            raise ValueError(f"model: {str(self.folder)!r} has no chat template; use a raw prompt template")
        try:
            template = _compile(self.chat_template)
        except TemplateError as exc:  # the model's own template: every row would fail alike
            raise ValueError(
                f"model: the chat template of {str(self.folder)!r} does not compile: {type(exc).__name__}: {exc}"
            ) from None
        return template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def config_eos_token_ids(folder: Path) -> frozenset[int]:
    """The eos ids of config.json and generation_config.json (all a model without tokenizer.json has)."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        value = _read_json(Path(folder) / name).get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _raise(message: str) -> None:
    raise ValueError(message)


_templates: dict[str, Any] = {}


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """Hugging Face's ``tojson`` filter: text as is (Jinja's own escapes ``<`` and non-ASCII for HTML)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _compile(source: str) -> Any:
    """The template as Hugging Face compiles chat templates: loop controls, its ``tojson``, and
    ``raise_exception``. (``strftime_now`` stays undefined: a template's date falls back to its fixed
    one, so a prompt and its hash do not change from day to day.)"""
    if source not in _templates:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = _tojson
        _templates[source] = env.from_string(source)
    return _templates[source]
