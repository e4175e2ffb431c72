"""Triton's interpreter (TRITON_INTERPRET=1: kernels run with numpy, e.g. on CPU for tests) under numpy >= 2.4.

The package applies the fix when it is imported with TRITON_INTERPRET=1; compiled kernels never see it.
"""

from __future__ import annotations

import os


def _fix_interpreter_index() -> None:
    """Triton's interpreter turns a scalar into an index (loop bounds) with int() on a one-element
    array, which numpy >= 2.4 rejects; make it take the element. Only under TRITON_INTERPRET=1."""
    try:
        import triton.runtime.interpreter as interp

        original = interp._patch_lang_tensor
    except (ImportError, AttributeError):
        return
    if getattr(original, "_index_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._index_fixed = True
    interp._patch_lang_tensor = patched


def patch_if_interpreted() -> None:
    """Fix Triton's interpreter when kernels run in it (TRITON_INTERPRET=1); otherwise do nothing."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        _fix_interpreter_index()
