"""The problems of the property-based tests (test_fuzz) and the top-level run that checks one.

Here: the hypothesis strategy ``problems`` (plain values only, so a failing problem prints and replays),
the float64 inputs of a problem (``host_data``, rounded to their dtypes), the layouts (a NaN-filled buffer
and the view the library gets; ``refused`` says which views the top level must refuse), the comparison of
one output with the float64 reference (``check``), and ``run_top_level``: forward and backward through the
top-level functions on any framework described by a ``Framework`` (``NUMPY`` for NumPy).
"""
from typing import NamedTuple

import numpy as np
import pytest
from conftest import TOL, rel_err

hypothesis = pytest.importorskip("hypothesis")
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
