"""batchllm: offline, SQL-driven LLM batch inference that exploits shared prompt prefixes.

Importing the package stays light (no torch, prefect or duckdb): submodules are
imported where they are used, so the engine and planner run on machines that
have only torch and numpy.
"""

from pathlib import Path

__version__ = "0.1.0"

# In a source tree the top-level folders flows/ and sql/ are mapped into this namespace
# (batchllm.flows, batchllm.sql), as the installed wheel does via package-dir.
_root = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "flows").is_dir() and (_root / "flows" / "__init__.py").is_file():
    __path__.append(str(_root))  # type: ignore[name-defined]
