"""Every kernel instantiation the library can request compiles with NVRTC alone, warning-free; the
engines' layout rules.

Needs no GPU.  NVRTC compiles each module once, in parallel processes: to sm_90 machine code (through
ptxas) where x and g share a dtype, to sm_90 PTX where they differ: a mixed pair runs the front end and
the optimiser on its own conversions, and ptxas has seen the same kernels' code in the same-dtype
pairs.  That halves the time CI spends here.
"""
import concurrent.futures
import importlib.resources
import multiprocessing
import os

import pytest

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="cupy (with its NVRTC bindings) is not installed")

from hgrn_cupy import measure, nvrtc, states  # noqa: E402
from hgrn_cupy.engines import chunk, fused_recurrent, guard  # noqa: E402
from hgrn_cupy.engines.layout import Arr, aligned, alignment_masks, layout_vector_width  # noqa: E402

ARCH = "sm_90"
PTX_ARCH = "compute_90"


def _modules():
    """(id, source, name expressions, options, target) of every module the library can compile."""
    out = []
    for xd in nvrtc.DTYPES:
        for gd in nvrtc.DTYPES:
            pair, arch = f"x_{xd}-g_{gd}", ARCH if xd == gd else PTX_ARCH
            out.append((f"chunk-{pair}", chunk.SOURCE, chunk.names(xd, gd), chunk.OPTIONS, arch))
            if chunk.narrow_bwd_names(xd, gd):
                out.append((f"chunk-narrow-bwd-{pair}", chunk.SOURCE, chunk.narrow_bwd_names(xd, gd),
                            chunk.NARROW_BWD_OPTIONS, arch))
            out.append((f"fused-{pair}", fused_recurrent.SOURCE, fused_recurrent.names(xd, gd),
                        fused_recurrent.options(xd, gd), arch))
            if fused_recurrent.short_window_names(xd, gd):
                out.append((f"fused-short-windows-{pair}", fused_recurrent.SOURCE,
                            fused_recurrent.short_window_names(xd, gd),
                            fused_recurrent.options(xd, gd, fused_recurrent.SHORT_STEPS), arch))
            out.append((f"states-{pair}", states.SOURCE, states.kernel_names(xd, gd), states.OPTIONS, arch))
    out.append(("guard", guard.SOURCE, guard.NAMES, guard.OPTIONS, ARCH))
    out.append(("wait", measure.SOURCE, measure.NAMES, (), ARCH))
    return out


def _compile(module):
    name, source, names, options, arch = module
    try:
        return name, nvrtc.compile_for_arch(source, names, arch, options), None
    except RuntimeError as e:
        return name, "", str(e)


def test_every_instantiation_compiles_without_warnings():
    modules = _modules()
    workers = max(1, min(len(modules), os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_compile, modules))
    failed = [f"{name}: {err}" for name, _, err in results if err]
    warned = [f"{name}:\n{log}" for name, log, err in results if not err and "warning" in log.lower()]
    assert not failed, "\n".join(failed)
    assert not warned, "NVRTC warnings:\n" + "\n".join(warned)
    sixteen_bit = sum(nvrtc.ITEMSIZE[d] == 2 for d in nvrtc.DTYPES)
    no_float64 = sum(nvrtc.ITEMSIZE[d] < 8 for d in nvrtc.DTYPES)
    # + the guard, the tuner's wait, the 16-bit pairs' narrow backward, the block walks' short windows
    # (float64 has no block walk)
    assert len(results) == 3 * len(nvrtc.DTYPES) ** 2 + 2 + sixteen_bit ** 2 + no_float64 ** 2


def _kernel_files():
    return sorted((f for f in importlib.resources.files("hgrn_cupy").joinpath("kernels").iterdir()
                   if f.name.endswith((".cu", ".cuh"))), key=lambda f: f.name)


@pytest.mark.parametrize("source", [chunk.SOURCE, fused_recurrent.SOURCE, states.SOURCE, guard.SOURCE])
def test_folded_source_has_no_include_left(source):
    src = nvrtc.read_source(source)
    assert "#include" not in src.replace(" ", "").replace("\t", "")
    assert "namespace hc" in src  # the shared header was folded in


@pytest.mark.parametrize("source", [pytest.param(f, id=f.name) for f in _kernel_files()])
def test_sources_need_no_cuda_headers(source):
    text = source.read_text()
    lines = [ln for ln in text.splitlines() if ln.lstrip().startswith("#") and "include" in ln and "<" in ln]
    assert not lines, f"{source.name} includes system or toolkit headers: {lines}"


