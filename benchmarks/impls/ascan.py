"""accelerated-scan: ``scalar.scan`` (Triton; ascan-triton) and ``warp.scan`` (a CUDA extension that
torch's load_inline compiles at import; ascan-warp), on their own layout [B, D, T] with linear gates
(see ``LinearGateScan`` for the mapping and the ``+T`` variants).  The warp scan is built first in a
child process under ``--warp-timeout``; the import here then reuses that build."""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from ..context import log, version_of
from ..extbuild import Child
from .base import LinearGateScan, Unavailable, linear_scan_skip

NAMES = ("ascan-triton", "ascan-triton+T", "ascan-warp", "ascan-warp+T")
ASCAN_TRITON_BLOCK = 2048  # accelerated_scan.scalar's scan block (time steps per program iteration)


def ascan_skip_reason(variant, B, T, D, dtype):
    return linear_scan_skip(B, T, D, dtype, *((1, 1 << 62) if variant == "triton" else (32, 65536)))


class Ascan(LinearGateScan):
    family = "ascan"

    def skip_reason(self, B, T, D, dtype):
        return ascan_skip_reason(self.variant, B, T, D, dtype)

    def pass_skip_reason(self, pazz, T):
        # Its Triton backward loads the previous state at every lane of its 2048-step block with only a
        # t > 0 mask, so when T is not a multiple of the block the last sequence reads past the end of
        # the saved states: invalid global reads, and an illegal-address fault can end the run (a
        # faulted CUDA context is unusable).
        if self.variant == "triton" and pazz != "fwd" and T % ASCAN_TRITON_BLOCK:
            return f"its backward reads past the end of its states when T is not a multiple of {ASCAN_TRITON_BLOCK}"
        return None


def build_warp(ctx):
    """Compile accelerated_scan.warp in a child process under a time limit, then import the cached
    build here (load_inline reuses a build whose sources and flags are unchanged)."""
    limit = ctx.args.warp_timeout
    child = Child([sys.executable, "-c", "import accelerated_scan.warp"], what="warp build")
    ok, why, seconds = child.wait(limit, " (--warp-timeout)")
    if not ok:
        if "took more than" in why:
            with contextlib.suppress(Exception):  # our killed build leaves its lock behind
                from torch.utils.cpp_extension import _get_build_directory
                lock = Path(_get_build_directory("warpscan", verbose=False)) / "lock"
                if lock.exists():
                    lock.unlink()
        raise Unavailable(why)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import accelerated_scan.warp as warp
    log(f"accelerated_scan.warp built in {seconds:.0f} s")
    return warp.scan


def load(ctx, want):
    """The selected ascan-* implementations; a variant that cannot load is reported apart (missing)."""
    impls, missing = {}, {}
    tri = [n for n in want if n.startswith("ascan-triton")]
    warp = [n for n in want if n.startswith("ascan-warp")]
    if tri:
        try:
            from accelerated_scan import scalar
            ctx.versions["accelerated_scan"] = version_of("accelerated-scan", "accelerated_scan")
            for n in tri:
                impls[n] = Ascan(ctx, scalar.scan, "triton", n.endswith("+T"))
        except Exception as e:
            missing.update({n: e for n in tri})
    if warp:
        try:
            if not ctx.args.warp:
                raise Unavailable("disabled (--no-warp; the default in --quick)")
            if ctx.device != "cuda":
                raise Unavailable("needs CUDA")
            scan = build_warp(ctx)
            ctx.versions.setdefault("accelerated_scan", version_of("accelerated-scan", "accelerated_scan"))
            for n in warp:
                impls[n] = Ascan(ctx, scan, "warp", n.endswith("+T"))
        except Exception as e:
            missing.update({n: e for n in warp})
    return impls, missing
