"""Kernel sources, instantiation names, NVRTC compilation, and binding a kernel to its launch.

The only module that spells C++ type names: an engine asks for ``instantiation("chunk_fwd", "bfloat16",
"float32", True, 8)`` and gets ``hc::chunk_fwd<hc::bfloat16_t, float, true, 8>``.  Sources are package
data (``hgrn_cupy/kernels``); the shared header is folded into each source string before compiling
(CuPy's disk cache keys on the source string alone, so a header edit can never reuse a stale binary).
One module is compiled per (source, name expressions, options) and loaded once per device.
"""
from __future__ import annotations

import importlib.resources
import re
import threading

# The storage type of each supported dtype in kernels/common.cuh.
C_TYPES = {"float32": "float", "float16": "hc::half_t", "bfloat16": "hc::bfloat16_t", "float64": "double"}
DTYPES = tuple(C_TYPES)
# The C++ type of each supported cu_seqlens dtype (the varlen guard is templated on it).
INDEX_C_TYPES = {"int32": "int", "int64": "long long"}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
BASE_OPTIONS = ("-std=c++17",)

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)
_lock = threading.Lock()
_sources: dict = {}
_modules: dict = {}
_functions: dict = {}
_attributes: dict = {}  # (function pointer, attribute) -> (value, the cupy.cuda.Function, kept alive)


def accumulation_dtype(x_dtype: str, g_dtype: str) -> str:
    """float64 when either input is float64, float32 otherwise (docs/design.md, the operation)."""
    return "float64" if "float64" in (x_dtype, g_dtype) else "float32"


def read_source(name: str) -> str:
    """The text of ``kernels/<name>`` with every quoted include folded in (once each)."""
    src = _sources.get(name)
    if src is None:
        seen: set = set()
        folder = importlib.resources.files(__package__).joinpath("kernels")

        def expand(fname: str) -> str:
            if fname in seen:
                return ""
            seen.add(fname)
            return _INCLUDE.sub(lambda m: expand(m.group(1)), folder.joinpath(fname).read_text())

        src = _sources[name] = expand(name)
    return src


def instantiation(kernel: str, *args) -> str:
    """The name expression of one template instantiation: dtype names become their storage types
    (index dtypes ``int32``/``int64`` their C++ integers), bools ``true``/``false``, ints themselves."""
    parts = []
    for a in args:
        if isinstance(a, bool):
            parts.append("true" if a else "false")
        elif isinstance(a, int):
            parts.append(str(a))
        else:
            parts.append(C_TYPES[a] if a in C_TYPES else INDEX_C_TYPES[a])
    return f"hc::{kernel}<{', '.join(parts)}>"


def get_function(source: str, names: tuple, name: str, device: int, options: tuple = ()):
    """Kernel ``name`` (one of ``names``, which share a module) of ``source``, loaded on ``device`` (a
    ``cupy.cuda.Function``); compiles on first use."""
    key = (source, names, name, device, options)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    import cupy

    with _lock:
        mkey = (source, names, options)
        module = _modules.get(mkey)
        if module is None:
            module = _modules[mkey] = cupy.RawModule(code=read_source(source), options=BASE_OPTIONS + options,
                                                     name_expressions=names)
        with cupy.cuda.Device(device):
            try:
                fn = module.get_function(name).kernel
            except cupy.cuda.compiler.CompileException as e:  # keep NVRTC's log in the message
                raise RuntimeError(f"hgrn_cupy: compiling {source} failed:\n{e}") from e
        _functions[key] = fn
    return fn


