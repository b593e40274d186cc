"""The one argument check of every front end (top level, torch, JAX): types, shapes, dtypes, places,
flags and cu_seqlens, with errors that name the argument.

Works on eager arrays of every framework, on torch's fake tensors (``torch.compile``) and on JAX tracers
(``values=False``: shapes and dtypes only).  Returns a ``Call``: what the plan and the engine choice need.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import numpy as np

from . import arrays as ar
from .nvrtc import accumulation_dtype
from .settings import config


class Call(NamedTuple):
    """A checked call: its framework, sizes, dtype names (x or o, then g), accumulation dtype, whether
    it packs sequences (cu_seqlens) and whether the offsets' values were checked on the host."""
    fw: object
    B: int
    T: int
    D: int
    N: int
    dtypes: tuple
    acc: str
    varlen: bool
    values_checked: bool


def framework(a, name):
    """The framework of array ``a`` (argument ``name``); TypeError when it is none we support."""
    fw = ar.framework_of(a)
    if fw is None:
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(f"{name} is a NumPy masked array; masks are not supported (pass .filled() or .data)")
        raise TypeError(f"{name} must be a NumPy, CuPy, PyTorch or JAX array, got {type(a).__name__}")
    return fw


def _readable(a, name, fw):
    """TypeError where the kernels cannot read ``a`` (a sparse torch tensor, one on the meta device)."""
    why = fw.unsupported(a)
    if why:
        raise TypeError(f"{name} is {why}")


def _eager_framework(a, name, values):
    fw = framework(a, name)
    if values and fw is ar.JAX and ar.is_jax_tracer(a):  # inside jax.jit, grad or vmap
        raise TypeError(f"{name} is a traced JAX value; inside jax.jit, grad or vmap use hgrn_cupy.jax.hgrn "
                        "(and friends), which run inside the compiled program")
    if values:
        _readable(a, name, fw)
    return fw


