"""The tuner's measurement (``hgrn_cupy.measure``; GPU-marked): it times the kernels a candidate queues,
not the host's time to issue them, on the stream it is given."""
import time

import pytest

from hgrn_cupy import measure

pytestmark = pytest.mark.gpu

KERNEL_US = 200.0
HOST_MS = 2.0  # per call: five calls outlast the first wait twenty times over, so the wait must grow


@pytest.mark.parametrize("stream", ["current", "own"])
def test_the_interval_holds_the_kernels_not_the_host(stream):
    cupy = pytest.importorskip("cupy")
    device = cupy.cuda.Device().id
    wait = measure._wait(device)
    s = cupy.cuda.Stream(non_blocking=True) if stream == "own" else None
    ptr = s.ptr if s is not None else cupy.cuda.get_current_stream().ptr
    issued = []

    def fn():  # a slow host issuing a known kernel time
        time.sleep(HOST_MS / 1e3)
        wait(ptr, int(KERNEL_US * 1e3))
        issued.append(1)

    per_call = measure.queued(device, s.ptr if s is not None else None, calls=5)(fn)
    assert len(issued) >= 6  # the warm-up, then five calls at least once
    assert KERNEL_US * 0.95e-6 <= per_call <= KERNEL_US * 1.25e-6, per_call
    assert per_call < HOST_MS / 1e3 / 2  # an interval holding the host's time would read 2.2 ms a call
