"""Kernel sources, template instantiation names, and the compiled-module cache.

This module is the only place that spells C++ type names or kernel names: everything else asks for
``(engine, direction, x dtype, g dtype)``.  Sources are read from the package data (``hgrn_cupy/kernels``), the
shared header is folded into the source string before compiling (CuPy's disk cache keys on the
source string, so a header edit can never reuse a stale binary), and modules are memoised per
(engine, dtypes, options, device).
"""
from __future__ import annotations

import importlib.resources
import re
import threading

# The storage type each supported dtype has in hgrn_cupy/kernels/common.cuh.
C_TYPES = {
    "float32": "float",
    "float16": "hc::half_t",
    "bfloat16": "hc::bfloat16_t",
    "float64": "double",
}
DTYPES = tuple(C_TYPES)
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
STEP = 2  # the "direction" of an engine's single-step (decode) kernel, after forward 0 and backward 1
BLOCK_FWD = 3  # the "directions" of the fused engine's block walks (hgrn_cupy/kernels/fused_recurrent.cu)
BLOCK_BWD = 4
# Channels per thread of the fused engine's walks, per storage size of the wider input: the width built
# besides 1 (hgrn_cupy/fused_recurrent.py says when it is used and why these values).
WALK_VEC = {2: 2, 4: 2, 8: 1}

# engine -> (source file, (forward kernel, backward kernel[, single-step kernel]), has a VARLEN template
# parameter besides VEC).  The fused engine's kernels are templated on VEC alone.
ENGINES = {
    "fused_recurrent": ("fused_recurrent.cu", ("fused_recurrent_fwd", "fused_recurrent_bwd", "fused_recurrent_step",
                                               "fused_recurrent_block_fwd", "fused_recurrent_block_bwd"), False),
    "chunk": ("chunk.cu", ("chunk_fwd", "chunk_bwd"), True),
}
BASE_OPTIONS = ("-std=c++17",)

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)
_lock = threading.Lock()
_sources: dict[str, str] = {}
_modules: dict[tuple, object] = {}
_functions: dict[tuple, object] = {}


def read_source(name: str) -> str:
    """The text of ``hgrn_cupy/kernels/<name>`` with every quoted include folded in (once each)."""
    src = _sources.get(name)
    if src is None:
        seen: set[str] = set()

        def expand(fname: str) -> str:
            if fname in seen:
                return ""
            seen.add(fname)
            text = importlib.resources.files("hgrn_cupy").joinpath("kernels").joinpath(fname).read_text()
            return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

        src = _sources[name] = expand(name)
    return src


def accumulation_dtype(x_dtype: str, g_dtype: str) -> str:
    """float64 when either input is float64, float32 otherwise (DESIGN.md section 1)."""
    return "float64" if "float64" in (x_dtype, g_dtype) else "float32"


def vector_width(x_dtype: str, g_dtype: str) -> int:
    """Elements per 16-byte access of the wider of the two storage types (chunk engine's VEC)."""
    return 16 // max(ITEMSIZE[x_dtype], ITEMSIZE[g_dtype])


