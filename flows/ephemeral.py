"""The temporary Prefect server of a run without PREFECT_API_URL, out of the terminal's reach.

Without a server, Prefect starts a temporary one as a child process in the
command's process group, so Ctrl-C in a terminal (SIGINT to the whole group)
stopped the server too: the interrupted run then spent minutes failing to
report its crash and ended with a connection error instead of "interrupted".
``start_detached`` starts that same server first, in a session of its own,
and asks the kernel to stop it when this process dies (even by SIGKILL); Prefect
stops it at exit as before. Prefect then finds the server running and uses it.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from contextlib import suppress
from functools import partial
from typing import Any
from unittest import mock

PR_SET_PDEATHSIG = 1
_prctl: Any = None
if sys.platform == "linux":  # looked up here: between fork and exec the child only calls it
    with suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent (this command's main thread) dies."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_detached() -> bool:
    """Start Prefect's temporary server detached from the terminal's signals (call it from the main
    thread; a no-op with PREFECT_API_URL set). Returns whether it started one."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return False
    server = SubprocessASGIServer()
    launch = getattr(server, "_run_uvicorn_command", None)
    if server.running or launch is None:  # already up, or a Prefect that starts it differently
        return False
    popen = partial(subprocess.Popen, start_new_session=True, preexec_fn=_die_with_parent if _prctl else None)

    def detached() -> Any:
        # Prefect builds the server's command line; only how it is spawned changes, for this call.
        with mock.patch.object(subprocess, "Popen", popen):
            return launch()

    server._run_uvicorn_command = detached
    server.start()
    return True
