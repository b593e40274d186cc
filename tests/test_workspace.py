"""Kept scratch (``hgrn_cupy.workspace``; CPU: host memory standing in for the allocators'): one buffer per
framework, device, stream and accumulation itemsize, grown, bypassed while capturing or when switched off,
released on request, and per thread on the default stream's handles.
"""
import threading
import types

import numpy as np
import pytest
from conftest import device_scope_on

import hgrn_cupy as hc
from hgrn_cupy import workspace


@pytest.mark.parametrize("fw", ["torch", "cupy"])
def test_kept_workspaces(fw, monkeypatch):
    """Kept scratch is one buffer per (framework, device, stream, accumulation itemsize), at least
    MIN_BYTES and a power of two, made (and filled with ones, on its stream) only when none is big
    enough; it is not used while the stream captures a graph or when switched off, and
    release_workspaces frees it."""
    cupy = pytest.importorskip("cupy")
    fills, made = [], []
    monkeypatch.setattr(cupy.cuda.runtime, "memsetAsync", lambda p, v, n, s: fills.append((p, v, n, s)))
    monkeypatch.setattr(workspace, "_kept", {})
    capturing = set()
    monkeypatch.setattr(workspace, "capturing", lambda stream_ptr: stream_ptr in capturing)
    if fw == "torch":
        torch = pytest.importorskip("torch")
        real_empty = torch.empty

        def empty(shape, dtype, device):  # host memory standing in for the device's
            made.append((shape, device))
            return real_empty(shape, dtype=dtype)
        monkeypatch.setattr(torch, "empty", empty)
        alloc = workspace.source(torch_device=types.SimpleNamespace(index=1))
    else:
        alloc = _cupy_alloc(monkeypatch, made)

    small, least = 1000, workspace.MIN_BYTES
    a = alloc(small, 4, 5)
    assert a[2] and a[3] == least and fills == [(a[0], 0xFF, least, 5)]
    assert alloc(least, 4, 5) is a and len(fills) == 1  # fits: the same buffer, no fill
    b = alloc(small, 8, 5)  # another accumulation itemsize: its own buffer
    c = alloc(small, 4, 6)  # another stream: its own buffer
    assert len({a[0], b[0], c[0]}) == 3 and len(fills) == 3 and len(workspace._kept) == 3
    d = alloc(least + 1, 4, 5)  # grown to the next power of two, filled
    assert d[0] != a[0] and d[3] == 2 * least and fills[-1] == (d[0], 0xFF, 2 * least, 5)
    assert len(workspace._kept) == 3
    capturing.add(5)  # capturing: fresh memory of the size asked, which the launcher fills
    e = alloc(small, 4, 5)
    assert not e[2] and e[3] == small and e[0] != d[0] and len(fills) == 4
    capturing.clear()
    monkeypatch.setattr(hc.config, "keep_workspaces", False)
    assert not alloc(small, 4, 5)[2] and len(fills) == 4
    monkeypatch.setattr(hc.config, "keep_workspaces", True)
    assert alloc(small, 4, 5) is d
    hc.release_workspaces()
    assert not workspace._kept
    assert alloc(small, 4, 5)[0] != d[0] and len(fills) == 5 and len(made) == 7
    # the default stream's handles may name another stream in each thread: memory per thread there
    for handle, per_thread in ((0, True), (2, True), (5, False)):
        mine = alloc(small, 4, handle)
        theirs = []
        t = threading.Thread(target=lambda: theirs.append(alloc(small, 4, handle)))
        t.start()
        t.join()
        assert (theirs[0][0] != mine[0]) == per_thread and alloc(small, 4, handle) is mine


def _cupy_alloc(monkeypatch, made):
    """workspace.source for CuPy device 1 with host arrays standing in for CuPy's (data.ptr their
    address) and no device switch."""
    cupy = pytest.importorskip("cupy")

    class HostArray:
        def __init__(self, shape, dtype):
            made.append((shape, dtype))
            self.a = np.empty(shape, dtype)
            self.data = types.SimpleNamespace(ptr=self.a.ctypes.data)

    monkeypatch.setattr(cupy, "empty", HostArray)
    monkeypatch.setattr(cupy.cuda, "Device", device_scope_on(1))
    return workspace.source(cupy_device=1)