def block_walk_width(x_dtype: str, g_dtype: str, direction: int = 0, narrow: bool = False) -> int:
    """Channels per lane of the fused engine's block walks: 8 bytes of the wider storage type forward (4
    for 16-bit types where ``narrow``), 4 backward (it holds three tensors' steps; 8 bytes spilled), at
    least one channel."""
    size = max(ITEMSIZE[x_dtype], ITEMSIZE[g_dtype])
    nbytes = 4 if direction == 1 or (narrow and size == 2) else 8
    return max(1, nbytes // size)


def layout_vector_width(D, arrs, vec=None) -> int:
    """``vec`` (by default ``vector_width`` of the first two arrays' dtypes) where D and the strides of
    every axis of ``arrs`` (``Arr`` [B, T, D]) longer than one are multiples of it, else 1; pointers
    are the caller's to check (a prepared launch checks them at each call)."""
    vec = vec or vector_width(arrs[0].dtype, arrs[1].dtype)
    if D % vec:
        return 1
    for a in arrs:
        for n, s in zip(a.shape[:2], a.strides[:2]):
            if n > 1 and s % vec:
                return 1
    return vec


def pointers_aligned(vec, arrs) -> bool:
    """Whether every ``Arr`` in ``arrs`` starts on a multiple of ``vec`` elements (in bytes)."""
    return all(a.ptr % (vec * ITEMSIZE[a.dtype]) == 0 for a in arrs)


def alignment_masks(vec, arrs) -> tuple:
    """Per ``Arr`` of ``arrs`` (pointers not read), the pointer bits that must be clear for ``vec``-wide
    accesses: a prepared launch checks a call's pointers against them, as ``pointers_aligned`` does."""
    return tuple(vec * ITEMSIZE[a.dtype] - 1 for a in arrs)


def kernel_name(engine: str, direction: int, x_dtype: str, g_dtype: str, varlen: bool = False, vec: int = 1) -> str:
    """The name expression of one instantiation, e.g. ``hc::chunk_fwd<float, hc::half_t, false, 4>``."""
    _, kernels, templated = ENGINES[engine]
    extra = f", {'true' if varlen else 'false'}, {vec}" if templated else f", {vec}"
    return f"hc::{kernels[direction]}<{C_TYPES[x_dtype]}, {C_TYPES[g_dtype]}{extra}>"


def name_expressions(engine: str, x_dtype: str, g_dtype: str) -> tuple[str, ...]:
    """Every kernel of one engine for one dtype pair: they share a module."""
    if not ENGINES[engine][2]:
        walks = sorted({1, WALK_VEC[max(ITEMSIZE[x_dtype], ITEMSIZE[g_dtype])]})
        names = tuple(kernel_name(engine, k, x_dtype, g_dtype, vec=v) for k in (0, 1) for v in walks)
        if len(ENGINES[engine][1]) > STEP:
            names += (kernel_name(engine, STEP, x_dtype, g_dtype, vec=vector_width(x_dtype, g_dtype)),)
        for k in (BLOCK_FWD, BLOCK_BWD):
            if k < len(ENGINES[engine][1]):
                widths = sorted({block_walk_width(x_dtype, g_dtype, k - BLOCK_FWD, narrow) for narrow in (False, True)})
                names += tuple(kernel_name(engine, k, x_dtype, g_dtype, vec=v) for v in widths)
        return names
    vecs = sorted({1, vector_width(x_dtype, g_dtype)})
    return tuple(kernel_name(engine, k, x_dtype, g_dtype, v, w) for k in (0, 1) for v in (False, True) for w in vecs)


def all_instantiations() -> list[tuple[str, str, str]]:
    """Every (engine, x dtype, g dtype) the library can request."""
    return [(e, xd, gd) for e in ENGINES for xd in DTYPES for gd in DTYPES]


def get_function(engine: str, direction: int, x_dtype: str, g_dtype: str, device: int, options: tuple = (),
                 varlen: bool = False, vec: int = 1):
    """The compiled kernel (a ``cupy.cuda.Function``) for ``device``; compiles on first use."""
    key = (engine, direction, x_dtype, g_dtype, device, options, varlen, vec)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    import cupy

    with _lock:
        mkey = (engine, x_dtype, g_dtype, options)
        module = _modules.get(mkey)
        if module is None:
            names = name_expressions(engine, x_dtype, g_dtype)
            module = cupy.RawModule(code=read_source(ENGINES[engine][0]),
                                    options=BASE_OPTIONS + tuple(options), name_expressions=names)
            _modules[mkey] = module
        with cupy.cuda.Device(device):
            try:
                raw = module.get_function(kernel_name(engine, direction, x_dtype, g_dtype, varlen, vec))
                fn = raw.kernel
            except cupy.cuda.compiler.CompileException as e:  # keep NVRTC's log in the message
                raise RuntimeError(f"hgrn_cupy: compiling {engine} kernels for ({x_dtype}, {g_dtype}) "
                                   f"failed:\n{e}") from e
        _functions[key] = fn
    return fn


def compile_for_arch(engine: str, x_dtype: str, g_dtype: str, arch: str, options: tuple = ()) -> str:
    """Compile one module with NVRTC directly for ``arch`` (e.g. ``"sm_90"``); needs no GPU.

    Returns NVRTC's log; raises ``RuntimeError`` with the log on failure.  Used by the CI test that
    builds every instantiation.
    """
    from cupy_backends.cuda.libs import nvrtc

    src = read_source(ENGINES[engine][0])
    prog = nvrtc.createProgram(src, ENGINES[engine][0], [], [])
    try:
        for name in name_expressions(engine, x_dtype, g_dtype):
            nvrtc.addNameExpression(prog, name)
        opts = [f"--gpu-architecture={arch}", *BASE_OPTIONS, *options]
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC failed for {engine} ({x_dtype}, {g_dtype}) on {arch}: {e}\n"
                               f"{nvrtc.getProgramLog(prog)}") from e
        return nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


