"""The cases of the bad-input tests (test_bad_input) and the front ends they run on.

Here: the fixed valid inputs (``base_inputs``, seeded by ``SEED``; ``CU`` the valid offsets), the front ends
(``FRONT_ENDS``: how to make each framework's arrays and how to call it; ``fe_params`` their pytest
parameters, ``cupy`` marked ``gpu``), ``make_args`` and ``call``, the table of bad cases (``CASE``: id ->
(varlen, change of the valid arguments, error, pattern); ``BAD_OFFSETS`` the invalid offset values), and
``snapshot``/``assert_unmodified``, which prove that a call left its inputs alone.
"""
import copy
import re
from typing import NamedTuple

import numpy as np
import pytest
from conftest import to_numpy

import hgrn_cupy as hc

SEED = 20240611
B, T, D = 2, 12, 5
CU = (0, 4, 4, 12)  # varlen: B = 1, T = 12, N = 3, the second sequence empty
N_VARLEN = len(CU) - 1


def arg(name):
    """The anchored pattern of an error about argument ``name``."""
    return rf"^{re.escape(name)}\b"


def log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def base_inputs(varlen):
    """float32 (x, g, h0, cu) as NumPy arrays; x random normal, g = log(sigmoid(normal))."""
    rng = np.random.default_rng(SEED + varlen)
    shape = (1, T, D) if varlen else (B, T, D)
    n = N_VARLEN if varlen else B
    x = rng.standard_normal(shape).astype(np.float32)
    g = log_sigmoid(rng.standard_normal(shape)).astype(np.float32)
    h0 = rng.standard_normal((n, D)).astype(np.float32)
    cu = np.asarray(CU, np.int64) if varlen else None
    return x, g, h0, cu


# ----------------------------------------------------------------------------------------------
# front ends: how to make an array of the framework, and how to call


def _cupy(a):
    import cupy

    return cupy.asarray(a)


def _torch(a):
    import torch

    return torch.from_numpy(np.array(a))


def _jax(a):
    import jax

    return jax.device_put(np.array(a), jax.devices("cpu")[0])


def _call_top(x, g, h0, output_final_state, cu, reverse):
    return hc.hgrn(x, g, h0, output_final_state, cu, reverse)


def _call_torch_autograd(x, g, h0, output_final_state, cu, reverse):
    """``hgrn_cupy.torch.hgrn`` with the floating tensors requiring gradients (views of the originals, so
    that a write into them would show)."""
    import torch

    import hgrn_cupy.torch as htorch

    def leaf(a):
        return a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
    return htorch.hgrn(leaf(x), leaf(g), leaf(h0), output_final_state, cu, reverse)


def _call_jax(x, g, h0, output_final_state, cu, reverse):
    import hgrn_cupy.jax as hj

    return hj.hgrn(x, g, h0, output_final_state, cu, reverse)


def _call_jax_jit(x, g, h0, output_final_state, cu, reverse):
    """Inside ``jax.jit``: the JAX arrays are traced arguments; everything else (a list, an array of another
    framework, None, the flags) is closed over, so that it reaches the library as the caller wrote it."""
    import jax

    import hgrn_cupy.jax as hj

    given = (x, g, h0, cu)
    traced = [i for i, a in enumerate(given) if isinstance(a, jax.Array)]

    def f(*arrays):
        a = list(given)
        for i, v in zip(traced, arrays):
            a[i] = v
        return hj.hgrn(a[0], a[1], a[2], output_final_state, a[3], reverse)
    return jax.jit(f)(*(given[i] for i in traced))


class FrontEnd(NamedTuple):
    name: str
    module: str  # what it needs installed
    native: object  # NumPy array -> this framework's array
    foreign: object  # NumPy array -> another framework's array (torch; NumPy for the torch front ends)
    call: object  # (x, g, initial_state, output_final_state, cu_seqlens, reverse) -> (o, ht)
    jit: bool = False


FRONT_ENDS = {fe.name: fe for fe in (
    FrontEnd("numpy", "numpy", np.array, _torch, _call_top),
    FrontEnd("cupy", "cupy", _cupy, _torch, _call_top),
    FrontEnd("torch", "torch", _torch, np.array, _call_top),
    FrontEnd("torch_autograd", "torch", _torch, np.array, _call_torch_autograd),
    FrontEnd("jax", "jax", _jax, _torch, _call_jax),
    FrontEnd("jax_jit", "jax", _jax, _torch, _call_jax_jit, jit=True),
)}


def fe_params(names=tuple(FRONT_ENDS)):
    return [pytest.param(n, id=n, marks=[pytest.mark.gpu] if n == "cupy" else []) for n in names]


class Foreign(NamedTuple):
    """In a change: this array, made in another framework than the front end's."""
    array: np.ndarray