def test_kernel_sources_ship():
    names = {f.name for f in _kernel_files()}
    assert {chunk.SOURCE, fused_recurrent.SOURCE, states.SOURCE, guard.SOURCE, measure.SOURCE, "common.cuh"} <= names


def _pick_vec(D, tensors):
    """The width a chunk launch takes for these tensors (layout, then this call's pointers)."""
    vec = layout_vector_width(D, tensors)
    return vec if aligned([a.ptr for a in tensors], alignment_masks(vec, tensors)) else 1


def test_chunk_access_width():
    """16-byte accesses only where D, every pointer and every stride of a non-trivial axis allow them."""
    def arr(dtype, shape=(2, 10, 64), strides=None, offset=0):
        strides = strides or (shape[1] * shape[2], shape[2], 1)
        return Arr(1 << 20 | offset, shape, strides, dtype)

    assert _pick_vec(64, [arr("bfloat16"), arr("bfloat16")]) == 8
    assert _pick_vec(64, [arr("float32"), arr("float32")]) == 4
    assert _pick_vec(64, [arr("bfloat16"), arr("float32")]) == 4
    assert _pick_vec(64, [arr("float64"), arr("float16")]) == 2
    assert _pick_vec(60, [arr("bfloat16", (2, 10, 60)), arr("bfloat16", (2, 10, 60))]) == 1
    assert _pick_vec(64, [arr("bfloat16"), arr("bfloat16", offset=2)]) == 1   # misaligned pointer
    assert _pick_vec(64, [arr("bfloat16"), arr("bfloat16", offset=16)]) == 8  # 16-byte aligned
    odd_time = (10 * 68, 68, 1)
    assert _pick_vec(64, [arr("bfloat16"), arr("bfloat16", strides=odd_time)]) == 1
    one_step = (2, 1, 64)  # a stride of an axis of length 1 never moves a pointer
    assert _pick_vec(64, [arr("bfloat16", one_step, (72, 3, 1)), arr("bfloat16", one_step)]) == 8
    assert _pick_vec(64, [arr("bfloat16", strides=(-640, -64, 1)), arr("bfloat16")]) == 8


def test_chunk_workspace_and_prefetch():
    """Tiles of 32 / rows x VEC channels, chunks of warps x rows x steps; after a 32-byte header (padded to
    256 bytes) one 8-byte slot per (tile, chunk, channel), 16 for float64.  L2 prefetch only on dense
    grids of at least L2_MIN_BLOCKS blocks and at most FEW_TILES or at least L2_MIN_TILES tiles; the peek
    at the predecessor's slots at most PEEK_MAX_TILES or at least PEEK_MIN_TILES tiles."""
    for direction, vec, acc in ((0, 8, 4), (1, 8, 4), (0, 2, 8), (1, 1, 4)):
        warps, rows, steps = chunk.SHAPES[direction, vec > 1]
        tile, length = 32 // rows * vec, warps * rows * steps
        ntiles, nchunks, header, total, off = chunk.workspace_layout(3, 10 * length + 1, 5 * tile - 1, False, acc,
                                                                     direction, vec)
        assert (ntiles, nchunks) == (3 * 5, 11)
        assert header == chunk.HEADER_BYTES and off >= header and off % 256 == 0
        assert total - off >= ntiles * nchunks * tile * 2 * acc
        # varlen: one row (three tiles wide, which no narrow backward takes)
        assert chunk.workspace_layout(3, length, 3 * tile, True, acc, direction, vec)[:2] == (3, 1)
    big = chunk.L2_MIN_BLOCKS // chunk.L2_MIN_TILES
    assert chunk.l2_ahead(chunk.L2_MIN_TILES, big, False) == chunk.L2_AHEAD > 0
    assert chunk.l2_ahead(chunk.FEW_TILES, 10 * big, False) == chunk.L2_AHEAD               # few tiles
    assert chunk.FEW_TILES + 1 < chunk.L2_MIN_TILES
    assert chunk.l2_ahead(chunk.FEW_TILES + 1, 100 * big, False) == 0                       # between
    assert chunk.l2_ahead(chunk.L2_MIN_TILES, big - 1, False) == 0        # about one wave
    assert chunk.l2_ahead(chunk.L2_MIN_TILES, big, True) == 0             # varlen
    assert chunk.stagger(265, 264) == chunk.stagger(1000, 264) == 132  # half of what the GPU holds
    assert chunk.stagger(264, 264) == chunk.stagger(2, 264) == 0       # one wave or less: none
    assert chunk.FEW_TILES <= chunk.PEEK_MAX_TILES < chunk.PEEK_MIN_TILES - 1
    assert [chunk.peek(n) for n in (1, chunk.PEEK_MAX_TILES, chunk.PEEK_MAX_TILES + 1, chunk.PEEK_MIN_TILES - 1,
                                    chunk.PEEK_MIN_TILES)] == [1, 1, 0, 0, 1]