# ---------------------------------------------------------------------------------------------
# Launching.  cupy's Function.__call__ converts each argument to a temporary object, about 15 us
# for our 16-25 arguments; here every argument is one 8-byte slot of a reused per-thread buffer
# (a 4-byte int parameter reads the low half, little-endian) and the driver is called directly.

_tls = threading.local()


def _thread_slots(n, device):
    """This thread's parameter buffer for ``n`` arguments: ``(buffer, address of the pointer array,
    packer)``.  Made on a thread's first launch on ``device``, which also makes that device's primary
    context current (a new thread has none)."""
    try:
        return _tls.slots[n, device]
    except AttributeError:
        _tls.slots = {}
    except KeyError:
        pass
    import ctypes
    import struct

    import cupy

    cupy.cuda.runtime.setDevice(device)
    buf = ctypes.create_string_buffer(8 * n)
    base = ctypes.addressof(buf)
    params = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
    entry = _tls.slots[n, device] = (buf, ctypes.addressof(params), struct.Struct(f"<{n}q"), params)
    return entry


_at_once: dict = {}


def blocks_at_once(fn, threads, device):
    """How many blocks of ``threads`` threads of ``fn`` (a ``cupy.cuda.Function`` of ``device``) the GPU
    holds at once: blocks per SM by the occupancy calculator, times the SMs."""
    key = (fn.ptr, threads, device)
    n = _at_once.get(key)
    if n is None:
        from cupy_backends.cuda.api import driver, runtime

        per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.ptr, threads, 0)
        n = _at_once[key] = per_sm * runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device)
    return n


def bind(fn, grid, block, device):
    """``fn`` (a ``cupy.cuda.Function`` of ``device``) with its grid and block fixed: a function
    ``kernel(stream_ptr, *args)`` that queues it on the stream ``stream_ptr``.  ``args`` are Python ints
    (pointers, 64-bit integers, or 32-bit ints), in the kernel's parameter order."""
    from cupy_backends.cuda.api import driver

    launch_kernel, fn_ptr = driver.launchKernel, fn.ptr
    gx, gy, gz = (tuple(grid) + (1, 1))[:3]
    bx, by, bz = (tuple(block) + (1, 1))[:3]

    def kernel(stream_ptr, *args):
        buf, params, packer, _ = _thread_slots(len(args), device)
        packer.pack_into(buf, 0, *args)
        launch_kernel(fn_ptr, gx, gy, gz, bx, by, bz, 0, stream_ptr, params, 0)

    kernel.function = fn  # the module stays loaded while the binding lives
    return kernel


def launch(fn, grid, block, stream_ptr, args, device):
    """Queue ``fn`` once on the stream ``stream_ptr`` (see :func:`bind`)."""
    bind(fn, grid, block, device)(stream_ptr, *args)
