"""``hgrn_cupy.torch`` on the CPU: the surface, values and gradients, and the eager path.

fla's signatures and the registered ops; values and gradients of every function against the float64
NumPy reference (every dtype, dense and varlen, both directions), mixed dtypes, optional outputs,
strided inputs, empty time and argument errors; the eager shortcut and the lean autograd.Function
agreeing with the op, and the top-level ``hgrn_cupy`` functions on tensors that require grad.
Inputs are fresh random numbers each run (the seed is printed).
"""
import inspect
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, TOL, rel_err, to_numpy

torch = pytest.importorskip("torch")
import hgrn_cupy as hc  # noqa: E402
import hgrn_cupy.torch as htorch  # noqa: E402
from torch_helpers import FUNCTIONS, LAYOUTS, REVERSE, leaf, make_inputs, reference, run_and_check  # noqa: E402
from torch_helpers import gen  # noqa: E402, F401  (a fixture)

F = torch.nn.functional
DTYPES = ["float32", "float16", "bfloat16", "float64"]


# ----------------------------------------------------------------------------------------------
# the surface

def test_signatures_match_fla():
    expected = [("x", inspect.Parameter.empty), ("g", inspect.Parameter.empty), ("initial_state", None),
                ("output_final_state", False), ("cu_seqlens", None), ("reverse", False)]
    for fn in FUNCTIONS.values():
        params = inspect.signature(fn).parameters.values()
        assert [(p.name, p.default) for p in params] == expected, fn.__name__


def test_importing_hgrn_cupy_does_not_import_torch():
    code = "import sys, hgrn_cupy; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_ops_are_registered():
    assert hasattr(torch.ops.hgrn_cupy, "fwd") and hasattr(torch.ops.hgrn_cupy, "bwd")
    schema = str(torch.ops.hgrn_cupy.fwd.default._schema)
    assert "Tensor? initial_state" in schema and "str engine" in schema and "bool reverse" in schema


# ----------------------------------------------------------------------------------------------
# values and gradients on the CPU

@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_values_and_grads_cpu(name, dtype, kind, reverse, gen):
    x, g, h0, cu = make_inputs(gen, kind, dtype)
    run_and_check(FUNCTIONS[name], x, g, h0, cu, reverse, gen)


def test_mixed_dtypes_cpu(gen):
    """o in x's dtype, gradients in each input's dtype, states in float32 unless float64 is in."""
    x, _, _, _ = make_inputs(gen, "dense", "bfloat16")
    _, g, h0, _ = make_inputs(gen, "dense", "float32", state_dtype="float16")
    run_and_check(htorch.hgrn, x, g, h0, None, False, gen)
    x64 = x.double()
    _, ht = htorch.hgrn(x64, g, h0, True)
    assert ht.dtype == torch.float64


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no_h0"])
def test_optional_outputs(with_h0, gen):
    """ht is None unless asked for; gradients flow from o alone, or from ht alone."""
    x, g, h0, _ = make_inputs(gen, "dense", "float64", size="short")
    x, g, h0 = leaf(x), leaf(g), leaf(h0) if with_h0 else None
    o, ht = htorch.hgrn(x, g, h0)
    assert ht is None
    o.sum().backward()  # an expanded (stride 0) gradient: read after one copy
    dh0 = None if h0 is None else h0.grad
    ref = reference(x, g, h0, None, False, o, torch.ones_like(o), None)
    assert rel_err(x.grad, ref["dx"]) <= TOL["float64"] and rel_err(g.grad, ref["dg"]) <= TOL["float64"]
    if with_h0:
        assert rel_err(dh0, ref["dh0"]) <= TOL["float64"]

    for a in (x, g, h0):
        if a is not None:
            a.grad = None
    _, ht = htorch.hgrn(x, g, h0, output_final_state=True)
    dht = torch.randn(ht.shape, generator=gen, dtype=ht.dtype)
    ht.backward(dht)
    o = htorch.hgrn(x, g, h0)[0].detach()
    ref = reference(x, g, h0, None, False, o, torch.zeros_like(o), dht)
    assert rel_err(x.grad, ref["dx"]) <= TOL["float64"] and rel_err(g.grad, ref["dg"]) <= TOL["float64"]