def test_chunk_narrow_backward():
    """The 16-bit backward on grids of at most NARROW_BWD_MAX_TILES two-row tiles takes four-row warps
    (tiles of half the channels, chunks of twice the steps); wider grids, the forward and the other
    widths keep SHAPES."""
    two_row = chunk.SHAPES[1, True]
    tile = 32 // two_row[1] * 8
    most = chunk.NARROW_BWD_MAX_TILES
    assert chunk.NARROW_BWD[1] == 2 * two_row[1]
    assert chunk.block_shape(1, 8, 1, most * tile, False) == chunk.NARROW_BWD
    assert chunk.block_shape(1, 8, most, tile, False) == chunk.NARROW_BWD
    assert chunk.block_shape(1, 8, 50, most * tile, True) == chunk.NARROW_BWD  # varlen: one packed row
    assert chunk.block_shape(1, 8, 1, most * tile + 8, False) == two_row      # one tile more
    assert chunk.block_shape(1, 8, most + 1, tile, False) == two_row
    assert chunk.block_shape(0, 8, 1, tile, False) == chunk.SHAPES[0, True]   # the forward
    assert chunk.block_shape(1, 4, 1, 64, False) == chunk.SHAPES[1, True]     # float32's width
    assert chunk.block_shape(1, 1, 1, 64, False) == chunk.SHAPES[1, False]    # the scalar kernels
    warps, rows, steps = chunk.NARROW_BWD
    ntiles, nchunks, _, total, off = chunk.workspace_layout(1, 1000, most * tile, False, 4, 1, 8)
    assert (ntiles, nchunks) == (most * tile // (32 // rows * 8), -(-1000 // (warps * rows * steps)))
    assert total - off >= ntiles * nchunks * (32 // rows * 8) * 2 * 4
    assert [n for xd in nvrtc.DTYPES for gd in nvrtc.DTYPES for n in chunk.narrow_bwd_names(xd, gd)] == [
        nvrtc.instantiation("chunk_bwd", xd, gd, v, 8) for xd in nvrtc.DTYPES for gd in nvrtc.DTYPES
        if nvrtc.ITEMSIZE[xd] == nvrtc.ITEMSIZE[gd] == 2 for v in (False, True)]


def test_function_attributes_are_set_once_per_value(monkeypatch):
    """nvrtc asks the driver for a function attribute only when its value changes: a plan is made for each
    new shape and asks again; another function, or another value, reaches the driver."""
    import types

    from cupy_backends.cuda.api import driver

    calls = []
    monkeypatch.setattr(driver, "funcSetAttribute", lambda ptr, attribute, value: calls.append((ptr, attribute, value)))
    monkeypatch.setattr(nvrtc, "shared_room", lambda fn, device: (228 * 1024, 1024))
    monkeypatch.setattr(nvrtc, "_attributes", {})
    carveout, dynamic = (driver.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                         driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
    a, b = types.SimpleNamespace(ptr=11), types.SimpleNamespace(ptr=12)
    for _ in range(3):
        nvrtc.prefer_shared(a, 28)
    assert calls == [(11, carveout, 28)]
    nvrtc.prefer_shared(b, 28)
    nvrtc.prefer_shared(a, 100)
    nvrtc.prefer_shared(a, 28)
    assert calls[1:] == [(12, carveout, 28), (11, carveout, 100), (11, carveout, 28)]
    del calls[:]
    for _ in range(2):
        nvrtc.hold_shared(b, 65536, 2, 0)  # two blocks of 64 KB + 1 KB: 58% of 228 KB
    assert calls == [(12, dynamic, 65536), (12, carveout, 58)]
