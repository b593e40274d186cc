"""The varlen guard (``hgrn_cupy.engines.guard``, ``hgrn_cupy/kernels/guard.cu``): the device check of cu_seqlens
and the fill of a call's outputs with all-ones bytes when it fails.

CPU: the NVRTC build of every instantiation (no GPU needed), that all-ones bytes are a NaN in every float
dtype, dtype spellings.  GPU (marked, skipped without one), with CuPy arrays: valid offsets (empty
sequences, N = 1, T = 0, many entries) leave the flag 0 and seeded random buffers untouched; every kind of
invalid offsets sets it and the fill turns every byte of every buffer (odd sizes, misaligned starts,
several MB, more than one launch's worth) into 0xFF and no byte beside them; a captured CUDA graph
replayed with new offset values gives the right flag each time.  Seeds are printed in every failure message.
"""
import zlib

import numpy as np
import pytest

from hgrn_cupy import nvrtc
from hgrn_cupy.engines import guard

# ---------------------------------------------------------------------------------------------
# CPU


def test_all_ones_bytes_are_nan_in_every_float_dtype():
    dtypes = [np.float16, np.float32, np.float64]
    try:
        import ml_dtypes

        dtypes.append(ml_dtypes.bfloat16)
    except ImportError:
        pass
    for dt in dtypes:
        v = np.full(64, 0xFF, np.uint8).view(dt)
        assert np.isnan(v.astype(np.float64)).all(), dt


def test_index_dtype():
    assert guard.index_dtype("int32") == "int32" and guard.index_dtype(np.int64) == "int64"
    assert guard.index_dtype(np.dtype("int32")) == "int32"
    for bad in ("float32", np.uint32, "int16"):
        with pytest.raises(ValueError):
            guard.index_dtype(bad)


# ---------------------------------------------------------------------------------------------
# GPU

INDEX_DTYPES = ["int32", "int64"]


