"""Shared test plumbing: the ``gpu`` marker, NaN-poisoned outputs, and the per-dtype tolerances.

Tests import the helpers directly (``from conftest import TOL, rel_err``): tests/ has no
``__init__.py``, so pytest puts this folder on ``sys.path`` before collecting.  The repository's root goes
there too, once, for the tests of the ``benchmarks`` package, however pytest is started.
"""
import functools
import os
import sys

import numpy as np
import pytest

# Largest accepted ||out - ref|| / ||ref||, by the dtype of the output under test; the reference is
# computed in float64 from the same (already rounded) inputs.  The one place tolerances live.
TOL = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 1.5e-2, "float64": 1e-12}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

NO_GPU_REASON = "no CUDA GPU available (cupy cannot see a device)"


@functools.lru_cache(maxsize=None)
def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, or no device: all mean "no GPU"
        return False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped, with the reason, where CuPy sees none)")


def pytest_collection_modifyitems(config, items):
    if any(item.get_closest_marker("gpu") for item in items) and not gpu_available():
        skip = pytest.mark.skip(reason=NO_GPU_REASON)
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.fixture
def poison():
    """Fill every output with NaN before the kernels run, so an unwritten element cannot pass."""
    from hgrn_cupy import arrays, plans

    before = arrays.poison
    plans.poison_outputs(True)
    try:
        yield
    finally:
        plans.poison_outputs(before)


def to_numpy(a) -> np.ndarray:
    """Any supported array (NumPy, CuPy, PyTorch, JAX; bfloat16 included) as a float64 NumPy copy."""
    if isinstance(a, np.ndarray):
        return a.astype(np.float64)
    mod = type(a).__module__.split(".")[0]
    if mod == "cupy":
        return a.get().astype(np.float64)
    if mod == "torch":
        import torch

        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a).astype(np.float64)  # JAX and other array-likes


def force_block_walks(monkeypatch, narrow):
    """The fused engine's block walks for every channel count and every T where the layout allows them,
    with 4-byte forward lanes (``narrow``) or 8-byte ones."""
    from hgrn_cupy.engines import fused_recurrent

    monkeypatch.setattr(fused_recurrent, "BLOCK_WALK_CHANNELS", {(s, d): (0, 1 << 62) for s in (2, 4, 8) for d in (0, 1)})
    monkeypatch.setattr(fused_recurrent, "BLOCK_WALK_MIN_T", 0)
    monkeypatch.setattr(fused_recurrent, "BLOCK_WALK_NARROW_BELOW", 1 << 62 if narrow else 0)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; inf when ``out`` holds a NaN (so poisoned outputs fail)."""
    out, ref = to_numpy(out), to_numpy(ref)
    assert out.shape == ref.shape, f"shape {out.shape} != reference shape {ref.shape}"
    if np.isnan(out).any() or np.isnan(ref).any():
        return float("inf")
    den = np.linalg.norm(ref)
    num = np.linalg.norm(out - ref)
    return float(num / den) if den > 0 else float(num)


def capture_torch(fn, before_capture=None):
    """A torch CUDA graph of ``fn()``: two warm-up calls on a side stream first (kernels compile and plans
    are made outside the capture), then ``before_capture()`` if given.  Returns (graph, what the captured
    call returned)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def device_scope_on(expected):
    """A stand-in for ``cupy.cuda.Device`` (or any device scope) on a machine without a GPU: asking for a
    device other than ``expected`` fails the test; entering the scope does nothing."""
    import contextlib

    def scope(device):
        assert device == expected, f"device {device} asked for, {expected} expected"
        return contextlib.nullcontext()
    return scope
