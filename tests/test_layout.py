"""The layout rules of DESIGN section 3, checked on the source with ast (nothing imported but the stdlib).

- no import cycle among batchllm's modules, counting imports inside functions
  too (a function-level import only hides a cycle); imports under
  ``TYPE_CHECKING`` never run and do not count;
- batchllm/kernels imports nothing else of batchllm; plan/ imports no torch;
- nothing but flows/ imports prefect;
- no module over ~400 lines.

flows/ and sql/ are mapped into the namespace (``batchllm.flows``), so they are
walked as part of it; the kernels live in ``batchllm/kernels``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Package name -> source folder, as pyproject's package-dir maps them.
FOLDERS = {
    "batchllm": ROOT / "batchllm",
    "batchllm.flows": ROOT / "flows",
}
MAX_LINES = 400


@dataclass(frozen=True)
class Import:
    target: str  # absolute dotted name, e.g. "batchllm.plan.types" or "torch"
    runs: bool  # False under ``if TYPE_CHECKING:``
    line: int


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


def _modules() -> dict[str, Module]:
    out: dict[str, Module] = {}
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if any(
                name.startswith(f"{other}.") or name == other
                for other in FOLDERS
                if other.startswith(f"{package}.")
            ):
                continue  # a mapped folder nested in its parent's tree is walked once, as its own package
            out[name] = Module(name, path, path.name == "__init__.py")
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(nodes: list[ast.stmt], runs: bool) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement, at any depth, with whether it can run (not under TYPE_CHECKING)."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, runs
        elif isinstance(node, ast.If):
            yield from _walk(node.body, runs and not _is_type_checking(node))
            yield from _walk(node.orelse, runs)
        else:
            yield from _walk([c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)], runs)


def imports(module: Module) -> list[Import]:
    tree = ast.parse(module.path.read_text(), filename=str(module.path))
    out: list[Import] = []
    for node, runs in _walk(tree.body, True):
        if isinstance(node, ast.Import):
            out += [Import(alias.name, runs, node.lineno) for alias in node.names]
            continue
        assert isinstance(node, ast.ImportFrom)
        if node.level:
            base = module.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        for alias in node.names:
            sub = f"{origin}.{alias.name}"
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            out.append(Import(sub if sub in MODULES else origin, runs, node.lineno))
    return out


def _in(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def _where(module: Module, imp: Import) -> str:
    return f"{module.path.relative_to(ROOT)}:{imp.line} imports {imp.target}"


def test_no_import_cycles() -> None:
    """Edges go to the named module only: importing a.b.c also runs a.b's __init__, but a
    package importing its own submodules is how packages work, not a cycle."""
    graph = {
        name: sorted({i.target for i in imports(m) if i.runs and i.target in MODULES and i.target != name})
        for name, m in MODULES.items()
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_kernels_import_nothing_from_batchllm() -> None:
    bad = [
        _where(m, i)
        for m in MODULES.values()
        if _in(m.name, "batchllm.kernels")
        for i in imports(m)
        if _in(i.target, "batchllm") and not _in(i.target, "batchllm.kernels")
    ]
    assert not bad, "\n".join(bad)


def test_plan_imports_no_torch() -> None:
    """Anywhere in plan/, not only at the top: the planner runs where torch is absent."""
    heavy = ("torch", "triton", "prefect", "duckdb")
    bad = [
        _where(m, i)
        for m in MODULES.values()
        if _in(m.name, "batchllm.plan")
        for i in imports(m)
        if any(_in(i.target, h) for h in heavy)
        or (_in(i.target, "batchllm") and not _in(i.target, "batchllm.plan"))
    ]
    assert not bad, "\n".join(bad)


def test_only_flows_import_prefect() -> None:
    bad = [
        _where(m, i)
        for m in MODULES.values()
        if not _in(m.name, "batchllm.flows")
        for i in imports(m)
        if _in(i.target, "prefect")
    ]
    assert not bad, "\n".join(bad)


def test_modules_stay_small() -> None:
    """Over ~400 lines a module usually holds two concerns; split it along them."""
    long = {
        str(m.path.relative_to(ROOT)): n
        for m in MODULES.values()
        if (n := len(m.path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("batchllm", ("torch", "prefect", "duckdb", "numpy")),
        ("batchllm.plan", ("torch", "prefect", "duckdb")),
        ("batchllm.engine.config", ("torch", "numpy")),
        ("batchllm.engine", ("torch",)),
        ("batchllm.job", ("prefect",)),
    ],
)
def test_light_imports(module: str, absent: tuple[str, ...]) -> None:
    """What importing a module really loads (the ast checks above see only one file at a time)."""
    code = f"import sys, {module}; print(' '.join(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"importing {module} loads {out.stdout.strip()}"