def make_args(fe, varlen, change=None):
    """The valid float32 arguments, with ``change`` (NumPy arrays and plain values) applied, as the front
    end's arrays."""
    x, g, h0, cu = base_inputs(varlen)
    args = dict(x=x, g=g, initial_state=h0, output_final_state=True, cu_seqlens=cu, reverse=False)
    args.update(change(args) if change else {})
    convert = {np.ndarray: fe.native, Foreign: lambda f: fe.foreign(f.array)}
    return {k: convert.get(type(v), lambda v: v)(v) for k, v in args.items()}


def call(fe, args):
    return fe.call(args["x"], args["g"], args["initial_state"], args["output_final_state"], args["cu_seqlens"],
                   args["reverse"])


# ----------------------------------------------------------------------------------------------
# the table: id -> (varlen, change of the valid arguments, error, pattern); the cases with invalid
# offset values (the keys of BAD_OFFSETS) give all-NaN outputs under jit instead

BAD_OFFSETS = {  # all of length N + 1 = 4 with T = 12
    "cu_start_1": (1, 4, 4, 12),
    "cu_start_negative": (-3, 4, 4, 12),
    "cu_decreasing": (0, 8, 4, 12),
    "cu_past_T": (0, 4, 4, 15),
    "cu_inner_past_T": (0, 4, 40, 12),
    "cu_short_of_T": (0, 4, 4, 11),
}


def _offsets(values):
    return lambda a: {"cu_seqlens": np.asarray(values, np.int64)}


CASE = {
    "x_list": (False, lambda a: {"x": a["x"].tolist()}, TypeError, arg("x")),
    "g_list": (False, lambda a: {"g": a["g"].tolist()}, TypeError, arg("g")),
    "g_shape_mismatch": (False, lambda a: {"g": a["g"][:, :-1].copy()}, ValueError, arg("g")),
    "x_int32": (False, lambda a: {"x": a["x"].astype(np.int32)}, TypeError, arg("x")),
    "g_int64": (False, lambda a: {"g": a["g"].astype(np.int64)}, TypeError, arg("g")),
    "x_2d": (False, lambda a: {"x": a["x"][0], "g": a["g"][0]}, ValueError, arg("x")),
    "x_4d": (False, lambda a: {"x": a["x"][None], "g": a["g"][None]}, ValueError, arg("x")),
    "initial_state_rows": (False, lambda a: {"initial_state": a["initial_state"][:-1]}, ValueError,
                           arg("initial_state")),
    "initial_state_channels": (False, lambda a: {"initial_state": a["initial_state"][:, :-1].copy()}, ValueError,
                               arg("initial_state")),
    "initial_state_rank3": (False, lambda a: {"initial_state": a["initial_state"][None]}, ValueError,
                            arg("initial_state")),
    "initial_state_rows_varlen": (True, lambda a: {"initial_state": a["initial_state"][:-1]}, ValueError,
                                  arg("initial_state")),
    "cu_batch2": (False, lambda a: {"cu_seqlens": np.asarray((0, 5, T)), "initial_state": None}, ValueError,
                  arg("cu_seqlens")),
    "cu_float": (True, lambda a: {"cu_seqlens": a["cu_seqlens"].astype(np.float32)}, TypeError, arg("cu_seqlens")),
    "cu_uint8": (True, lambda a: {"cu_seqlens": a["cu_seqlens"].astype(np.uint8)}, TypeError, arg("cu_seqlens")),
    "cu_2d": (True, lambda a: {"cu_seqlens": a["cu_seqlens"][None]}, ValueError, arg("cu_seqlens")),
    **{name: (True, _offsets(v), ValueError, arg("cu_seqlens")) for name, v in BAD_OFFSETS.items()},
    "output_final_state_str": (False, lambda a: {"output_final_state": "no"}, TypeError, arg("output_final_state")),
    "output_final_state_int": (False, lambda a: {"output_final_state": 1}, TypeError, arg("output_final_state")),
    "reverse_int": (False, lambda a: {"reverse": 1}, TypeError, arg("reverse")),
    "reverse_str": (False, lambda a: {"reverse": "yes"}, TypeError, arg("reverse")),
    "reverse_none": (False, lambda a: {"reverse": None}, TypeError, arg("reverse")),
    "g_other_framework": (False, lambda a: {"g": Foreign(a["g"])}, TypeError, arg("g")),
}


def snapshot(args):
    """Exact copies of every input (arrays as float64 NumPy copies, lists deep-copied)."""
    out = {}
    for k, v in args.items():
        if isinstance(v, list):
            out[k] = copy.deepcopy(v)
        elif hasattr(v, "shape"):
            out[k] = np.array(to_numpy(v))
        else:
            out[k] = v
    return out


def assert_unmodified(args, snap):
    for k, v in args.items():
        if isinstance(v, list):
            assert v == snap[k], f"{k} (a list) was modified"
        elif hasattr(v, "shape"):
            assert np.array_equal(to_numpy(v), snap[k], equal_nan=True), f"{k} was modified"