def compile_for_arch(source: str, names: tuple, arch: str, options: tuple = ()) -> str:
    """Compile ``names`` of ``source`` with NVRTC for ``arch`` (e.g. ``"sm_90"``); needs no GPU.
    Returns NVRTC's log; raises ``RuntimeError`` with the log on failure."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(read_source(source), source, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", *BASE_OPTIONS, *options])
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC failed for {source} on {arch}: {e}\n{nvrtc.getProgramLog(prog)}") from e
        return nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


# ---------------------------------------------------------------------------------------------
# Launching.  CuPy's Function.__call__ converts each argument to a temporary object, a host cost per call that
# grows with the kernels' 16-25 arguments (docs/performance.md, host time); here every argument is one 8-byte
# slot of a reused per-thread buffer (a 4-byte int parameter reads the low half, little-endian) and the driver
# is called directly.  A kernel whose last parameter is a struct of 8-byte fields takes them as that many
# consecutive slots (``tail_words``).

_tls = threading.local()
_at_once: dict = {}


def _thread_slots(n, device, tail_words=1, head_words=1):
    """This thread's parameter buffer for ``n`` argument words whose first ``head_words`` form one parameter
    and whose last ``tail_words`` form one: ``(buffer, address of the pointer array, packer, pointers)``.
    Made on a thread's first launch on ``device``, which also makes that device's primary context current
    (a new thread has none)."""
    key = (n, device, tail_words, head_words)
    try:
        return _tls.slots[key]
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
    starts = [0] + list(range(head_words, n - tail_words + 1))
    params = (ctypes.c_void_p * len(starts))(*[base + 8 * i for i in starts])
    entry = _tls.slots[key] = (buf, ctypes.addressof(params), struct.Struct(f"<{n}q"), params)
    return entry


# A CUtensorMap (sm_90 bulk tensor copies) is 128 bytes the driver encodes on the host; CuPy's driver
# bindings lack cuTensorMapEncodeTiled, so it is called from the driver library.  Maps here move bits
# (an unsigned type of the itemsize), so the out-of-bounds fill is zero bits: 0.0 in every float type.
TENSOR_MAP_WORDS = 16
_MAP_TYPES = {2: 1, 4: 2}  # itemsize -> CU_TENSOR_MAP_DATA_TYPE_UINT16, _UINT32
_encoder: list = []


def tensor_map(ptr, itemsize, dims, strides, box):
    """A CUtensorMap over the tensor at ``ptr`` as TENSOR_MAP_WORDS signed 64-bit words: ``dims`` in
    elements innermost first, ``strides`` in bytes of every dimension but the innermost, ``box`` the
    elements a copy moves along each dimension; no interleave or swizzle, 256-byte L2 promotion, zeros
    outside the tensor.  The driver's rules (ptr and strides multiples of 16 bytes, at most 256 elements a
    box dimension, the box's innermost bytes a multiple of 16) are the caller's; a refusal raises."""
    import ctypes
    import os

    if not _encoder:
        fn = ctypes.CDLL("nvcuda.dll" if os.name == "nt" else "libcuda.so.1").cuTensorMapEncodeTiled
        fn.restype = ctypes.c_int
        _encoder.append(fn)
    rank, u64, u32, i32 = len(dims), ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int
    out = (ctypes.c_int64 * TENSOR_MAP_WORDS)()
    rc = _encoder[0](out, i32(_MAP_TYPES[itemsize]), u32(rank), ctypes.c_void_p(ptr), (u64 * rank)(*dims),
                     (u64 * (rank - 1))(*strides), (u32 * rank)(*box), (u32 * rank)(*[1] * rank), i32(0), i32(0),
                     i32(3), i32(0))
    if rc:
        raise RuntimeError(f"cuTensorMapEncodeTiled refused dims {dims}, strides {strides}, box {box} (CUresult {rc})")
    return tuple(out)


def prefer_shared(fn, percent):
    """Ask the driver to split each multiprocessor's unified L1 / shared memory ``percent`` % shared for
    ``fn`` (a loaded ``cupy.cuda.Function``); the preference stays with the loaded kernel.  Without one a
    kernel runs under whatever split the kernels before it left (docs/performance.md, shared memory
    carveout).  Ask before an occupancy query: the split bounds the blocks a multiprocessor holds."""
    from cupy_backends.cuda.api import driver

    _set_attribute(fn, driver.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, percent)


def _set_attribute(fn, attribute, value):
    """Set ``attribute`` of ``fn`` (a loaded ``cupy.cuda.Function``) to ``value`` unless an earlier call set
    it so: a loaded function keeps its attributes, and plans (each of which asks) are made again whenever
    shapes change, so the driver is called once per function and value.  The entry keeps ``fn`` alive, so
    that no other function can take its pointer while it is remembered."""
    from cupy_backends.cuda.api import driver

    key = (fn.ptr, attribute)
    held = _attributes.get(key)
    if held is None or held[0] != value:
        driver.funcSetAttribute(fn.ptr, attribute, value)
        _attributes[key] = (value, fn)


def shared_room(fn, device):
    """``(per_sm, per_block)``: the bytes of shared memory a multiprocessor of ``device`` holds, and the
    bytes a block of ``fn`` (a loaded ``cupy.cuda.Function``) takes of it besides its dynamic shared memory
    (its static shared memory and the driver's reserve)."""
    from cupy_backends.cuda.api import driver, runtime

    static = driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn.ptr)
    reserve = runtime.deviceGetAttribute(runtime.cudaDevAttrReservedSharedMemoryPerBlock, device)
    per_sm = runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerMultiprocessor, device)
    return per_sm, static + reserve


