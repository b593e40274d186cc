"""How the tuner times a candidate launch on the GPU (:mod:`hgrn_cupy.tuning`): the kernels alone.

A measurement calls ``fn`` (which queues one call of a candidate on the stream) once to warm up (compile,
workspaces), then queues a wait on the GPU (``kernels/wait.cu``) and behind it ``calls`` calls of ``fn``
between two events, and returns the events' interval over ``calls``.  The wait holds the stream while the
host issues the calls, so the GPU runs them back to back, as in a busy training step, and the interval
holds no host time.  Without it (each call between two events on an idle stream) the interval adds the
host's time to issue the launches, which can exceed the difference between two engines' kernels and flip
the choice (docs/performance.md, "The tuner's measurement").
"""
from __future__ import annotations

import time

from . import nvrtc

SOURCE = "wait.cu"
NAMES = ("hc::wait_ns",)
WAIT_US = 500.0          # the first wait; doubled while the host takes more than half of it to issue
MAX_WAIT_US = 64000.0    # past this the interval is kept as it is (a host that slow is what the call gets)

_waits: dict = {}


def _wait(device):
    kernel = _waits.get(device)
    if kernel is None:
        fn = nvrtc.get_function(SOURCE, NAMES, NAMES[0], device)
        kernel = _waits[device] = nvrtc.bind(fn, (1,), (1,), device)
    return kernel


def queued(device, stream_ptr=None, calls=5):
    """A measurement function ``measure(fn) -> seconds per call`` for launches on ``device`` (index) on
    the stream ``stream_ptr`` (a ``cudaStream_t`` as int; None: CuPy's current stream on ``device``),
    ``calls`` calls queued behind the wait (module docstring)."""
    def measure(fn):
        import cupy

        rt = cupy.cuda.runtime
        with cupy.cuda.Device(device):
            stream = cupy.cuda.get_current_stream().ptr if stream_ptr is None else stream_ptr
            wait = _wait(device)
            fn()
            rt.streamSynchronize(stream)
            start, end = rt.eventCreate(), rt.eventCreate()
            try:
                us = WAIT_US
                while True:
                    wait(stream, int(us * 1e3))
                    t0 = time.perf_counter()
                    rt.eventRecord(start, stream)
                    for _ in range(calls):
                        fn()
                    rt.eventRecord(end, stream)
                    issued_us = (time.perf_counter() - t0) * 1e6
                    rt.eventSynchronize(end)
                    if issued_us < 0.5 * us or us >= MAX_WAIT_US:
                        return rt.eventElapsedTime(start, end) / 1e3 / calls
                    us *= 2
            finally:
                rt.eventDestroy(start)
                rt.eventDestroy(end)
    return measure