def _ragged(seed, N, T_max_len=7, empty_share=0.3):
    """Valid offsets of N sequences (some empty) and their T."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, T_max_len + 1, N) * (rng.random(N) >= empty_share)
    cu = np.concatenate([[0], np.cumsum(lens)])
    return cu, int(cu[-1])


def _long_valid(seed, N):
    """Valid offsets of N non-empty sequences (so any decrease planted later is a real one)."""
    cu, T = _ragged(seed, N, empty_share=0.0)
    return cu, T


VALID = {
    "N1": ([0, 10], 10),
    "N1_T1": ([0, 1], 1),
    "T0": ([0, 0], 0),
    "T0_empties": ([0, 0, 0, 0], 0),
    "empties": ([0, 0, 3, 3, 10, 10], 10),
    "last_empty": ([0, 4, 9, 9], 9),
    "many": _ragged(11, 5000),
    "many_exact_blocks": _ragged(12, 2047),  # n = 2048: two full passes of the check's block
    "one_entry_T0": ([0], 0),  # N = 0
}
VALID_INT64 = {"wide": ([0, 2**32 + 1, 2**33], 2**33)}  # values past 32 bits, compared as 64-bit


def _plant(cu, i, delta):
    cu = np.array(cu, np.int64)
    cu[i] += delta
    return cu


_long, _long_T = _long_valid(21, 6000)
INVALID = {
    "first_not_0": ([1, 5, 10], 10),
    "first_negative": ([-1, 5, 10], 10),
    "decreasing": ([0, 6, 5, 10], 10),
    "negative": ([0, -1, 10], 10),
    "past_T": ([0, 11, 10], 10),  # a value past T is always also a decrease or a last != T
    "last_past_T": ([0, 5, 11], 10),
    "last_lt_T": ([0, 5, 9], 10),
    "T0_last": ([0, 1], 0),
    "no_entries": ([], 0),
    "one_entry_T": ([0], 5),  # N = 0: valid only when T = 0
    # a decrease in each place the block's pass boundaries (1024 entries) can hide it
    **{f"long_dec_at_{i}": (_plant(_long, i, -int(_long[i] - _long[i - 1]) - 1), _long_T)
       for i in (1, 1023, 1024, 1025, 2048, 4097, 6000)},
    "long_last_lt_T": (_long, _long_T + 1),
    "long_first": (_plant(_long, 0, 1), _long_T),
}
INVALID_INT64 = {
    "wraps_to_valid_int32": ([0, 2**32 + 3, 10], 10),   # read as 32 bits it would be 3
    "negative_wraps": ([0, -(2**32) + 3, 10], 10),
}

# Buffers (offset into an arena, nbytes): odd sizes, every start alignment, zero bytes, several MB.
MB = 1 << 20
BUFFERS = [(1, 1), (5, 3), (17, 15), (48, 16), (66, 17), (101, 33), (160, 0), (203, 4 * MB + 3),
           (4 * MB + 512, 2 * MB), (6 * MB + 1001, 3 * MB + 7), (10 * MB - 9, 5)]
ARENA = 10 * MB + 16


def _cases(table, extra):
    out = []
    for dt in INDEX_DTYPES:
        out += [(dt, k, *v) for k, v in table.items()]
        if dt == "int64":
            out += [(dt, k, *v) for k, v in extra.items()]
    return out


def _seed(*key):
    return zlib.crc32(repr(key).encode())


@pytest.fixture
def cp():
    cupy = pytest.importorskip("cupy")
    with cupy.cuda.Stream(non_blocking=True) as s:
        yield cupy, s


def _arena(cupy, seed):
    host = np.random.default_rng(seed).integers(0, 256, ARENA, dtype=np.uint8)
    return host, cupy.asarray(host)


def _buffers(dev):
    assert all(a + n <= b for (a, n), (b, _) in zip(BUFFERS, BUFFERS[1:])), "buffers overlap"
    return [(dev.data.ptr + off, nb) for off, nb in BUFFERS]


def _expected_filled(host):
    out = host.copy()
    for off, nb in BUFFERS:
        out[off:off + nb] = 0xFF
    return out


def _check_and_fill(cupy, s, dtype, cu_host, T, seed):
    g = guard.prepare(cupy.cuda.Device().id, dtype)
    cu = cupy.asarray(np.asarray(cu_host, np.int64).astype(dtype))
    flag = cupy.full(1, 7, cupy.int32)  # neither 0 nor 1: the check's write is seen either way
    host, dev = _arena(cupy, seed)
    g.check(s.ptr, cu.data.ptr, len(cu_host), T, flag.data.ptr)
    g.fill(s.ptr, flag.data.ptr, _buffers(dev))
    s.synchronize()
    return int(flag.get()[0]), host, dev.get()


GUARD_CASES = ([(True, *c) for c in _cases(VALID, VALID_INT64)]
               + [(False, *c) for c in _cases(INVALID, INVALID_INT64)])


@pytest.mark.gpu
@pytest.mark.parametrize("valid, dtype, name, cu_host, T", GUARD_CASES,
                         ids=[f"{'valid' if c[0] else 'invalid'}-{c[1]}-{c[2]}" for c in GUARD_CASES])
def test_offsets_flag_and_buffers(cp, valid, dtype, name, cu_host, T):
    """Valid offsets leave the flag at 0 and every buffer as it was; invalid ones set the flag and fill
    every buffer."""
    cupy, s = cp
    seed = _seed(dtype, name)
    flag, host, out = _check_and_fill(cupy, s, dtype, cu_host, T, seed)
    assert flag == (0 if valid else 1), f"{dtype} {name}: flag {flag} (seed {seed})"
    want = host if valid else _expected_filled(host)
    bad = np.flatnonzero(out != want)
    assert bad.size == 0, f"{dtype} {name}: {bad.size} bytes wrong, first at {bad[:8]} (seed {seed})"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", INDEX_DTYPES)
@pytest.mark.parametrize("mode", ["relaxed", "global"])
def test_graph_replay_with_new_offsets(cp, dtype, mode):
    """One capture of check + fill; each replay after new offset values (same N and T) gives their flag."""
    cupy, s = cp
    runtime = cupy.cuda.runtime
    T, n = 20, 6
    g = guard.prepare(cupy.cuda.Device().id, dtype)
    cu = cupy.zeros(n, dtype)
    flag = cupy.full(1, 7, cupy.int32)
    dev = cupy.zeros(ARENA, cupy.uint8)
    bufs = _buffers(dev)
    s.synchronize()
    s.begin_capture(mode=runtime.streamCaptureModeGlobal if mode == "global" else runtime.streamCaptureModeRelaxed)
    try:
        g.check(s.ptr, cu.data.ptr, n, T, flag.data.ptr)
        g.fill(s.ptr, flag.data.ptr, bufs)
    finally:
        graph = s.end_capture()
    replays = [([0, 3, 3, 10, 15, 20], 0), ([0, 3, 2, 10, 15, 20], 1), ([0, 0, 0, 0, 0, 20], 0),
               ([1, 3, 3, 10, 15, 20], 1), ([0, 3, 3, 10, 15, 21], 1), ([0, 4, 8, 12, 16, 20], 0),
               ([0, 3, 3, 10, 15, 19], 1), ([0, 3, -3, 10, 15, 20], 1), ([0, 1, 2, 3, 4, 20], 0)]
    for i, (cu_host, want_flag) in enumerate(replays):
        seed = _seed(dtype, mode, i)
        host, _ = _arena(cupy, seed)
        dev.set(host, stream=s)
        cu.set(np.asarray(cu_host, dtype), stream=s)
        graph.launch(stream=s)
        s.synchronize()
        got = int(flag.get()[0])
        assert got == want_flag, f"replay {i} {cu_host}: flag {got}, want {want_flag} (seed {seed})"
        want = _expected_filled(host) if want_flag else host
        assert np.array_equal(dev.get(), want), f"replay {i} {cu_host}: buffers wrong (seed {seed})"