def flag(value, name):
    """``value`` as a bool; TypeError unless it is a Python or NumPy bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _same_place(a, name, fw, ref, ref_name, places):
    other = framework(a, name)
    if other is not fw:
        raise TypeError(f"{name} is a {other.name} array but {ref_name} is a {fw.name} array")
    if places:
        _readable(a, name, fw)
        if fw.device(a) != fw.device(ref):
            raise ValueError(f"{name} is on {fw.device(a)} but {ref_name} is on {fw.device(ref)}")


def _float_dtype(a, name, fw):
    dt = fw.dtype(a)
    if dt not in ar.FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {dt}; supported: {', '.join(ar.FLOAT_DTYPES)}")
    return dt


class ChannelStrideError(ValueError):
    """An array whose channel axis (the last) is not contiguous: the kernels read channels with stride 1.
    ``hgrn_cupy.torch`` copies such tensors and calls again; the other front ends report it."""


def _check_btd(a, name, fw, shape=None, strides=True):
    if len(a.shape) != 3:
        raise ValueError(f"{name} must have 3 dimensions [B, T, D], got shape {tuple(a.shape)}")
    if shape is not None and tuple(a.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} like the other inputs, got {tuple(a.shape)}")
    if strides and a.shape[2] > 1 and min(a.shape) > 0 and fw.strides(a)[2] != 1:
        raise ChannelStrideError(f"{name} must be contiguous along its last axis (stride 1), got strides "
                                 f"{fw.strides(a)}")


def _check_state(a, name, fw, ref, ref_name, N, D, places):
    if a is None:
        return
    _same_place(a, name, fw, ref, ref_name, places)
    _float_dtype(a, name, fw)
    if tuple(a.shape) != (N, D):
        raise ValueError(f"{name} must have shape [N, D] = {(N, D)}, got {tuple(a.shape)}")


def cu_seqlens_layout(shape, dtype, B):
    """The checks on cu_seqlens that need no values; returns N, the number of sequences."""
    if dtype not in ar.INDEX_DTYPES:
        raise TypeError(f"cu_seqlens has dtype {dtype}; supported: int32, int64")
    if len(shape) != 1:
        raise ValueError(f"cu_seqlens must be a 1-D array [N+1], got shape {tuple(shape)}")
    if shape[0] < 1:
        raise ValueError("cu_seqlens must hold at least one offset (0)")
    if B != 1:
        raise ValueError(f"cu_seqlens packs sequences along time and needs B == 1, got B = {B}")
    return shape[0] - 1


def cu_seqlens_values(v, T):
    """cu_seqlens (host values) starts at 0, never decreases and ends at T."""
    if v[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(v[0])}")
    if np.any(np.diff(v) < 0):
        raise ValueError("cu_seqlens must be non-decreasing")
    if v[-1] != T:
        raise ValueError(f"cu_seqlens must end at T = {T}, got {int(v[-1])}")


def offsets_valid(v, T) -> bool:
    """Whether host offsets ``v`` pass :func:`cu_seqlens_values` (an empty ``v`` does not)."""
    v = np.asarray(v)
    if not v.size:
        return False
    try:
        cu_seqlens_values(v, T)
    except ValueError:
        return False
    return True


# Offsets whose values passed the host check, by array: id -> (weak reference, version, T).  A later call
# on the same array, unwritten since (its framework's version counter) and with the same T, skips reading
# them back, which on a GPU is a synchronisation: the layers of a model that share one cu_seqlens pay one
# per step, not two per layer.  Frameworks without a version counter are read every call.
_offsets_checked: dict = {}
OFFSETS_CHECKED_MAX = 64


def _offsets_known(cu, fw, T):
    """The version to remember ``cu`` under after a passing check, or True where it passed unchanged; None
    (read every call) for CPU arrays, where reading costs no synchronisation and writes through NumPy views
    of a tensor (``.numpy()``, ``.data``) leave its version counter as it was."""
    version = fw.version(cu) if fw.is_gpu(cu) else None
    if version is None:
        return None
    seen = _offsets_checked.get(id(cu))
    if seen is not None and seen[0]() is cu and seen[1] == version and seen[2] == T:
        return True
    return version


def offsets_on_host(cu, fw, ref):
    """Whether an eager call on ``ref`` checks the values of its cu_seqlens ``cu`` on the host: always on the
    CPU (no synchronisation to save, and no device guard behind it); on a GPU unless
    ``config.check_cu_seqlens_values`` is off or a CUDA graph is being captured (the device guard checks
    them then)."""
    if not fw.is_gpu(cu):
        return True
    return config.check_cu_seqlens_values and not fw.capturing(ref)


def offsets_values(cu, fw, T):
    """Check the values of cu_seqlens ``cu`` for T steps on the host (ValueError), reading them back
    unless this array passed for the same T unwritten since."""
    known = _offsets_known(cu, fw, T)
    if known is True:
        return
    cu_seqlens_values(fw.index_values(cu), T)
    if known is not None:
        if len(_offsets_checked) >= OFFSETS_CHECKED_MAX:
            _offsets_checked.clear()
        _offsets_checked[id(cu)] = (weakref.ref(cu), known, T)


def _cu_seqlens(cu, fw, ref, ref_name, B, T, values):
    """(N, whether the values were checked on the host)."""
    if cu is None:
        return B, True
    _same_place(cu, "cu_seqlens", fw, ref, ref_name, values)
    N = cu_seqlens_layout(cu.shape, fw.dtype(cu), B)
    if not (values and offsets_on_host(cu, fw, ref)):
        return N, False
    offsets_values(cu, fw, T)
    return N, True


def check_forward(x, g, initial_state, cu_seqlens, output_final_state, reverse, values=True) -> Call:
    """Validate the forward's arguments.  ``values=False`` (fake tensors, tracers): no device
    comparisons and no cu_seqlens values."""
    fw = _eager_framework(x, "x", values)
    _same_place(g, "g", fw, x, "x", values)
    xd, gd = _float_dtype(x, "x", fw), _float_dtype(g, "g", fw)
    _check_btd(x, "x", fw)
    _check_btd(g, "g", fw, tuple(x.shape))
    flag(output_final_state, "output_final_state")
    flag(reverse, "reverse")
    B, T, D = (int(n) for n in x.shape)
    N, checked = _cu_seqlens(cu_seqlens, fw, x, "x", B, T, values)
    _check_state(initial_state, "initial_state", fw, x, "x", N, D, values)
    return Call(fw, B, T, D, N, (xd, gd), accumulation_dtype(xd, gd), cu_seqlens is not None, checked)


def check_backward(g, o, do, dht, initial_state, cu_seqlens, reverse, values=True) -> Call:
    """Validate the backward's arguments (as :func:`check_forward`); dtypes are (o's, g's)."""
    fw = _eager_framework(o, "o", values)
    for a, name in ((g, "g"), (do, "do")):
        _same_place(a, name, fw, o, "o", values)
    od, gd = _float_dtype(o, "o", fw), _float_dtype(g, "g", fw)
    _float_dtype(do, "do", fw)
    _check_btd(o, "o", fw)
    _check_btd(g, "g", fw, tuple(o.shape))
    _check_btd(do, "do", fw, tuple(o.shape))
    flag(reverse, "reverse")
    B, T, D = (int(n) for n in o.shape)
    N, checked = _cu_seqlens(cu_seqlens, fw, o, "o", B, T, values)
    _check_state(initial_state, "initial_state", fw, o, "o", N, D, values)
    _check_state(dht, "dht", fw, o, "o", N, D, values)
    return Call(fw, B, T, D, N, (od, gd), accumulation_dtype(od, gd), cu_seqlens is not None, checked)


def check_states(v, g, reverse, v_name):
    """Validate a state-only pass's arguments (:mod:`hgrn_cupy.states`): ``v`` (x or do) and g
    ``[B, T, D]`` of one framework (not JAX) and place, float dtypes, a bool ``reverse``.  Any channel
    stride is accepted (the pass copies what its kernels cannot read).  Returns the framework."""
    fw = _eager_framework(v, v_name, True)
    if fw is ar.JAX:
        raise TypeError(f"{v_name} must be a NumPy, CuPy or PyTorch array, got {type(v).__name__} "
                        "(JAX slices go through hgrn_cupy.distributed.jax)")
    _same_place(g, "g", fw, v, v_name, True)
    _float_dtype(v, v_name, fw)
    _float_dtype(g, "g", fw)
    _check_btd(v, v_name, fw, strides=False)
    _check_btd(g, "g", fw, tuple(v.shape), strides=False)
    flag(reverse, "reverse")
    return fw
