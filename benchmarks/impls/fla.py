"""flash-linear-attention's HGRN (``fla.ops.hgrn``): fla-chunk and fla-fused, on our layout [B, T, D]
with log-space gates, gradients through torch.autograd.  fla autotunes each kernel on first use per
(D, dtype) (and per state arguments), so each D is tuned on the first shape in run order that has it."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from ..context import one_line, version_of
from ..plan import fla_skip_reason
from .base import Autograd

NAMES = ("fla-chunk", "fla-fused")


def import_fla_hgrn():
    """``fla.ops.hgrn``.  ``fla/ops/__init__.py`` imports every op family, and some of them need
    packages that the HGRN kernels do not (einops, ...); when that import fails, load the hgrn
    subpackage alone under bare package modules for ``fla`` / ``fla.ops``."""
    try:
        return importlib.import_module("fla.ops.hgrn"), None
    except Exception as first:
        import types

        spec = importlib.util.find_spec("fla") if "fla" not in sys.modules else sys.modules["fla"].__spec__
        if spec is None or not spec.submodule_search_locations:
            raise
        root = list(spec.submodule_search_locations)[0]
        for name, path in (("fla", root), ("fla.ops", os.path.join(root, "ops"))):
            if name not in sys.modules:
                pkg = types.ModuleType(name)
                pkg.__path__ = [path]
                pkg.__package__ = name
                sys.modules[name] = pkg
        try:
            return importlib.import_module("fla.ops.hgrn"), one_line(first)
        except Exception as second:
            raise ImportError(f"{one_line(first)}; hgrn alone: {one_line(second)}") from second


class Fla(Autograd):
    def __init__(self, ctx, fn, name):
        super().__init__(ctx)
        self.fn, self.name = fn, name

    def skip_reason(self, B, T, D, dtype):
        return fla_skip_reason(self.ctx.args, self.name, T)

    def model(self, x, g):
        return self.fn(x, g)[0]


def load(ctx, want):
    from ..context import log

    mod, note = import_fla_hgrn()
    if note:
        log(f"fla: package import failed ({note}); loaded fla.ops.hgrn on its own")
    ctx.versions["fla"] = version_of("fla-core", "fla")
    ctx.fla = mod
    fns = {"fla-chunk": mod.chunk_hgrn, "fla-fused": mod.fused_recurrent_hgrn}
    return {n: Fla(ctx, fns[n], n) for n in want}
