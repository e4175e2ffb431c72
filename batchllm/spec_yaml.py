"""A job spec from a YAML file: YAML 1.2 booleans, and database paths relative to the file's folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from batchllm.spec import MEMORY, JobSpec, SpecError, parse_spec


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as booleans, which
    would turn ``task.yes: Yes`` or ``labels: [Yes, No]`` into True/False. A key given twice in one
    mapping is an error (PyYAML keeps the last silently: one of two ``task`` blocks would vanish)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL = "tag:yaml.org,2002:bool"
_SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_spec(path: str | Path) -> JobSpec:
    """Read a YAML job spec. Relative database paths resolve against the YAML file's folder."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_SpecLoader)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({exc})") from None
    except RecursionError:  # the parser recurses per nesting level
        raise SpecError(f"{path}: not valid YAML (nested too deeply)") from None
    if isinstance(data, dict):
        data = _resolve_paths(data, path.parent)
    return parse_spec(data, origin=str(path))


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Database files (source, output, attached; not a postgres DSN) are relative to the spec's folder."""

    def fix(part: dict[str, Any], key: str) -> dict[str, Any]:
        p = part.get(key)
        if not isinstance(p, str) or p == MEMORY or Path(p).expanduser().is_absolute():
            return part
        return {**part, key: str((base / p).resolve())}

    out = {
        k: fix(v, "database") if k in ("source", "output") and isinstance(v, dict) else v
        for k, v in data.items()
    }
    source = out.get("source")
    if isinstance(source, dict) and isinstance(source.get("attach"), list):
        local = [
            fix(a, "path") if isinstance(a, dict) and a.get("type") != "postgres" else a
            for a in source["attach"]
        ]
        out["source"] = {**source, "attach": local}
    return out