def test_strided_inputs(gen):
    """Views from a projection (batch and time strides of 2 * D) give the reference, and their gradients
    reach the projection; a time-major transpose (channel stride != 1) is copied and gives it too."""
    B, T, D = 2, 13, 6
    proj = torch.randn(B, T, 2 * D, generator=gen, dtype=torch.float64, requires_grad=True)
    a, b = proj.chunk(2, -1)
    o, _ = htorch.hgrn(a, F.logsigmoid(b))
    xt = torch.randn(B, D, T, generator=gen, dtype=torch.float64).transpose(1, 2)  # stride(2) != 1
    gt = F.logsigmoid(torch.randn(B, D, T, generator=gen, dtype=torch.float64)).transpose(1, 2)
    o2, _ = htorch.hgrn(xt, gt)
    ref2, _ = hc.naive_recurrent_hgrn(to_numpy(xt), to_numpy(gt))
    assert rel_err(o2, ref2) <= TOL["float64"]
    ref, _ = hc.naive_recurrent_hgrn(to_numpy(a), to_numpy(F.logsigmoid(b)))
    assert rel_err(o, ref) <= TOL["float64"]
    o.sum().backward()
    dx, dg, _ = hc.naive_recurrent_hgrn_bwd(to_numpy(F.logsigmoid(b)), to_numpy(o), np.ones(o.shape))
    want = np.concatenate([dx, dg * to_numpy(torch.sigmoid(-b))], -1)  # d logsigmoid(b) / db = sigmoid(-b)
    assert rel_err(proj.grad, want) <= TOL["float64"]


def test_eager_shortcut_matches_op(gen):
    """Calls with nothing to record skip the dispatcher; they must agree with the op exactly."""
    x, g, h0, cu = make_inputs(gen, "varlen", "float32")
    with torch.no_grad():
        fast = htorch.hgrn(x, g, h0, True, cu)
    op = torch.ops.hgrn_cupy.fwd.default(x, g, h0, cu, True, False, "auto")
    for a, b in zip(fast, op):
        assert torch.equal(a, b)
    o, ht = htorch.hgrn(x, g, None, False, cu)
    assert ht is None and o.shape == x.shape


def test_inputs_not_modified_and_outputs_fresh(gen):
    x, g, h0, _ = make_inputs(gen, "dense", "float32")
    before = [a.clone() for a in (x, g, h0)]
    for grad in (False, True):
        xs, gs, hs = (leaf(a) if grad else a for a in (x, g, h0))
        o, ht = htorch.hgrn(xs, gs, hs, True)
        for a, b in zip((x, g, h0), before):
            assert torch.equal(a, b)
        for out in (o, ht):
            assert all(out.data_ptr() != a.data_ptr() for a in (x, g, h0))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_empty_time(grad, gen):
    """T = 0: o is empty, ht equals h0 but is a fresh tensor (custom ops may not alias inputs),
    and h0's gradient is dht."""
    x = torch.randn(2, 0, 4, dtype=torch.float64)
    g = torch.randn(2, 0, 4, dtype=torch.float64)
    h0 = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    if grad:
        x, g, h0 = leaf(x), leaf(g), leaf(h0)
    o, ht = htorch.hgrn(x, g, h0, True)
    assert o.shape == (2, 0, 4) and torch.equal(ht, h0) and ht.data_ptr() != h0.data_ptr()
    if grad:
        dht = torch.randn(2, 4, generator=gen, dtype=torch.float64)
        ht.backward(dht)
        assert torch.equal(h0.grad, dht)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_bad_arguments_are_named(grad, gen):
    x, g, h0, _ = make_inputs(gen, "dense", "float32")
    if grad:
        x = leaf(x)
    with pytest.raises(ValueError, match="g"):
        htorch.hgrn(x, g[:, :-1], h0)
    with pytest.raises(ValueError, match="initial_state"):
        htorch.hgrn(x, g, h0[:-1])
    with pytest.raises(ValueError, match="cu_seqlens"):
        htorch.hgrn(x[:1], g[:1], None, False, torch.tensor([0, 5, 3, x.shape[1]]))


