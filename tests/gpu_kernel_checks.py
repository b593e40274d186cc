"""The checks the GPU kernel tests share: the engines under test, host float64 <-> device arrays of a
given dtype, the per-test generator, and one forward or backward call checked against the NumPy reference.

The generator (``_rng()``, named by ``_seed()`` in assertion messages) lives in ``_draw``; the ``seeded``
fixture fills it per test (autouse in the modules that import it).  ``launched_kernels`` records the kernels
launched while a test runs.  ``VARLEN`` and ``VECTOR_VIEWS`` are the packed offsets and strided views the
modules share.  Needs CuPy (the import skips the module without it).
"""
import zlib

import numpy as np
import pytest

from conftest import TOL, rel_err

cupy = pytest.importorskip("cupy")
import hgrn_cupy as hc  # noqa: E402
from hgrn_cupy.naive import bf16_bits_to_float32, float32_to_bf16_bits  # noqa: E402

# "fused_recurrent_2ch": the fused engine with two channels per thread wherever the layout allows it
# (the library does so from 64K channels; the test module's fixture ``walk_channels`` lowers that
# threshold to 0);
# "fused_recurrent_block": the fused engine's block walks wherever the layout allows them (the library
# takes them for T > 64 in bands of channel counts; the fixture opens both to everything), with 8-byte
# lanes forward; "fused_recurrent_block4": the same with 4-byte lanes forward (16-bit types below 16K
# channels); "fused_recurrent_block_short": the block walks with windows of SHORT_STEPS steps a warp (a
# launch variant the tuner may store for any call the block walks take: reverse, varlen, views).
ENGINES = ["chunk", "chunk_staged", "fused_recurrent", "fused_recurrent_2ch", "fused_recurrent_block",
           "fused_recurrent_block4", "fused_recurrent_block_short"]
DTYPES = ["float32", "float16", "bfloat16", "float64"]
FORWARD = {"chunk": hc.chunk_hgrn, "chunk_staged": hc.chunk_hgrn, **{e: hc.fused_recurrent_hgrn for e in ENGINES[2:]}}


def lib_engine(engine):
    return "fused_recurrent" if engine.startswith("fused_recurrent") else "chunk"


# ---------------------------------------------------------------------------------------------
# helpers: host float64 <-> device arrays of a given dtype

_draw: dict = {}


@pytest.fixture(autouse=True)
def seeded(request):
    """One generator per test, seeded from the test's id: ``_rng()`` hands it out, ``_seed()`` names it."""
    _draw["seed"] = zlib.crc32(request.node.nodeid.encode())
    _draw["rng"] = np.random.default_rng(_draw["seed"])
    yield
    _draw.clear()


def _rng():
    return _draw["rng"]


def _seed():
    return f"seed {_draw['seed']}"


def to_dev(a64, dtype):
    """A device array of ``dtype`` holding ``a64`` rounded to it."""
    if dtype == "bfloat16":
        import ml_dtypes

        bits = float32_to_bf16_bits(np.asarray(a64, np.float32))
        return cupy.asarray(bits).view(ml_dtypes.bfloat16)
    return cupy.asarray(np.asarray(a64, dtype))


def to_host(a):
    """float64 NumPy copy of a device array (any supported dtype)."""
    if a.dtype.name == "bfloat16":
        return bf16_bits_to_float32(a.view(cupy.uint16).get()).astype(np.float64)
    return cupy.asnumpy(a).astype(np.float64)


def rounded(a64, dtype):
    """``a64`` as the kernel sees it after rounding to ``dtype``, back in float64."""
    if dtype == "bfloat16":
        return bf16_bits_to_float32(float32_to_bf16_bits(np.asarray(a64, np.float32))).astype(np.float64)
    return np.asarray(a64, dtype).astype(np.float64)


def make_inputs(B, T, D, gate="logsigmoid", rng=None):
    rng = rng or _rng()
    x = rng.standard_normal((B, T, D))
    if gate == "logsigmoid":
        g = -np.log1p(np.exp(-rng.standard_normal((B, T, D)) - 1.0))
    elif gate == "zero":
        g = np.zeros((B, T, D)) + 0.0
    elif gate == "very_negative":
        g = -50.0 - 10 * rng.random((B, T, D))
    elif gate == "neg_inf":
        g = np.where(rng.random((B, T, D)) < 0.3, -np.inf, -rng.random((B, T, D)))
    return x, g


def cu_array(offsets, dtype="int32"):
    return cupy.asarray(np.asarray(offsets, dtype))


