"""The chunk engine's launch variants on a GPU (GPU-marked): stored as a shape class's tuned decision, each
is the launch ``hgrn`` runs; the staged forward with the dynamic shared memory and the split of L1 and shared
memory it asks of the driver (its values across dtypes, layouts, states, varlen and reverse are in
test_gpu_kernels.py, the ``chunk_staged`` cases), the far prefetch with its prefetch distance."""
import zlib

import numpy as np
import pytest
from conftest import TOL, rel_err
from recording import fresh_plans  # noqa: F401  (a fixture)

import hgrn_cupy as hc
from hgrn_cupy import dispatch, tuning


def _stored(cupy, name, shape, dtype, monkeypatch, tmp_path, request):
    """Seeded inputs (x, g, h0) of ``shape`` and ``dtype``, their float64 reference (o, ht) and the seed,
    with the variant ``name`` stored as the decision of their forward's shape class (a candidate there),
    in memory only and forgotten after the test."""
    B, T, D = shape
    seed = zlib.crc32(request.node.nodeid.encode())
    rng = cupy.random.default_rng(seed)
    x, g = (tuning._random(cupy, (B, T, D), dtype, rng, gate=k == 1) for k in range(2))
    h0 = tuning._random(cupy, (B, D), "float32", rng)
    refs = hc.naive_recurrent_hgrn(*[cupy.asnumpy(a).astype(np.float64) for a in (x, g, h0)], True)
    assert name in dispatch.candidates(B, T, D, (dtype, dtype), 0)
    monkeypatch.setenv("HGRN_CUPY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hc.config, "engine", "auto")
    monkeypatch.setattr(hc.config, "tune", True)
    monkeypatch.setattr(tuning.settings, "on_disk", False)
    request.addfinalizer(tuning.forget)
    tuning.forget()
    key = tuning.shape_class(0, (dtype, dtype), B, T, D, False)
    assert tuning._store(tuning.device_key(x.data.device_id), repr(key), name, keep=()) == name
    return (x, g, h0), refs, seed


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_tuned_staged_chunk_forward(dtype, fresh_plans, poison, monkeypatch, tmp_path, request):
    """Where a forward's tuning measures the chunk engine's staged forward (a grid of few tiles, more than one
    chunk), that variant stored as the decision is what ``hgrn`` then runs: chunk_fwd_staged, let take its
    dynamic shared memory and asking for the split that holds STAGED_BLOCKS blocks (both read back from the
    driver), with the states in and out, within tolerance of the float64 reference (outputs poisoned)."""
    cupy = pytest.importorskip("cupy")
    from cupy_backends.cuda.api import driver
    from gpu_kernel_checks import launched_kernels

    from hgrn_cupy import nvrtc
    from hgrn_cupy.engines import chunk

    # 4 tiles (bfloat16) or 8 (float32) of 7 chunks; D a multiple of 8
    (x, g, h0), refs, seed = _stored(cupy, chunk.STAGED, (2, 777, 200), dtype, monkeypatch, tmp_path, request)
    launched = launched_kernels(monkeypatch)
    outs = hc.hgrn(x, g, h0, True)
    what = f"seed {seed}, {dtype}"
    assert [k[0] for k in launched] == [chunk.STAGED_KERNEL], (what, launched)
    assert launched[0][-1] == str(chunk.staged_width(dtype, dtype)), (what, launched)
    for k, (a, ref) in enumerate(zip(outs, refs)):
        assert rel_err(a, ref) <= TOL[dtype], (what, k)
    fn = next(fn for key, fn in nvrtc._functions.items() if key[2].startswith(f"hc::{chunk.STAGED_KERNEL}<"))
    dynamic = chunk.staged_bytes(32 * chunk.SHAPES[0, True][0])
    assert driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, fn.ptr) == dynamic
    split = nvrtc.shared_split(fn, dynamic, chunk.STAGED_BLOCKS, x.data.device_id)
    assert driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, fn.ptr) == split
    assert nvrtc.blocks_at_once(fn, 32 * chunk.SHAPES[0, True][0], x.data.device_id, dynamic) >= 1


@pytest.mark.gpu
def test_tuned_far_prefetch_forward(fresh_plans, poison, monkeypatch, tmp_path, request):
    """The far-prefetch variant stored as a float32 forward's decision is what ``hgrn`` then runs: the
    forward's vector kernel over a grid that takes the L2 prefetch, asked FAR_AHEAD tickets ahead, with
    the states in and out, within tolerance of the float64 reference (outputs poisoned)."""
    cupy = pytest.importorskip("cupy")
    from hgrn_cupy import nvrtc
    from hgrn_cupy.engines import chunk

    # 64 tiles of 64 channels, 16 chunks of 128 steps: 1024 blocks
    (x, g, h0), refs, seed = _stored(cupy, chunk.FAR, (2, 2000, 2048), "float32", monkeypatch, tmp_path, request)
    grids, bind = [], nvrtc.bind  # each launch's last five words: tiles, chunks, prefetch distance, peek, stagger

    def recording_bind(fn, grid, block, device, **kw):
        kernel = bind(fn, grid, block, device, **kw)
        return lambda stream_ptr, *args: (grids.append(args[-5:]), kernel(stream_ptr, *args))[1]
    monkeypatch.setattr(nvrtc, "bind", recording_bind)
    outs = hc.hgrn(x, g, h0, True)
    what = f"seed {seed}"
    assert [a[:3] for a in grids] == [(64, 16, chunk.FAR_AHEAD)], (what, grids)
    for k, (a, ref) in enumerate(zip(outs, refs)):
        assert rel_err(a, ref) <= TOL["float32"], (what, k)
