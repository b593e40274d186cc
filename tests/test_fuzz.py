"""Property-based tests (hypothesis): random shapes, dtypes, layouts, packings and flags, forward and
backward, against the float64 NumPy reference (``hgrn_cupy.naive``) at the tolerances of conftest.

Drawn: B (1-3), T (0, 1, small, up to 300 on the CPU and 5000 on the GPU), D (1-70, odd counts included;
more on the GPU), the dtypes of x, g, the initial state and dht independently, views (a window of a wider
buffer's channels, every other time step, time-major storage seen through a transpose, and every other
channel), varlen packing from random cut points (repeats make empty sequences, at either end too),
reverse, initial_state on/off, output_final_state on/off, dht on/off, the engine.  Buffers around the views
hold NaN, so a read outside a view shows in the result.  Inputs: x standard normal, g = log(sigmoid(normal))
(in (-inf, 0), never 0), h0 and dht standard normal, all rounded to their dtypes before the reference sees
them.  Every example draws its own data seed, printed in the assertion messages with the whole problem.

The top-level functions need the last axis of x, g, o and do to have stride 1 (the rule of the checks);
every-other-channel views there must be refused with a ValueError naming the argument.  The torch
wrappers (``hgrn_cupy.torch``) copy such views and must compute with them.

CPU part: the NumPy front end, a few fixed examples (EXAMPLES) then 60 derandomized ones (fast,
reproducible).  GPU part (``gpu``): CuPy and
torch (the top-level functions with both engines and ``hgrn_backward(engine=...)``, and the torch autograd
wrappers), outputs NaN-poisoned before the kernels run (fixture ``poison``), 150 examples each.

The strategy, the inputs, the layouts and the top-level run live in ``fuzz_problems``; this module holds
the tests and the CuPy and torch front ends.
"""
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hgrn_cupy as hc  # noqa: E402

ml_dtypes = pytest.importorskip("ml_dtypes")
from fuzz_problems import (  # noqa: E402
    FORWARD, NP_DTYPE, NUMPY, Framework, acc_dtype, btd_view, check, host_data, np_dtype_name, np_layout,
    problems, reference_forward, rounded, run_top_level, state_view)


# ----------------------------------------------------------------------------------------------
# CPU: the NumPy front end


CPU_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=True)


def _problem(**kw):
    p = dict(seed=1234, B=1, T=40, D=3, cu=None, cu_dtype="int64", x_dtype="float32", g_dtype="float32",
             h0_dtype=None, dht_dtype=None, final=True, reverse=False, engine="auto", bwd_engine="auto",
             layout=dict(x="contiguous", g="contiguous", o="contiguous", do="contiguous", h0="contiguous",
                         dht="contiguous"))
    p.update(kw)
    return p


# Combinations worth running every time, before the drawn ones.
EXAMPLES = [
    _problem(seed=1, B=2, T=70, D=33, h0_dtype="float64", dht_dtype="float16",  # ht stays float32
             layout=dict(x="time_major", g="channel_window", o="every_other_step", do="contiguous",
                         h0="column_major", dht="every_other_row")),
    _problem(seed=2, T=40, D=5, cu=(0, 0, 5, 5, 40, 40), x_dtype="bfloat16", g_dtype="float16",
             h0_dtype="bfloat16", dht_dtype="float32", reverse=True, cu_dtype="int32"),
    _problem(seed=3, B=3, T=0, D=7, h0_dtype="float32", dht_dtype="float32"),
    _problem(seed=4, T=1, D=1, x_dtype="float16", g_dtype="float64", h0_dtype="float16", reverse=True),
]


def _with_examples(test):
    for p in reversed(EXAMPLES):
        test = example(p=p)(test)
    return test


@CPU_SETTINGS
@_with_examples
@given(p=problems(max_B=3, max_T=300, Ts=[0, 1, 2, 3, 63, 64, 65], max_D=70, Ds=[1, 2, 3, 31, 32, 33, 69, 70]))
def test_fuzz_numpy(p):
    run_top_level(p, NUMPY)


# ----------------------------------------------------------------------------------------------
# GPU: CuPy and torch


def cupy_layout(values, dtype, layout, state=False):
    """A CuPy view like :func:`np_layout` (the buffer built on the host, copied whole, then viewed)."""
    import cupy

    buf, _ = np_layout(values, dtype, layout, state)
    if dtype == "bfloat16":
        dev = cupy.asarray(buf.view(np.uint16)).view(ml_dtypes.bfloat16)
    else:
        dev = cupy.asarray(buf)
    view = state_view(layout, dev) if state else btd_view(layout, dev, values.shape[-1])
    return dev, view


