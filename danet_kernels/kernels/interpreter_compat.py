"""Keep Triton's CPU interpreter (``TRITON_INTERPRET=1``) working across Triton versions.

Triton 3.6's interpreter holds every scalar of a kernel, its arguments included, as a one-element
numpy array and turns one into a Python index with ``int(array)``, which numpy 2.4 refuses for
arrays that are not 0-dimensional: a ``for`` loop over ``range(0, N)`` fails even when N is a
plain kernel argument. Triton 3.8 converts with ``int(array.squeeze())``; :func:`squeeze_scalar_index`
backports that one conversion. It touches nothing but the interpreter and is a no-op where the
installed interpreter already converts correctly.
"""

from __future__ import annotations

__all__ = ["squeeze_scalar_index"]


def squeeze_scalar_index() -> None:
    """Make the interpreter's scalar tensors usable as ``range()`` bounds (idempotent)."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # no Triton, nothing to interpret
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "squeezes_index", False):
        return

    def patch_lang_tensor(tensor: type, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
