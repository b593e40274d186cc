"""Array adapters: what the library needs from NumPy, CuPy, PyTorch and JAX arrays, the same type out, on
the caller's device and stream.

A framework is recognised through ``sys.modules`` without importing it.  GPU arrays are described
to the launchers as raw pointers with strides (zero-copy); CPU arrays are handed to the NumPy
reference.  Streams are read at every call and never cached:

- torch: ``torch.cuda.current_stream``; outputs come from torch's caching allocator, so calls can
  be captured in CUDA graphs.
- CuPy: ``cupy.cuda.get_current_stream``.
- JAX (and any other DLPack producer on a CUDA device): imported with ``cupy.from_dlpack``, which
  follows the DLPack stream protocol on CuPy's current stream; JAX results are handed back with
  ``jax.dlpack.from_dlpack``, which does the same in the other direction.
"""
from __future__ import annotations

import sys

import numpy as np

from .engines.layout import Arr, row_major

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INDEX_DTYPES = ("int32", "int64")
# Tests (``plans.poison_outputs``): every GPU output is filled with all-ones bytes (a NaN in every float
# dtype) before the kernels run, so that an element they fail to write cannot pass as correct.
poison = False


def _np_dtype_name(dt) -> str:
    name = np.dtype(dt).name
    return "bfloat16" if name == "bfloat16" else name


