"""How the tuner times a candidate launch on the GPU (:mod:`hgrn_cupy.tuning`): the kernels alone, each
call after L2 is flushed.

A measurement calls ``fn`` (which queues one call of a candidate on the stream) once to warm up (compile,
workspaces), then queues a wait on the GPU (``kernels/wait.cu``) and behind it ``calls`` calls of ``fn``,
each after a write of a buffer twice the size of L2 and between two events, and returns the mean of the
calls' intervals (:func:`behind_wait`; ``python -m benchmarks`` times its cells' ``dev`` figure with the same
loop).

- The wait holds the stream while the host issues the calls, so the GPU runs them back to back, as in a
  busy training step, and the intervals hold no host time.  Without it (each call between two events on
  an idle stream) the interval adds the host's time to issue the launches, which can exceed the
  difference between two engines' kernels and flip the choice (docs/performance.md, "The tuner's
  measurement").
- The write leaves L2 holding none of the call's inputs and full of dirty lines, which the call writes
  back as it evicts them: the condition ``python -m benchmarks`` times every call in (a flush by writing,
  and inputs rotated through sets larger than L2), and the one a training step's call meets after the
  kernels that wrote its inputs.  Timed with its inputs left in L2 by the call before, a small call ranks
  launches differently (docs/performance.md, "The tuner's measurement").  The buffer is allocated once per
  decision (:func:`queued` is a context around the candidates' measurements) and freed after it; where it
  cannot be allocated, the measurement warns and times the calls without the flush.
"""
from __future__ import annotations

import contextlib
import statistics
import time

from . import notices, nvrtc

SOURCE = "wait.cu"
NAMES = ("hc::wait_ns",)
WAIT_US = 500.0          # the first wait; doubled while the host takes more than half of it to issue
MAX_WAIT_US = 64000.0    # past this, fewer calls a batch (behind_wait)
FLUSH_L2_TIMES = 2       # the flush writes this many times the L2's bytes

_waits: dict = {}


def _wait(device):
    kernel = _waits.get(device)
    if kernel is None:
        fn = nvrtc.get_function(SOURCE, NAMES, NAMES[0], device)
        kernel = _waits[device] = nvrtc.bind(fn, (1,), (1,), device)
    return kernel


def flush_bytes(device):
    """Bytes the flush writes on ``device``."""
    import cupy

    rt = cupy.cuda.runtime
    return FLUSH_L2_TIMES * rt.deviceGetAttribute(rt.cudaDevAttrL2CacheSize, device)


def _buffer(rt, nbytes):
    """A buffer of ``nbytes`` for the flush, or None (with a warning) where it cannot be allocated."""
    try:
        return rt.malloc(nbytes)
    except rt.CUDARuntimeError as e:
        notices.warn(f"hgrn_cupy: the tuner could not allocate {nbytes >> 20} MiB to flush L2 between the "
                     f"calls it times ({e}); it times them with whatever L2 holds", RuntimeWarning)
        return None


def behind_wait(device, stream, fns, calls, before=None):
    """Seconds of each call of ``fns[i % len(fns)]()`` for ``i < calls`` (a list of ``calls``), each call
    queued on ``stream`` (a ``cudaStream_t`` as int) of ``device`` (index) behind the wait, after
    ``before()`` where given and between its own two events; one warm-up call of each ``fns`` first.

    The wait doubles while the host takes more than half of it to queue a batch; past ``MAX_WAIT_US`` the
    batch halves instead, down to one call, whose interval is kept as it is (a host that slow is what the
    call gets)."""
    import cupy

    rt = cupy.cuda.runtime
    wait = _wait(device)
    for fn in fns:
        fn()
    rt.streamSynchronize(stream)
    events = [rt.eventCreate() for _ in range(2 * calls)]
    try:
        us, batch, seconds = WAIT_US, calls, []
        while len(seconds) < calls:
            n, done = min(batch, calls - len(seconds)), len(seconds)
            wait(stream, int(us * 1e3))
            t0 = time.perf_counter()
            for i in range(n):
                if before is not None:
                    before()
                rt.eventRecord(events[2 * i], stream)
                fns[(done + i) % len(fns)]()
                rt.eventRecord(events[2 * i + 1], stream)
            issued_us = (time.perf_counter() - t0) * 1e6
            rt.eventSynchronize(events[2 * n - 1])
            if issued_us < 0.5 * us or (batch == 1 and us >= MAX_WAIT_US):
                seconds += [rt.eventElapsedTime(events[2 * i], events[2 * i + 1]) / 1e3 for i in range(n)]
            elif us < MAX_WAIT_US:
                us *= 2
            else:
                batch //= 2
        return seconds
    finally:
        for event in events:
            rt.eventDestroy(event)


@contextlib.contextmanager
def queued(device=None, stream_ptr=None, calls=5):
    """Context yielding a measurement function ``measure(fn) -> seconds per call`` for launches on
    ``device`` (index; None: the current one) on the stream ``stream_ptr`` (a ``cudaStream_t`` as int;
    None: CuPy's current stream on ``device``): ``calls`` calls queued behind the wait, each after the
    flush of L2 (module docstring).  The flush's buffer lives as long as the context: one per decision,
    however many candidates it measures."""
    import cupy

    rt = cupy.cuda.runtime
    device = rt.getDevice() if device is None else device
    with cupy.cuda.Device(device):
        stream = cupy.cuda.get_current_stream().ptr if stream_ptr is None else stream_ptr
        nbytes = flush_bytes(device)
        buffer = _buffer(rt, nbytes) if nbytes else None
        before = None if buffer is None else (lambda: rt.memsetAsync(buffer, 0, nbytes, stream))
        try:
            yield lambda fn: statistics.fmean(behind_wait(device, stream, [fn], calls, before))
        finally:
            if buffer is not None:
                rt.streamSynchronize(stream)
                rt.free(buffer)
