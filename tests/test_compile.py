"""Every kernel instantiation the library can request compiles with NVRTC alone, warning-free.

Needs no GPU: NVRTC compiles for a named architecture.  Runs in CI, which has no GPU.
"""
import importlib.resources

import pytest

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="cupy (with its NVRTC bindings) is not installed")

from hgrn_cupy import _compile, chunk, fused_recurrent  # noqa: E402

ARCHS = ("sm_80", "sm_90")
# Each engine's launcher picks its compile options per dtype pair; compile exactly those.
OPTIONS = {"chunk": chunk.options, "fused_recurrent": fused_recurrent.options}


def _kernel_files():
    return sorted((f for f in importlib.resources.files("hgrn_cupy").joinpath("kernels").iterdir()
                   if f.name.endswith((".cu", ".cuh"))), key=lambda f: f.name)


def test_instantiation_list_covers_every_engine_and_dtype_pair():
    got = set(_compile.all_instantiations())
    want = {(e, xd, gd) for e in _compile.ENGINES for xd in _compile.DTYPES for gd in _compile.DTYPES}
    assert got == want
    assert set(OPTIONS) == set(_compile.ENGINES), "a new engine needs its compile options here"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "engine, x_dtype, g_dtype",
    [pytest.param(*inst, id=f"{inst[0]}-x_{inst[1]}-g_{inst[2]}") for inst in _compile.all_instantiations()],
)
def test_compiles_without_warnings(engine, x_dtype, g_dtype, arch):
    log = _compile.compile_for_arch(engine, x_dtype, g_dtype, arch, OPTIONS[engine](x_dtype, g_dtype))
    assert "warning" not in log.lower(), f"NVRTC warnings for {engine} ({x_dtype}, {g_dtype}) on {arch}:\n{log}"
    assert "error" not in log.lower(), log


@pytest.mark.parametrize("engine", sorted(_compile.ENGINES))
def test_folded_source_has_no_include_left(engine):
    src = _compile.read_source(_compile.ENGINES[engine][0])
    assert "#include" not in src.replace(" ", "").replace("\t", "")


@pytest.mark.parametrize("source", [pytest.param(f, id=f.name) for f in _kernel_files()])
def test_sources_need_no_cuda_headers(source):
    text = source.read_text()
    lines = [ln for ln in text.splitlines() if ln.lstrip().startswith("#") and "include" in ln and "<" in ln]
    assert not lines, f"{source.name} includes system or toolkit headers: {lines}"


def test_kernel_sources_ship():
    names = {f.name for f in _kernel_files()}
    assert {_compile.ENGINES[e][0] for e in _compile.ENGINES} <= names
    assert any(n.endswith(".cuh") for n in names)


def test_chunk_access_width():
    """16-byte accesses only where D, every pointer and every stride of a non-trivial axis allow them."""
    from hgrn_cupy._backend import Arr

    def arr(dtype, shape=(2, 10, 64), strides=None, offset=0):
        strides = strides or (shape[1] * shape[2], shape[2], 1)
        return Arr(1 << 20 | offset, shape, strides, dtype)

    assert chunk.pick_vec(64, [arr("bfloat16"), arr("bfloat16")]) == 8
    assert chunk.pick_vec(64, [arr("float32"), arr("float32")]) == 4
    assert chunk.pick_vec(64, [arr("bfloat16"), arr("float32")]) == 4
    assert chunk.pick_vec(64, [arr("float64"), arr("float16")]) == 2
    assert chunk.pick_vec(60, [arr("bfloat16", (2, 10, 60)), arr("bfloat16", (2, 10, 60))]) == 1
    assert chunk.pick_vec(64, [arr("bfloat16"), arr("bfloat16", offset=2)]) == 1   # misaligned pointer
    assert chunk.pick_vec(64, [arr("bfloat16"), arr("bfloat16", offset=16)]) == 8  # 16-byte aligned
    odd_time = (10 * 68, 68, 1)
    assert chunk.pick_vec(64, [arr("bfloat16"), arr("bfloat16", strides=odd_time)]) == 1
    one_step = (2, 1, 64)  # a stride of an axis of length 1 never moves a pointer
    assert chunk.pick_vec(64, [arr("bfloat16", one_step, (72, 3, 1)), arr("bfloat16", one_step)]) == 8
    assert chunk.pick_vec(64, [arr("bfloat16", strides=(-640, -64, 1)), arr("bfloat16")]) == 8


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
        assert chunk.workspace_layout(3, length, tile, True, acc, direction, vec)[:2] == (1, 1)  # varlen: one row
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