def torch_layout(values, dtype, layout, state=False, requires_grad=False):
    import torch

    buf, _ = np_layout(values, dtype, layout, state)
    if dtype == "bfloat16":
        dev = torch.from_numpy(buf.view(np.int16)).cuda().view(torch.bfloat16).clone()
    else:
        dev = torch.from_numpy(buf).cuda()
    if requires_grad:
        dev.requires_grad_()
    view = state_view(layout, dev) if state else btd_view(layout, dev, values.shape[-1])
    return dev, view


def cupy_host(a):
    import cupy

    assert isinstance(a, cupy.ndarray), type(a)
    if a.dtype == NP_DTYPE["bfloat16"]:
        return cupy.ascontiguousarray(a.view(cupy.uint16)).get().view(ml_dtypes.bfloat16).astype(np.float64)
    return a.get().astype(np.float64)


def torch_host(a):
    import torch

    assert isinstance(a, torch.Tensor) and a.is_cuda, type(a)
    return a.detach().to("cpu", torch.float64).numpy()


def cupy_framework():
    import cupy

    return Framework(cupy_layout, cupy_host, np_dtype_name, cupy.asarray,
                     lambda: cupy.cuda.get_current_stream().synchronize())


def torch_framework():
    import torch

    return Framework(torch_layout, torch_host, lambda a: str(a.dtype).replace("torch.", ""),
                     lambda a: torch.from_numpy(a).cuda(), torch.cuda.synchronize)


def run_torch_autograd(p):
    """The torch wrappers (``hgrn_cupy.torch``) with autograd: every layout is accepted (copied where the
    last axis is strided); gradients are read through the same views of the buffers' gradients."""
    import torch

    import hgrn_cupy.torch as htorch

    d, L, fw = host_data(p), p["layout"], torch_framework()
    acc = acc_dtype(p["x_dtype"], p["g_dtype"])

    def chk(name, out, want, dtype):
        check(name, out, want, dtype, acc, p, fw.host, fw.dtype_of)
    xb, x = torch_layout(d["x"], p["x_dtype"], L["x"], requires_grad=True)
    gb, g = torch_layout(d["g"], p["g_dtype"], L["g"], requires_grad=True)
    h0b, h0 = (None, None) if d["h0"] is None else torch_layout(d["h0"], p["h0_dtype"], L["h0"], True, True)
    cu = None if p["cu"] is None else fw.index(np.asarray(p["cu"], p["cu_dtype"]))
    o, ht = getattr(htorch, FORWARD[p["engine"]])(x, g, h0, p["final"], cu, p["reverse"])
    o_ref, ht_ref = reference_forward(p, d)
    chk("o", o, o_ref, p["x_dtype"])
    if p["final"]:
        chk("ht", ht, ht_ref, acc)
    do64 = rounded(d["do"], p["x_dtype"])
    outs, cots, dht64 = [o], [torch.from_numpy(do64).to("cuda", o.dtype)], None
    if p["final"]:  # dht as drawn, or zeros; it reaches the kernels in the accumulation dtype
        dht64 = rounded(d["dht"] if d["dht"] is not None else np.zeros(ht_ref.shape), acc)
        outs.append(ht)
        cots.append(torch.from_numpy(dht64).to("cuda", ht.dtype))
    torch.autograd.backward(outs, cots)
    fw.sync()
    cu64 = None if p["cu"] is None else np.asarray(p["cu"], np.int64)
    dx_ref, dg_ref, dh0_ref = hc.naive_recurrent_hgrn_bwd(d["g"], fw.host(o), do64, dht64, d["h0"], cu64,
                                                          p["reverse"])

    def grad(buf, layout, state=False):
        gr = buf.grad if buf.grad is not None else torch.zeros_like(buf)
        return state_view(layout, gr) if state else btd_view(layout, gr, p["D"])
    chk("dx", grad(xb, L["x"]), dx_ref, p["x_dtype"])
    chk("dg", grad(gb, L["g"]), dg_ref, p["g_dtype"])
    if h0b is not None:
        chk("dh0", grad(h0b, L["h0"], True), dh0_ref, p["h0_dtype"])


GPU_SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None, print_blob=True,
                        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
GPU_PROBLEMS = problems(max_B=3, max_T=5000, Ts=[0, 1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1024, 4099],
                        max_D=600, Ds=[1, 2, 3, 7, 31, 32, 33, 127, 128, 129, 255, 256, 257, 511])


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
@GPU_SETTINGS
@given(p=GPU_PROBLEMS)
def test_fuzz_cupy(p):
    pytest.importorskip("cupy")
    run_top_level(p, cupy_framework())


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
@GPU_SETTINGS
@given(p=GPU_PROBLEMS, autograd=st.booleans())
def test_fuzz_torch(p, autograd):
    pytest.importorskip("torch")
    if autograd:
        run_torch_autograd(p)
    else:
        run_top_level(p, torch_framework())