class Framework:
    """What the public functions need from an array library."""
    name = "?"

    def is_gpu(self, a) -> bool: ...
    def device(self, a): ...
    def dtype(self, a) -> str: ...
    def describe(self, a) -> Arr: ...
    def empty(self, shape, dtype: str, like): ...
    def astype(self, a, dtype: str): ...
    def contiguous(self, a): ...
    def stream(self, like) -> int: ...
    def to_numpy(self, a) -> np.ndarray: ...
    def from_numpy(self, a: np.ndarray, like, dtype: str): ...
    def index_values(self, a) -> np.ndarray: ...
    def unsupported(self, a) -> str | None:
        """Why the kernels cannot read array ``a`` (its layout, its device), or None."""
        return None
    def version(self, a) -> int | None:
        """A counter that changes whenever the framework writes the array's values (None: none kept)."""
        return None
    def strides(self, a) -> tuple:  # in elements
        return tuple(s // a.itemsize for s in a.strides)
    def capturing(self, like) -> bool:
        return False

    def signature(self, x, g, h, head) -> tuple | None:
        """``head`` plus everything the checks and the launch read from x, g and the optional state h
        (framework, device, dtype, shape, strides), or None when they are not all of x's exact type.
        Equal signatures pass or fail the checks alike (``plans``)."""
        return None


# ----------------------------------------------------------------------------------------------
# NumPy (CPU only)

def _bfloat16_np():
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml_dtypes comes with the GPU extras and with JAX
        return None
    return ml_dtypes.bfloat16


class _Numpy(Framework):
    name = "numpy"

    def is_gpu(self, a):
        return False

    def device(self, a):
        return "cpu"

    def dtype(self, a):
        return _np_dtype_name(a.dtype)

    def to_numpy(self, a):
        return np.asarray(a)  # a subclass (np.memmap) as a plain array

    def from_numpy(self, a, like, dtype):
        return a if _np_dtype_name(a.dtype) == dtype else a.astype(CUPY._np_dtype(dtype))

    def index_values(self, a):
        return np.asarray(a)

    def signature(self, x, g, h, head):
        t = type(x)
        if type(g) is not t:
            return None
        if h is None:
            return head, x.dtype, x.shape, x.strides, g.dtype, g.shape, g.strides
        if type(h) is not t:
            return None
        return head, x.dtype, x.shape, x.strides, g.dtype, g.shape, g.strides, h.dtype, h.shape, h.strides


# ----------------------------------------------------------------------------------------------
# CuPy (GPU only)

class _Cupy(Framework):
    name = "cupy"

    def is_gpu(self, a):
        return True

    def device(self, a):
        return a.device.id

    def dtype(self, a):
        return _np_dtype_name(a.dtype)

    def describe(self, a):
        item = a.itemsize
        return Arr(a.data.ptr, a.shape, tuple(s // item for s in a.strides), self.dtype(a))

    def _np_dtype(self, dtype):
        if dtype == "bfloat16":
            bf16 = _bfloat16_np()
            if bf16 is None:
                raise TypeError("bfloat16 CuPy arrays need the ml_dtypes package")
            return bf16
        return np.dtype(dtype)

    def empty(self, shape, dtype, like):
        import cupy

        with cupy.cuda.Device(like.device.id):
            a = cupy.empty(shape, self._np_dtype(dtype))
            if poison:
                a.view(cupy.uint8).fill(0xFF)
            return a

    def astype(self, a, dtype):
        return a.astype(self._np_dtype(dtype))

    def contiguous(self, a):
        import cupy

        return cupy.ascontiguousarray(a)

    def stream(self, like):
        import cupy

        return cupy.cuda.get_current_stream(like.device.id).ptr

    def capturing(self, like):
        import cupy

        return cupy.cuda.get_current_stream(like.device.id).is_capturing()

    def index_values(self, a):
        return a.get()

    def signature(self, x, g, h, head):
        t = type(x)
        if type(g) is not t:
            return None
        if h is None:
            return (head, x.data.device_id, x.dtype, x.shape, x.strides,
                    g.data.device_id, g.dtype, g.shape, g.strides)
        if type(h) is not t:
            return None
        return (head, x.data.device_id, x.dtype, x.shape, x.strides, g.data.device_id, g.dtype, g.shape, g.strides,
                h.data.device_id, h.dtype, h.shape, h.strides)


# ----------------------------------------------------------------------------------------------
# PyTorch (CPU and CUDA)

_TORCH_DTYPES: dict = {}


def _torch_dtype_names():
    if not _TORCH_DTYPES:
        import torch

        _TORCH_DTYPES.update({torch.float16: "float16", torch.bfloat16: "bfloat16",
                              torch.float32: "float32", torch.float64: "float64",
                              torch.int32: "int32", torch.int64: "int64"})
        _TORCH_DTYPES.update({v: k for k, v in list(_TORCH_DTYPES.items())})
    return _TORCH_DTYPES


class _Torch(Framework):
    name = "torch"

    def is_gpu(self, a):
        return a.is_cuda

    def device(self, a):
        return a.device

    def dtype(self, a):
        name = _torch_dtype_names().get(a.dtype)
        return name if name is not None else str(a.dtype).replace("torch.", "")

    def describe(self, a):
        return Arr(a.data_ptr(), tuple(a.shape), tuple(a.stride()), self.dtype(a))

    def empty(self, shape, dtype, like):
        import torch

        a = torch.empty(shape, dtype=_torch_dtype_names()[dtype], device=like.device)
        if poison and a.is_cuda:
            a.view(torch.uint8).fill_(0xFF)
        return a

    def astype(self, a, dtype):
        return a.to(_torch_dtype_names()[dtype])

    def contiguous(self, a):
        return a.contiguous()

    def stream(self, like):
        import torch

        return torch_stream_reader(torch)(like.device.index)

    def capturing(self, like):
        import torch

        return torch.cuda.is_current_stream_capturing()

    def unsupported(self, a):
        import torch

        if a.layout is not torch.strided:
            return f"a {a.layout} tensor; hgrn_cupy reads dense (strided) tensors (.to_dense() makes one)"
        if a.device.type not in ("cpu", "cuda"):
            return f"on the {a.device.type} device; hgrn_cupy reads CPU and CUDA tensors"
        return None

    def to_numpy(self, a):
        import torch

        a = a.detach()
        if a.dtype == torch.bfloat16:
            from .naive import bf16_bits_to_float32

            return bf16_bits_to_float32(a.contiguous().view(torch.int16).numpy().view(np.uint16))
        return a.numpy()

    def from_numpy(self, a, like, dtype):
        import torch

        if dtype == "bfloat16":
            from .naive import float32_to_bf16_bits

            bits = float32_to_bf16_bits(np.asarray(a, dtype=np.float32))
            return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))

    def index_values(self, a):
        return a.detach().cpu().numpy()

    def version(self, a):
        try:
            return a._version  # bumped by every in-place write, views sharing their base's counter
        except RuntimeError:  # an inference tensor keeps none
            return None

    def strides(self, a):
        return tuple(a.stride())

    def signature(self, x, g, h, head):
        t = type(x)
        if type(g) is not t or (h is not None and type(h) is not t):
            return None
        # CUDA devices by index (an int hashes and compares faster than a torch.device); any other
        # placement by its torch.device, which never equals an int.
        if x.is_cuda and g.is_cuda and (h is None or h.is_cuda):
            xp, gp, hp = x.get_device(), g.get_device(), None if h is None else h.get_device()
        else:
            xp, gp, hp = x.device, g.device, None if h is None else h.device
        if h is None:
            return head, xp, x.dtype, x.shape, x.stride(), gp, g.dtype, g.shape, g.stride()
        return (head, xp, x.dtype, x.shape, x.stride(), gp, g.dtype, g.shape, g.stride(),
                hp, h.dtype, h.shape, h.stride())


# ----------------------------------------------------------------------------------------------
# JAX (CPU and GPU).  GPU arrays are converted to CuPy at the boundary (see from_gpu / to_gpu).

class _Jax(Framework):
    name = "jax"

    def is_gpu(self, a):
        return any(d.platform != "cpu" for d in a.devices())

    def device(self, a):
        return next(iter(a.devices()))

    def dtype(self, a):
        return _np_dtype_name(a.dtype)

    def to_numpy(self, a):
        out = np.asarray(a)
        if out.dtype.name == "bfloat16":
            out = out.astype(np.float32)
        return out

    def from_numpy(self, a, like, dtype):
        import jax
        import jax.numpy as jnp

        target = jnp.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        return jax.device_put(jnp.asarray(a).astype(target), self.device(like))

    def index_values(self, a):
        return np.asarray(a)

    def strides(self, a):  # JAX arrays are always dense, row-major
        return row_major(a.shape)

    @staticmethod
    def to_cupy(a):
        import cupy

        return cupy.from_dlpack(a)

    @staticmethod
    def from_cupy(a):
        import jax

        return jax.dlpack.from_dlpack(a)


NUMPY, CUPY, TORCH, JAX = _Numpy(), _Cupy(), _Torch(), _Jax()
_by_type: dict[type, Framework] = {np.ndarray: NUMPY}
# The exact array types whose calls may be planned (see Framework.signature); subclasses are not, as
# they may redefine what the signature reads.
PLANNABLE: dict[type, Framework] = {np.ndarray: NUMPY}


def framework_of(a) -> Framework | None:
    """The framework that owns ``a``, or None when it is not an array we support."""
    t = type(a)
    fw = _by_type.get(t)
    if fw is not None:
        return fw
    if isinstance(a, np.ndarray):  # subclasses holding plain memory (np.memmap, ...): NumPy, not planned
        if isinstance(a, np.ma.MaskedArray):
            return None
        _by_type[t] = NUMPY
        return NUMPY
    cupy, torch, jax = sys.modules.get("cupy"), sys.modules.get("torch"), sys.modules.get("jax")
    if cupy is not None and isinstance(a, cupy.ndarray):
        fw = CUPY
        if t is cupy.ndarray:
            PLANNABLE[t] = fw
    elif torch is not None and isinstance(a, torch.Tensor):
        fw = TORCH
        if t is torch.Tensor:
            PLANNABLE[t] = fw
    elif jax is not None and isinstance(a, getattr(jax, "Array", ())):
        fw = JAX
    else:
        return None
    _by_type[t] = fw
    return fw


def torch_stream_reader(torch):
    """``read(device_index) -> pointer`` of torch's current CUDA stream on that device: torch's own
    raw accessor where it has one (what ``torch.cuda.current_stream`` reads, without the object)."""
    get_raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return get_raw if get_raw is not None else (lambda index: torch.cuda.current_stream(index).cuda_stream)


def is_jax_tracer(a) -> bool:
    """True for an abstract JAX value (under jit, grad or vmap), which has no buffer to hand out."""
    jax = sys.modules.get("jax")
    tracer = getattr(getattr(jax, "core", None), "Tracer", None)
    return tracer is not None and isinstance(a, tracer)