def hold_shared(fn, dynamic, blocks, device):
    """Let ``fn`` (a loaded ``cupy.cuda.Function`` of ``device``) take ``dynamic`` bytes of dynamic shared
    memory a block (past the 48 KB a launch gets without asking), and ask for the split of L1 and shared
    memory that holds ``blocks`` such blocks a multiprocessor and no more, so that L1 keeps the rest
    (:func:`shared_room`'s bytes a block counted)."""
    from cupy_backends.cuda.api import driver

    _set_attribute(fn, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic)
    prefer_shared(fn, shared_split(fn, dynamic, blocks, device))


def shared_split(fn, dynamic, blocks, device):
    """The split of L1 and shared memory, in percent shared, that holds ``blocks`` blocks of ``fn`` (a
    loaded ``cupy.cuda.Function`` of ``device``) with ``dynamic`` bytes of dynamic shared memory each on a
    multiprocessor (:func:`shared_room`'s bytes a block counted), at most 100."""
    per_sm, per_block = shared_room(fn, device)
    return min(100, -(-100 * blocks * (dynamic + per_block) // per_sm))


def blocks_at_once(fn, threads, device, dynamic=0):
    """How many blocks of ``threads`` threads of ``fn`` (a ``cupy.cuda.Function`` of ``device``), each with
    ``dynamic`` bytes of dynamic shared memory, the GPU holds at once: blocks per multiprocessor by the
    occupancy calculator, times the multiprocessors."""
    key = (fn.ptr, threads, device, dynamic)
    n = _at_once.get(key)
    if n is None:
        from cupy_backends.cuda.api import driver, runtime

        per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.ptr, threads, dynamic)
        n = _at_once[key] = per_sm * runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device)
    return n


def bind(fn, grid, block, device, tail_words=1, shared=0, head_words=1):
    """``fn`` (a ``cupy.cuda.Function`` of ``device``) with its grid, block and dynamic shared memory
    (bytes) fixed: a function ``kernel(stream_ptr, *args)`` that queues it on the stream ``stream_ptr``.
    ``args`` are Python ints (pointers, 64-bit integers, or 32-bit ints) in the kernel's parameter order;
    the first ``head_words`` of them are the words of its first parameter (a struct of that many 8-byte
    words, such as tensor maps) and the last ``tail_words`` the fields of its last parameter, a struct of
    that many 8-byte fields."""
    from cupy_backends.cuda.api import driver

    launch_kernel, fn_ptr = driver.launchKernel, fn.ptr
    gx, gy, gz = (tuple(grid) + (1, 1))[:3]
    bx, by, bz = (tuple(block) + (1, 1))[:3]

    def kernel(stream_ptr, *args):
        buf, params, packer, _ = _thread_slots(len(args), device, tail_words, head_words)
        packer.pack_into(buf, 0, *args)
        launch_kernel(fn_ptr, gx, gy, gz, bx, by, bz, shared, stream_ptr, params, 0)

    kernel.function = fn  # the module stays loaded while the binding lives
    return kernel
