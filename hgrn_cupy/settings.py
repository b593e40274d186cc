"""The library's switches (``hgrn_cupy.config``), read at each call."""
from __future__ import annotations

import numpy as np

ENGINES = ("auto", "chunk", "fused_recurrent")


class Config:
    """Library switches.

    check_cu_seqlens_values: read GPU ``cu_seqlens`` back to the host to check that it starts at 0, never
        decreases and ends at T (one small device-to-host copy, hence a synchronisation).  A CUDA torch
        tensor is read once: later calls on the same tensor, with the same T and not written through
        torch since (its version counter), reuse the result; values changed behind torch's back (through
        DLPack or ``.data``) are not read again.  Where values are not checked on the host (this is
        False, a CUDA graph is being captured, or inside ``jax.jit``), a device guard checks them instead
        and every output of a call with invalid offsets is NaN.  CPU offsets are checked on every call
        whatever this says (nothing to save, no guard behind it).
    keep_workspaces: the chunk engine keeps its scratch memory (8 bytes per channel every 64 steps or
        more, 16 with float64: about N * D * T / 8 bytes at most; one buffer per device, stream,
        framework and accumulation dtype) between calls; each launch leaves it ready for the next.
        While a CUDA graph is being captured, and when this is False, calls take fresh memory and fill
        it.  ``release_workspaces()`` frees what is kept.  Kept memory belongs to one stream (on the
        default stream's handles, to one host thread as well).
    engine: what ``hgrn`` (and ``hgrn_backward(engine="auto")``) runs: ``"auto"`` (chosen per device and
        shape class, see ``tune``), or ``"chunk"`` / ``"fused_recurrent"`` to pin one engine.
    tune: with ``engine == "auto"`` on a GPU, time both engines and their launch variants on the first call
        of each shape class (direction, dtypes, powers of two of T and of the channels) and keep the
        fastest, in memory and in the on-disk cache (``hgrn_cupy.tuning``), so that a machine always takes
        the same launch for the same call.  Never while a CUDA graph is captured or under JAX tracing:
        there, and when this is False, a cached decision or the built-in rule decides.
    """

    def __init__(self):
        self.check_cu_seqlens_values = True
        self.keep_workspaces = True
        self.engine = "auto"
        self.tune = True

    def __setattr__(self, name, value):
        if name not in ("check_cu_seqlens_values", "keep_workspaces", "engine", "tune"):
            raise AttributeError(f"hgrn_cupy.config has no setting {name!r}")
        if name == "engine":
            if not isinstance(value, str):
                raise TypeError(f"config.engine must be a str, one of {ENGINES}, got {type(value).__name__}")
            if value not in ENGINES:
                raise ValueError(f"config.engine must be one of {ENGINES}, got {value!r}")
        elif isinstance(value, (bool, np.bool_)):
            value = bool(value)
        else:
            raise TypeError(f"config.{name} must be a bool, got {type(value).__name__}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        raise AttributeError(f"hgrn_cupy.config settings cannot be deleted ({name!r}); set them instead")

    @staticmethod
    def release_workspaces():
        """Free the chunk engine's kept scratch memory (kernels already queued keep theirs alive)."""
        from .workspace import release
        release()


config = Config()
