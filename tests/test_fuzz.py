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
"""
from typing import NamedTuple

import numpy as np
import pytest
from conftest import TOL, rel_err

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hgrn_cupy as hc  # noqa: E402

ml_dtypes = pytest.importorskip("ml_dtypes")

DTYPES = ["float32", "float16", "bfloat16", "float64"]
NP_DTYPE = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "float64": np.dtype(np.float64),
            "bfloat16": np.dtype(ml_dtypes.bfloat16)}
BTD_LAYOUTS = ["contiguous", "channel_window", "every_other_step", "time_major", "every_other_channel"]
STATE_LAYOUTS = ["contiguous", "every_other_row", "every_other_channel", "column_major"]
ENGINES = ["auto", "chunk", "fused_recurrent"]
FORWARD = {"auto": "hgrn", "chunk": "chunk_hgrn", "fused_recurrent": "fused_recurrent_hgrn"}


# ----------------------------------------------------------------------------------------------
# problems


@st.composite
def problems(draw, max_B, max_T, Ts, max_D, Ds, engines=ENGINES):
    """A problem description (plain values only, so hypothesis prints it and it replays)."""
    varlen = draw(st.booleans())
    T = draw(st.one_of(st.sampled_from(Ts), st.integers(0, max_T)))
    if varlen:
        B = 1
        cuts = draw(st.lists(st.one_of(st.integers(0, T), st.sampled_from([0, T])), max_size=6))
        cu = tuple([0] + sorted(cuts) + [T])
    else:
        B, cu = draw(st.integers(1, max_B)), None
    D = draw(st.one_of(st.sampled_from(Ds), st.integers(1, max_D)))
    btd = st.sampled_from(BTD_LAYOUTS)
    state = st.sampled_from(STATE_LAYOUTS)
    with_h0 = draw(st.booleans())
    final = draw(st.booleans())
    return dict(
        seed=draw(st.integers(0, 2**32 - 1)), B=B, T=T, D=D, cu=cu,
        cu_dtype=draw(st.sampled_from(["int32", "int64"])),
        x_dtype=draw(st.sampled_from(DTYPES)), g_dtype=draw(st.sampled_from(DTYPES)),
        h0_dtype=draw(st.sampled_from(DTYPES)) if with_h0 else None,
        dht_dtype=draw(st.sampled_from(DTYPES)) if final and draw(st.booleans()) else None,
        final=final, reverse=draw(st.booleans()),
        engine=draw(st.sampled_from(engines)), bwd_engine=draw(st.sampled_from(engines)),
        layout={"x": draw(btd), "g": draw(btd), "o": draw(btd), "do": draw(btd),
                "h0": draw(state), "dht": draw(state)},
    )


def log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def rounded(a64, dtype):
    """``a64`` rounded to ``dtype`` (ml_dtypes rounds bfloat16 to nearest even), back in float64."""
    return np.asarray(a64, np.float64).astype(NP_DTYPE[dtype]).astype(np.float64)


def acc_dtype(*dtypes):
    return "float64" if "float64" in dtypes else "float32"


def tol(dtype, acc):
    """An output in ``dtype`` computed with ``acc`` accumulation."""
    return max(TOL[dtype], TOL[acc])


def host_data(p):
    """The float64 values (already rounded to their dtypes) of every input of the problem."""
    rng = np.random.default_rng(p["seed"])
    B, T, D = p["B"], p["T"], p["D"]
    N = B if p["cu"] is None else len(p["cu"]) - 1
    return dict(
        x=rounded(rng.standard_normal((B, T, D)), p["x_dtype"]),
        g=rounded(log_sigmoid(rng.standard_normal((B, T, D))), p["g_dtype"]),
        h0=None if p["h0_dtype"] is None else rounded(rng.standard_normal((N, D)), p["h0_dtype"]),
        dht=None if p["dht_dtype"] is None else rounded(rng.standard_normal((N, D)), p["dht_dtype"]),
        do=rng.standard_normal((B, T, D)),  # rounded to o's dtype when o's dtype is known
    )


# ----------------------------------------------------------------------------------------------
# layouts: a buffer (NaN around the view) and the view the library gets


def btd_buffer_shape(layout, shape):
    B, T, D = shape
    return {"contiguous": (B, T, D), "channel_window": (B, T, D + 3), "every_other_step": (B, 2 * T, D),
            "time_major": (T, B, D), "every_other_channel": (B, T, 2 * D)}[layout]


def btd_view(layout, buf, D):
    if layout == "contiguous":
        return buf
    if layout == "channel_window":
        return buf[:, :, 1:D + 1]
    if layout == "every_other_step":
        return buf[:, ::2]
    if layout == "time_major":
        return buf.swapaxes(0, 1)
    return buf[:, :, ::2]


def state_buffer_shape(layout, shape):
    N, D = shape
    return {"contiguous": (N, D), "every_other_row": (2 * N, D), "every_other_channel": (N, 2 * D),
            "column_major": (D, N)}[layout]


def state_view(layout, buf):
    if layout == "contiguous":
        return buf
    if layout == "every_other_row":
        return buf[::2]
    if layout == "every_other_channel":
        return buf[:, ::2]
    return buf.swapaxes(0, 1)


def np_layout(values, dtype, layout, state=False):
    """A NumPy view of ``dtype`` holding ``values`` in ``layout``, inside a NaN-filled buffer."""
    shape = values.shape
    buf = np.full((state_buffer_shape if state else btd_buffer_shape)(layout, shape), np.nan, NP_DTYPE[dtype])
    view = state_view(layout, buf) if state else btd_view(layout, buf, shape[-1])
    assert view.shape == shape
    view[...] = values.astype(NP_DTYPE[dtype])
    return buf, view


def refused(layout, shape):
    """Whether the top level must refuse this [B, T, D] view (last-axis stride != 1 that matters)."""
    return layout == "every_other_channel" and shape[2] > 1 and min(shape) > 0


def describe(p):
    return f"problem {p}"


# ----------------------------------------------------------------------------------------------
# checks shared by every front end


def reference_forward(p, d):
    cu = None if p["cu"] is None else np.asarray(p["cu"], np.int64)
    return hc.naive_recurrent_hgrn(d["x"], d["g"], d["h0"], True, cu, p["reverse"])


def reference_backward(p, d, o64, do64):
    cu = None if p["cu"] is None else np.asarray(p["cu"], np.int64)
    return hc.naive_recurrent_hgrn_bwd(d["g"], o64, do64, d["dht"], d["h0"], cu, p["reverse"])


def check(name, out, want, dtype, acc, p, host, dtype_of):
    assert out is not None, f"{name} is None; {describe(p)}"
    assert dtype_of(out) == dtype, f"{name} has dtype {dtype_of(out)}, expected {dtype}; {describe(p)}"
    got = host(out)
    assert got.shape == want.shape, f"{name} has shape {got.shape}, expected {want.shape}; {describe(p)}"
    err = rel_err(got, want)
    assert err <= tol(dtype, acc), f"{name}: relative error {err:.3g} > {tol(dtype, acc):g}; {describe(p)}"


# ----------------------------------------------------------------------------------------------
# the top-level functions, on any framework


class Framework(NamedTuple):
    layout: object  # (float64 values, dtype, layout, state=False) -> (buffer, view)
    host: object  # array -> float64 NumPy copy (and a check of the array's type)
    dtype_of: object  # array -> dtype name
    index: object  # (offsets, int dtype name) -> array
    sync: object


def np_dtype_name(a):
    return "bfloat16" if a.dtype == NP_DTYPE["bfloat16"] else a.dtype.name


def np_host(a):
    assert type(a) is np.ndarray, type(a)
    return a.astype(np.float64)


NUMPY = Framework(np_layout, np_host, np_dtype_name, np.asarray, lambda: None)


def _error_names(p, names):
    bad = [n for n in names if refused(p["layout"][n], (p["B"], p["T"], p["D"]))]
    return bad, rf"^({'|'.join(bad)})\b"


def run_top_level(p, fw):
    """Forward with p's engine, backward from the library's o with p's backward engine, each against the
    reference; views the top level must refuse are checked to be refused."""
    d, L, host = host_data(p), p["layout"], fw.host
    acc = acc_dtype(p["x_dtype"], p["g_dtype"])

    def chk(name, out, want, dtype):
        check(name, out, want, dtype, acc, p, host, fw.dtype_of)
    _, x = fw.layout(d["x"], p["x_dtype"], L["x"])
    _, g = fw.layout(d["g"], p["g_dtype"], L["g"])
    h0 = None if d["h0"] is None else fw.layout(d["h0"], p["h0_dtype"], L["h0"], state=True)[1]
    cu = None if p["cu"] is None else fw.index(np.asarray(p["cu"], p["cu_dtype"]))
    inputs = [a for a in (x, g, h0) if a is not None]
    before = [host(a) for a in inputs]

    bad, pattern = _error_names(p, ("x", "g"))
    forward = getattr(hc, FORWARD[p["engine"]])
    if bad:
        with pytest.raises(ValueError, match=pattern):
            forward(x, g, h0, p["final"], cu, p["reverse"])
        return
    o, ht = forward(x, g, h0, p["final"], cu, p["reverse"])
    fw.sync()
    o_ref, ht_ref = reference_forward(p, d)
    chk("o", o, o_ref, p["x_dtype"])
    if p["final"]:
        chk("ht", ht, ht_ref, acc)
    else:
        assert ht is None, describe(p)

    o64, do64 = host(o), rounded(d["do"], p["x_dtype"])
    _, o_in = fw.layout(o64, p["x_dtype"], L["o"])
    _, do = fw.layout(do64, p["x_dtype"], L["do"])
    dht = None if d["dht"] is None else fw.layout(d["dht"], p["dht_dtype"], L["dht"], state=True)[1]
    inputs += [a for a in (o_in, do, dht) if a is not None]
    before += [host(a) for a in (o_in, do, dht) if a is not None]
    bad, pattern = _error_names(p, ("o", "do"))
    args = (g, o_in, do, dht, h0, cu, p["reverse"])
    if bad:
        with pytest.raises(ValueError, match=pattern):
            hc.hgrn_backward(*args, engine=p["bwd_engine"])
        return
    dx, dg, dh0 = hc.hgrn_backward(*args, engine=p["bwd_engine"])
    fw.sync()
    dx_ref, dg_ref, dh0_ref = reference_backward(p, d, o64, do64)
    chk("dx", dx, dx_ref, p["x_dtype"])
    chk("dg", dg, dg_ref, p["g_dtype"])
    if h0 is None:
        assert dh0 is None, describe(p)
    else:
        chk("dh0", dh0, dh0_ref, p["h0_dtype"])
    for a, b in zip(inputs, before):
        assert np.array_equal(host(a), b, equal_nan=True), f"an input was modified; {describe(p)}"


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

