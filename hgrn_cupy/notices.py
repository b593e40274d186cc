"""The library's warnings to its users, each attributed to the user's line: the first frame of the call
stack outside this package and the frameworks that call back into it (torch, JAX), whichever front end and
however many internal frames led there, so that the printed location and filters by module point at the
code that made the call."""
from __future__ import annotations

import sys
import warnings

# Top-level modules whose frames lie between a user's call and the warning: this package, the frameworks
# whose machinery (autograd, custom ops, torch.compile, jit tracing) runs its code on the user's behalf,
# and contextlib, whose frames stand between a context manager's body and the ``with`` that entered it.
INNER = frozenset({__name__.split(".")[0], "torch", "jax", "jaxlib", "contextlib"})


def warn(message: str, category: type) -> None:
    """``warnings.warn(message, category)`` at the first frame outside INNER; where every frame is inside
    (a framework's own thread calling back), past the stack's end, which Python reports as ``sys``."""
    frame, level = sys._getframe(1), 2  # level 2: warn's caller
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in INNER:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