def test_engine_choice():
    """The measured crossover (benchmarks/NOTES.md): short T walks; otherwise the chunk engine below a
    channel count that depends on the element size, the direction, and whether the fused engine would take
    its block walk."""
    from hgrn_cupy import ops

    assert ops.pick_engine(64, 1, 4096, ("bfloat16",)) == "fused_recurrent"
    assert ops.pick_engine(1, 32768, 1024, ("bfloat16", "bfloat16"), 1) == "chunk"
    assert ops.pick_engine(8, 4096, 2048, ("bfloat16",), 0) == "fused_recurrent"  # 16K: the block walk
    assert ops.pick_engine(4, 4096, 2050, ("bfloat16",), 0) == "chunk"  # 8K: below the block walk's 16K
    assert ops.pick_engine(4, 4096, 2049, ("bfloat16",), 0) == "chunk"  # D odd: no block walk
    assert ops.pick_engine(8, 4096, 2050, ("bfloat16",), 0) == "chunk"  # 16K: 8-byte lanes, D not a multiple of 4
    assert ops.pick_engine(16, 4096, 2050, ("bfloat16",), 1) == "chunk"  # 32K backward: below 128K
    assert ops.pick_engine(8, 4096, 1024, ("bfloat16",), 0) == "chunk"  # 8K
    assert ops.pick_engine(16, 4096, 1024, ("bfloat16",), 0) == "fused_recurrent"  # 16K: the block walk
    assert ops.pick_engine(4, 4096, 1024, ("bfloat16",), 0) == "chunk"  # 4K
    assert ops.pick_engine(4, 4096, 1024, ("float32",), 0) == "chunk"  # 4K float32: below the block walk's 8K
    assert ops.pick_engine(2, 4096, 1024, ("float32",), 0) == "chunk"  # 2K
    assert ops.pick_engine(8, 4096, 1024, ("float32",), 0) == "fused_recurrent"  # 8K float32: the block walk
    assert ops.pick_engine(8, 64, 2048, ("bfloat16",), 0) == "chunk"  # T <= BLOCK_WALK_MIN_T
    assert ops.pick_engine(8, 4096, 2048, ("float64",), 0) == "chunk"
    assert ops.pick_engine(32, 2048, 4096, ("bfloat16",), 0) == "fused_recurrent"
    assert ops.pick_engine(16, 2048, 4096, ("bfloat16",), 0) == "fused_recurrent"  # 64K: two channels a thread
    assert ops.pick_engine(16, 2048, 2048, ("bfloat16",), 0) == "fused_recurrent"
    assert ops.pick_engine(16, 2048, 2048, ("bfloat16",), 1) == "chunk"  # 32K backward
    assert ops.pick_engine(64, 1024, 4096, ("bfloat16",), 1) == "fused_recurrent"  # 256K backward: the block walk
    assert ops.pick_engine(8, 4096, 1024, ("bfloat16",), 1) == "chunk"  # 8K backward
    assert ops.pick_engine(8, 4096, 1023, ("bfloat16",), 1) == "chunk"  # D odd: no block walk
    assert ops.pick_engine(4, 4096, 1024, ("float32",), 1) == "chunk"  # 4K float32 backward
    assert ops.pick_engine(2, 4096, 1024, ("float32",), 1) == "chunk"  # 2K
    assert ops.pick_engine(64, 4096, 1024, ("bfloat16",), 1) == "chunk"  # 64K backward
    assert ops.pick_engine(8, 4096, 2048, ("float32",), 1) == "chunk"  # float32 backward: below 512K
    assert ops.pick_engine(8, 4096, 2048, ("bfloat16", "float32"), 1) == "chunk"
    assert ops.pick_engine(128, 1024, 4096, ("float32",), 1) == "fused_recurrent"  # 512K: the thread walk
    assert ops.pick_engine(16, 4096, 1024, ("float64",), 1) == "fused_recurrent"  # float64: 16K
    assert ops.pick_engine(2, 8192, 512, ("float64",), 1) == "chunk"