def test_no_double_backward(gen):
    x, g, h0, _ = make_inputs(gen, "dense", "float64", size="short")
    x, g = leaf(x), leaf(g)
    o, _ = htorch.hgrn(x, g, h0)
    (dx,) = torch.autograd.grad(o.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        dx.sum().backward()


# ----------------------------------------------------------------------------------------------
# the eager path and the top-level functions on tensors that require grad

def _grad_fn_name(t):
    return type(t.grad_fn).__name__


def test_eager_calls_take_the_autograd_function_and_compiled_ones_the_op(gen):
    """Plain eager tensors record the lean autograd.Function; the same values and gradients as the op."""
    x, g, h0, cu = make_inputs(gen, "varlen", "float32")
    do = torch.randn(x.shape, generator=gen)
    xs, gs, hs = leaf(x), leaf(g), leaf(h0)
    o, ht = htorch.hgrn(xs, gs, hs, True, cu)
    assert _grad_fn_name(o) == "_EagerBackward"
    grads = torch.autograd.grad((o * do).sum() + ht.sum(), (xs, gs, hs))
    xo, go, ho = leaf(x), leaf(g), leaf(h0)
    o2, ht2 = htorch._fwd_op(xo, go, ho, cu, True, False, "auto")
    assert "Eager" not in _grad_fn_name(o2)
    grads2 = torch.autograd.grad((o2 * do).sum() + ht2.sum(), (xo, go, ho))
    assert torch.equal(o, o2) and torch.equal(ht, ht2)
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_top_level_on_tensors_that_require_grad_is_differentiable(kind, gen):
    """hgrn_cupy.hgrn on tensors that require grad: same result type, and gradients flow as through
    hgrn_cupy.torch; without grad mode, no graph."""
    x, g, h0, cu = make_inputs(gen, kind, "float64")
    xs, gs, hs = leaf(x), leaf(g), leaf(h0)
    o, ht = hc.hgrn(xs, gs, hs, True, cu)
    assert isinstance(o, torch.Tensor) and o.requires_grad and ht.requires_grad
    do = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((o * do).sum() + ht.sum(), (xs, gs, hs))
    xr, gr, hr = leaf(x), leaf(g), leaf(h0)
    o2, ht2 = htorch.hgrn(xr, gr, hr, True, cu)
    want = torch.autograd.grad((o2 * do).sum() + ht2.sum(), (xr, gr, hr))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with torch.no_grad():
        o3, _ = hc.hgrn(xs, gs, hs, True, cu)
    assert not o3.requires_grad and torch.equal(o3, o.detach())


def test_top_level_backward_refuses_tensors_that_require_grad(gen):
    x, g, h0, _ = make_inputs(gen, "dense", "float32")
    o, _ = hc.hgrn(x, g)
    with pytest.raises(RuntimeError, match=r"^hgrn_backward is not differentiable"):
        hc.hgrn_backward(leaf(g), o, torch.ones_like(o))
    with torch.no_grad():
        dx, dg, _ = hc.hgrn_backward(leaf(g), o, torch.ones_like(o))
    assert dx.shape == o.shape and not dx.requires_grad


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_wrapper_argument_types(grad, gen):
    """The torch wrappers raise the library's errors, naming the argument, on every path."""
    x, g, _, _ = make_inputs(gen, "dense", "float32")
    if grad:
        x = leaf(x)
    with pytest.raises(TypeError, match=r"^x must be"):
        htorch.hgrn([[[1.0]]], g)
    with pytest.raises(TypeError, match=r"^g must be"):
        htorch.hgrn(x, g.numpy())
    with pytest.raises(TypeError, match=r"^output_final_state must be a bool"):
        htorch.hgrn(x, g, None, "no")
    with pytest.raises(TypeError, match=r"^reverse must be a bool"):
        htorch.hgrn(x, g, None, False, None, 1)
