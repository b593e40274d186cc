"""Which engine runs a call: a pinned engine, or for ``"auto"`` the device's measured choice
(:mod:`hgrn_cupy.tuning`) among the engines and their launch variants (``engines.VARIANTS``), with the
built-in rule as its default.

The built-in rule (measured on an H100, docs/performance.md, engine crossover) is what a call gets where
nothing is measured: on the CPU, and on a GPU where no decision is stored for the call's class, under
CUDA-graph capture or JAX tracing (with an :class:`UntunedWarning`) or with ``config.tune`` off.
"""
from __future__ import annotations

from . import notices
from .engines import VARIANTS
from .engines import chunk as _chunk
from .engines import fused_recurrent as _fused
from .engines import fused_variants
from .nvrtc import ITEMSIZE
from .settings import ENGINES, config

# The chunk engine below this many channels (N * D), the fused engine from there on, per (bytes per
# element of the wider input, direction).  CHUNK_BELOW_BLOCK holds where the fused engine would take its
# block walk, CHUNK_BELOW where it would take the thread walk (float64 has no block walk).
CHUNK_BELOW_BLOCK = {(2, 0): 1 << 14, (2, 1): 1 << 17, (4, 0): 1 << 13, (4, 1): 1 << 19}
CHUNK_BELOW = {(2, 0): 1 << 16, (2, 1): 1 << 15, (4, 0): 1 << 15, (4, 1): 1 << 19, (8, 0): 1 << 15, (8, 1): 1 << 14}
# At most this many steps the walk is shorter than the chunk engine's look-back: nothing to measure.
FUSED_MAX_T = 32
CANDIDATES = ("chunk", "fused_recurrent")


class UntunedWarning(UserWarning):
    """A GPU call took the built-in rule because nothing could be timed (CUDA-graph capture, JAX tracing)
    and no measured choice was stored for its shape class; the rule can be slower than the measured choice
    (tens of percent on some cards).  Raised once per device and class; ``python -m hgrn_cupy tune``, one
    such call outside capture (for JAX: through the top level, which runs eagerly), or
    ``config.tune = False`` each silence it."""


def _untuned(call, direction, engine, traced):
    """Warn that ``engine``, the built-in rule's, runs untuned (the tuner asks once per device and class);
    ``traced``: chosen while JAX traces, where no call through ``hgrn_cupy.jax`` can measure (it is compiled
    even when called eagerly) but one through the top level can."""
    x_dtype, g_dtype = call.dtypes
    dense = f"{call.N}x{call.T}x{call.D}"  # N = B where nothing is packed
    shape = f"{call.N} sequences packed in {call.T} steps x {call.D}" if call.varlen else dense
    tune = "" if call.varlen or x_dtype != g_dtype else f"`python -m hgrn_cupy tune {dense} --dtype {x_dtype}`, or "
    first = (f"call hgrn_cupy.{('hgrn', 'hgrn_backward')[direction]} (the top level, which runs eagerly) once "
             f"on such arrays" if traced else "one such call outside capture")
    advice = f"Run {tune}{first}" if tune or not traced else first[0].upper() + first[1:]
    notices.warn(
        f"hgrn_cupy: no measured engine is stored for a {('forward', 'backward')[direction]} like this one "
        f"({x_dtype}/{g_dtype} {shape}) on this GPU, and nothing is timed under "
        f"{'JAX tracing' if traced else 'CUDA-graph capture'}, so the built-in rule runs {engine!r}, which can "
        f"be slower than the measured choice. {advice} first, to store the measured choice; "
        f"hgrn_cupy.config.tune = False times nothing and gives no warning.", UntunedWarning)


def rule(N, T, D, dtypes, direction):
    """The built-in choice: the fused walk needs many channels to fill the GPU (one thread each, or a
    block per group of channels in the block walks); the chunk engine also parallelises over time."""
    if T <= FUSED_MAX_T:
        return "fused_recurrent"
    size = max(ITEMSIZE[d] for d in dtypes)
    if _fused.block_walk_fits(N, T, D, dtypes[0], dtypes[-1], direction):
        below = CHUNK_BELOW_BLOCK[size, direction]
    else:
        below = CHUNK_BELOW[size, direction]
    return "chunk" if N * D < below else "fused_recurrent"


def candidates(N, T, D, dtypes, direction, ruled=None):
    """The launches a call's tuning measures, in order of preference (ties go to the earlier): the
    rule's engine (``ruled``, where the caller has it), the other engine, then the launch variants that
    apply (names of ``VARIANTS``)."""
    ruled = ruled or rule(N, T, D, dtypes, direction)
    return ((ruled,) + tuple(c for c in CANDIDATES if c != ruled)
            + fused_variants.variants(N, T, D, dtypes[0], dtypes[-1], direction)
            + _chunk.variants(N, T, D, dtypes[0], dtypes[-1], direction))


def check_engine(engine):
    """A public engine name (``settings.ENGINES``), else TypeError (not a str) or ValueError."""
    if not isinstance(engine, str):
        raise TypeError(f"engine must be a str, one of {ENGINES}, got {type(engine).__name__}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


def check_launch(engine):
    """A public engine name or a variant's (``engines.VARIANTS``: the tuner's, which the internal
    interface runs as named), else the error of :func:`check_engine`."""
    if not isinstance(engine, str) or engine not in VARIANTS:
        check_engine(engine)


def choose(engine, call, direction, reverse, device=None, run=None, allow_timing=False, stream_ptr=None,
           traced=False):
    """The engine for a checked call (``checks.Call``) in ``direction`` (0 forward, 1 backward).

    ``engine``: as asked (``"auto"`` follows ``config.engine``).  ``device``: the CUDA device index, or
    None on the CPU.  ``run(name)`` launches engine ``name`` once on the call's own buffers, which is what
    a first-use measurement times (on the stream ``stream_ptr``) where ``allow_timing`` (and
    ``config.tune``) allow it; ties keep the built-in rule's engine.  ``traced``: the JAX front end,
    choosing while it traces (the untuned warning's advice differs)."""
    check_launch(engine)
    if engine == "auto":
        engine = config.engine
    if engine == "auto":
        engine = rule(call.N, call.T, call.D, call.dtypes, direction)
        if device is not None and call.T > FUSED_MAX_T:
            from . import tuning

            key = tuning.shape_class(direction, call.dtypes, call.N, call.T, call.D, call.varlen, bool(reverse))
            names = candidates(call.N, call.T, call.D, call.dtypes, direction, engine)
            timing = allow_timing and config.tune and run is not None
            untuned = (lambda ruled=engine: _untuned(call, direction, ruled, traced)) if config.tune else None
            engine = tuning.choose(device, key, names, run, engine, timing, stream_ptr=stream_ptr,
                                   on_default=untuned)
    if engine == "chunk" and call.T == 0:  # nothing to split; the walk passes states through
        engine = "fused_recurrent"
    return engine
