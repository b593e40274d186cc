"""The tuner's measurement (``hgrn_cupy.measure``; GPU-marked): it times the kernels a candidate queues,
not the host's time to issue them nor the flush of L2 before each call, on the stream it is given; one
flush buffer serves every measurement of a decision; without memory for the flush it warns and still
times."""
import os
import time

import pytest

from hgrn_cupy import measure

pytestmark = pytest.mark.gpu

KERNEL_US = 50.0  # the flush writes twice the L2 (tens of us on a card with tens of MB of it): counting it fails
HOST_MS = 2.0     # per call: five calls outlast the first wait twenty times over, so the wait must grow
# The GPU suite runs in parallel processes (pytest -n), whose contexts take turns on the GPU: a turn can
# stretch a measurement, never shorten it.  So the upper bounds hold on the least of TRIES measurements; a
# flush or host time counted in the interval would stretch every one of them.
TRIES = 3


def _timed_wait(cupy, stream):
    """``(queued, fn, issued)``: the measurement's context on ``stream`` ("current" or "own"), a slow host
    issuing a known kernel time, and the list of calls issued."""
    device = cupy.cuda.Device().id
    wait = measure._wait(device)
    s = cupy.cuda.Stream(non_blocking=True) if stream == "own" else None
    ptr = s.ptr if s is not None else cupy.cuda.get_current_stream().ptr
    issued = []

    def fn():
        time.sleep(HOST_MS / 1e3)
        wait(ptr, int(KERNEL_US * 1e3))
        issued.append(s)  # keeps the stream alive as long as the measurement may launch on it

    return measure.queued(device, ptr if s is not None else None, calls=5), fn, issued


@pytest.mark.parametrize("stream", ["current", "own"])
def test_the_interval_holds_the_kernels_not_the_host_nor_the_flush(stream):
    cupy = pytest.importorskip("cupy")
    timed, fn, issued = _timed_wait(cupy, stream)
    with timed as time_calls:
        per_call = min(time_calls(fn) for _ in range(TRIES))
    assert len(issued) >= 6  # the warm-up, then five calls at least once
    assert KERNEL_US * 0.95e-6 <= per_call <= KERNEL_US * 1.25e-6, per_call
    assert per_call < HOST_MS / 1e3 / 2  # an interval holding the host's time would read 2.05 ms a call


def test_one_flush_buffer_serves_every_measurement_of_a_decision(monkeypatch):
    cupy = pytest.importorskip("cupy")
    rt = cupy.cuda.runtime
    allocated, freed, malloc, free = [], [], rt.malloc, rt.free
    monkeypatch.setattr(rt, "malloc", lambda nbytes: allocated.append(malloc(nbytes)) or allocated[-1])
    monkeypatch.setattr(rt, "free", lambda ptr: (freed.append(ptr), free(ptr)))
    timed, fn, _ = _timed_wait(cupy, "current")
    with timed as time_calls:
        times = [time_calls(fn) for _ in range(3)]  # three candidates of one decision
        assert len(allocated) == 1 and not freed
    assert freed == allocated
    assert all(t >= KERNEL_US * 0.95e-6 for t in times) and min(times) <= KERNEL_US * 1.25e-6, times


def test_without_memory_for_the_flush_it_warns_and_still_times(monkeypatch):
    cupy = pytest.importorskip("cupy")
    rt = cupy.cuda.runtime

    def no_memory(nbytes):
        raise rt.CUDARuntimeError(2)  # cudaErrorMemoryAllocation

    monkeypatch.setattr(rt, "malloc", no_memory)
    timed, fn, _ = _timed_wait(cupy, "current")
    with pytest.warns(RuntimeWarning, match="could not allocate") as said, timed as time_calls:
        per_call = min(time_calls(fn) for _ in range(TRIES))
    assert os.path.samefile(said[0].filename, __file__), said[0].filename  # the caller's line, not the library's
    assert KERNEL_US * 0.95e-6 <= per_call <= KERNEL_US * 1.25e-6, per_call