def check_forward(engine, x64, g64, dtype, h064=None, cu=None, reverse=False, final=True, gdtype=None,
                  views=None):
    gdtype = gdtype or dtype
    x, g = to_dev(x64, dtype), to_dev(g64, gdtype)
    if views is not None:
        x, g = views(x), views(g)
        x64, g64 = to_host(x), to_host(g)
    h0 = None if h064 is None else cupy.asarray(h064.astype(np.float32 if dtype != "float64" else np.float64))
    o, ht = FORWARD[engine](x, g, initial_state=h0, output_final_state=final,
                            cu_seqlens=None if cu is None else cu_array(cu), reverse=reverse)
    o_ref, ht_ref = hc.naive_recurrent_hgrn(rounded(x64, dtype), rounded(g64, gdtype),
                                            None if h0 is None else to_host(h0), True,
                                            None if cu is None else np.asarray(cu), reverse)
    tol = max(TOL[dtype], TOL[gdtype])
    what = f"{_seed()}: forward {engine} {dtype}/{gdtype}"
    assert o.dtype.name == dtype and o.shape == x.shape, what
    assert rel_err(to_host(o), o_ref) < tol, what
    if final:
        assert ht.dtype == (np.float64 if "float64" in (dtype, gdtype) else np.float32), what
        assert rel_err(to_host(ht), ht_ref) < tol, what
    else:
        assert ht is None, what
    return o


def check_backward(engine, x64, g64, dtype, h064=None, cu=None, reverse=False, with_dht=True):
    rng = _rng()
    o_ref, _ = hc.naive_recurrent_hgrn(rounded(x64, dtype), rounded(g64, dtype), h064, False,
                                       None if cu is None else np.asarray(cu), reverse)
    o = to_dev(o_ref, dtype)
    g = to_dev(g64, dtype)
    do = to_dev(rng.standard_normal(o_ref.shape), dtype)
    N = o_ref.shape[0] if cu is None else len(cu) - 1
    D = o_ref.shape[2]
    acc = np.float64 if dtype == "float64" else np.float32
    dht = cupy.asarray(rng.standard_normal((N, D)).astype(acc)) if with_dht else None
    h0 = None if h064 is None else cupy.asarray(h064.astype(acc))
    dx, dg, dh0 = hc.hgrn_backward(g, o, do, dht=dht, initial_state=h0,
                                   cu_seqlens=None if cu is None else cu_array(cu, "int64"),
                                   reverse=reverse, engine=lib_engine(engine))
    rdx, rdg, rdh0 = hc.naive_recurrent_hgrn_bwd(
        to_host(g), to_host(o), to_host(do), None if dht is None else to_host(dht),
        None if h0 is None else to_host(h0), None if cu is None else np.asarray(cu), reverse)
    tol = TOL[dtype]
    what = f"{_seed()}: backward {engine} {dtype}"
    assert dx.dtype.name == dtype and dg.dtype.name == dtype, what
    assert rel_err(to_host(dx), rdx) < tol, what
    assert rel_err(to_host(dg), rdg) < tol, what
    if h0 is None:
        assert dh0 is None, what
    else:
        assert rel_err(to_host(dh0), rdh0) < tol, what


def launched_kernels(monkeypatch):
    """A list that records each kernel launched from now on, as (kernel name, template arguments...),
    e.g. ``("chunk_fwd", "hc::half_t", "hc::half_t", "false", "8")``; kernels without template arguments
    (the varlen guard's) as their name alone."""
    import re

    from hgrn_cupy import nvrtc

    launched, names = [], {}
    real_get, real_bind = nvrtc.get_function, nvrtc.bind

    def get_function(source, all_names, name, device, options=()):
        fn = real_get(source, all_names, name, device, options)
        kernel, args = re.fullmatch(r"(?:hc::)?(\w+)(?:<(.*)>)?", name).groups()
        names[fn.ptr] = (kernel,) + (tuple(a.strip() for a in args.split(",")) if args else ())
        return fn

    def bind(fn, grid, block, device, **kw):
        kernel = real_bind(fn, grid, block, device, **kw)

        def recorded(stream_ptr, *args):
            launched.append(names[fn.ptr])
            kernel(stream_ptr, *args)
        return recorded
    monkeypatch.setattr(nvrtc, "get_function", get_function)
    monkeypatch.setattr(nvrtc, "bind", bind)
    return launched


# ---------------------------------------------------------------------------------------------
# packed offsets and strided views

VARLEN = [
    [0, 0, 1, 1, 50, 50, 1037, 1300],          # empty and length-1 sequences, one spanning chunks
    [0, 1300],                                  # one sequence
    [0, 3, 3, 3, 700, 701, 702, 1299, 1300],   # several empties in a row, T-1 boundaries
    [0, 0, 0, 1300],
]


VECTOR_VIEWS = {  # (view, whether the chunk engine can still use 16-byte accesses on it)
    "dense": (lambda a: a, True),
    "time_stride": (lambda a: a[:, ::3], True),
    "batch_slice": (lambda a: a[1:], True),
    "channel_slice_aligned": (lambda a: a[:, 5:, 8:-16], True),
    "reversed_time": (lambda a: a[:, ::-1], True),
    "odd_offset": (lambda a: a[:, :, 1:-7], False),
}
