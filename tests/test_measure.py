"""The tuner's measurement (``hgrn_cupy.measure``; GPU-marked): it times the kernels a candidate queues,
not the host's time to issue them nor the flush of L2 before each call, on the stream it is given; without
memory for the flush it warns and still times."""
import time

import pytest

from hgrn_cupy import measure

pytestmark = pytest.mark.gpu

KERNEL_US = 50.0  # the flush writes twice the L2 (tens of us on a card with tens of MB of it): counting it fails
HOST_MS = 2.0     # per call: five calls outlast the first wait twenty times over, so the wait must grow


def _timed_wait(cupy, stream):
    """``(measure, fn, issued)``: a measurement on ``stream`` ("current" or "own") of a slow host issuing
    a known kernel time, and the list of calls issued."""
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
    per_call = timed(fn)
    assert len(issued) >= 6  # the warm-up, then five calls at least once
    assert KERNEL_US * 0.95e-6 <= per_call <= KERNEL_US * 1.25e-6, per_call
    assert per_call < HOST_MS / 1e3 / 2  # an interval holding the host's time would read 2.05 ms a call


def test_without_memory_for_the_read_it_warns_and_still_times(monkeypatch):
    cupy = pytest.importorskip("cupy")
    rt = cupy.cuda.runtime

    def no_memory(nbytes):
        raise rt.CUDARuntimeError(2)  # cudaErrorMemoryAllocation

    monkeypatch.setattr(rt, "malloc", no_memory)
    timed, fn, _ = _timed_wait(cupy, "current")
    with pytest.warns(RuntimeWarning, match="could not allocate"):
        per_call = timed(fn)
    assert KERNEL_US * 0.95e-6 <= per_call <= KERNEL_US * 1.25e-6, per_call
