"""Named pause points (failpoints) so fault-injection tests can stop a run at an exact moment.

Killing a process "during the MERGE" by sleeping and hoping is flaky; instead the
steps call ``pause_point(name)`` at the moments worth interrupting:
``infer`` (a shard's first progress report: its engine is running), ``stage``
(inside the staging transaction, rows inserted), ``load`` (the MERGE done, not
committed). It does nothing unless ``BATCHLLM_PAUSE_AT=name:n`` is set: then the
n-th time the process reaches ``name`` it writes ``"name n pid"`` to the file named
by ``BATCHLLM_PAUSE_FILE`` and waits until that file is removed. The test kills the
process meanwhile, or removes the file to let it go on. See docs/faults.md.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_reached: dict[str, int] = {}


def pause_point(name: str) -> None:
    """Pause here when the environment asks for it (tests only); a dictionary lookup otherwise."""
    target = os.environ.get("BATCHLLM_PAUSE_AT")
    if not target:
        return
    point, _, nth = target.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(nth or 1):
        return
    marker = Path(os.environ["BATCHLLM_PAUSE_FILE"])
    marker.write_text(f"{name} {_reached[name]} {os.getpid()}\n")
    while marker.exists():
        time.sleep(0.02)
