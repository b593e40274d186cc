"""``hgrn_cupy.torch``: the differentiable functions and their two custom ops.

CPU (runs everywhere): values and gradients against the float64 NumPy reference, gradcheck in
float64 (initial state, final-state gradient, reverse, varlen), ``torch.library.opcheck``,
``torch.compile(fullgraph=True)``, fla's signatures, and the eager shortcut agreeing with the op.
GPU-marked: both engines on CUDA tensors, gradcheck on the GPU, CUDA graph capture and replay,
and a non-default stream.  Inputs are fresh random numbers each run (the seed is printed).
"""
import inspect
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import TOL, rel_err, to_numpy

torch = pytest.importorskip("torch")
import hgrn_cupy as hc  # noqa: E402
import hgrn_cupy.torch as htorch  # noqa: E402

F = torch.nn.functional
FUNCTIONS = {"hgrn": htorch.hgrn, "chunk": htorch.chunk_hgrn, "fused_recurrent": htorch.fused_recurrent_hgrn}
GPU_ENGINES = ["chunk", "fused_recurrent"]
DTYPES = ["float32", "float16", "bfloat16", "float64"]
REVERSE = [pytest.param(False, id="forward"), pytest.param(True, id="reverse")]
LAYOUTS = ["dense", "varlen"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def gen():
    """A torch generator with a fresh seed, printed so that a failing draw can be replayed."""
    seed = int(np.random.SeedSequence().generate_state(1)[0])
    print(f"torch seed: {seed}")
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# helpers

LAYOUT = {  # (B, T, D, cu_seqlens offsets or None); each varlen layout holds an empty sequence
    ("dense", "short"): (2, 9, 5, None),
    ("varlen", "short"): (1, 9, 4, (0, 3, 3, 9)),
    ("dense", "medium"): (3, 37, 19, None),
    ("varlen", "medium"): (1, 53, 19, (0, 11, 11, 40, 53)),
    ("dense", "long"): (2, 700, 67, None),  # several chunks; odd channel count
    ("varlen", "long"): (1, 700, 67, (0, 100, 100, 457, 700)),
}


def make_inputs(gen, kind, dtype, device="cpu", state_dtype=None, size="medium"):
    """x = randn, g = logsigmoid(randn) (never zeros), h0 = randn; cu_seqlens as int64 (int32 on
    the GPU, to cover both).  Drawn on the CPU with ``gen``, then moved."""
    B, T, D, offsets = LAYOUT[kind, size]
    dt = getattr(torch, dtype)
    N = B if offsets is None else len(offsets) - 1
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64).to(device, dt)
    g = F.logsigmoid(torch.randn(B, T, D, generator=gen, dtype=torch.float64)).to(device, dt)
    sdt = getattr(torch, state_dtype or ("float64" if dtype == "float64" else "float32"))
    h0 = torch.randn(N, D, generator=gen, dtype=torch.float64).to(device, sdt)
    cu = None
    if offsets is not None:
        cu = torch.tensor(offsets, dtype=torch.int32 if device != "cpu" else torch.int64, device=device)
    return x, g, h0, cu


def leaf(a):
    return None if a is None else a.detach().clone().requires_grad_()


def np_or_none(a):
    return None if a is None else to_numpy(a)


def reference(x, g, h0, cu, reverse, o, do, dht):
    """Float64 reference of the forward from the inputs, and of the backward from the library's
    own o (the backward reads its states from o, so both see the same rounded states)."""
    cu_np = None if cu is None else cu.cpu().numpy()
    o_ref, ht_ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), np_or_none(h0), True, cu_np, reverse)
    dx, dg, dh0 = hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do), np_or_none(dht),
                                               np_or_none(h0), cu_np, reverse)
    return {"o": o_ref, "ht": ht_ref, "dx": dx, "dg": dg, "dh0": dh0}


def run_and_check(fn, x, g, h0, cu, reverse, gen):
    """Forward, backward from random cotangents of o and ht, and every result against the
    reference at the tolerance of the least precise dtype involved."""
    x, g, h0 = leaf(x), leaf(g), leaf(h0)
    o, ht = fn(x, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, reverse=reverse)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
    dht = torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(ht.device, ht.dtype)
    torch.autograd.backward([o, ht], [do, dht])

    acc = torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32
    assert o.dtype == x.dtype and o.shape == x.shape and o.device == x.device
    assert ht.dtype == acc and ht.shape == h0.shape
    assert (x.grad.dtype, g.grad.dtype, h0.grad.dtype) == (x.dtype, g.dtype, h0.dtype)

    ref = reference(x, g, h0, cu, reverse, o, do, dht)
    got = {"o": o, "ht": ht, "dx": x.grad, "dg": g.grad, "dh0": h0.grad}
    names = {str(a.dtype).replace("torch.", "") for a in (x, g, h0)}
    tol = max(TOL[n] for n in names)
    errors = {k: rel_err(v, ref[k]) for k, v in got.items()}
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors over {tol:g}: {bad}"


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
    """Views from a projection are read in place; a time-major transpose is copied once."""
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
    assert proj.grad is not None and proj.grad.shape == proj.shape


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
# gradcheck, opcheck and torch.compile on the CPU

GRADCHECK_CASES = [
    pytest.param("dense", True, True, False, id="dense-h0-final"),
    pytest.param("dense", False, False, False, id="dense-plain"),
    pytest.param("dense", True, True, True, id="dense-h0-final-reverse"),
    pytest.param("varlen", True, True, False, id="varlen-h0-final"),
    pytest.param("varlen", True, True, True, id="varlen-h0-final-reverse"),
    pytest.param("varlen", False, True, False, id="varlen-final"),
]


def gradcheck_case(name, kind, with_h0, final, reverse, gen, device="cpu"):
    x, g, h0, cu = make_inputs(gen, kind, "float64", device=device, size="short")
    x, g = leaf(x), leaf(g)
    h0 = leaf(h0) if with_h0 else None
    fn = FUNCTIONS[name]

    def f(x, g, h0):
        o, ht = fn(x, g, h0, final, cu, reverse)
        return (o, ht) if final else o

    assert torch.autograd.gradcheck(f, (x, g, h0), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("kind,with_h0,final,reverse", GRADCHECK_CASES)
def test_gradcheck_cpu(kind, with_h0, final, reverse, gen):
    gradcheck_case("hgrn", kind, with_h0, final, reverse, gen)


def opcheck_args(gen, kind, dtype, with_h0, final, reverse):
    x, g, h0, cu = make_inputs(gen, kind, dtype, size="short")
    fwd = (leaf(x), leaf(g), leaf(h0) if with_h0 else None, cu, final, reverse, "auto")
    o = torch.randn(x.shape, generator=gen).to(x.dtype)
    do = torch.randn(x.shape, generator=gen).to(x.dtype)
    dht = torch.randn(h0.shape, generator=gen).to(h0.dtype) if final else None
    bwd = (g, o, do, dht, h0 if with_h0 else None, cu, reverse, "auto")
    return fwd, bwd


@pytest.mark.parametrize("kind,with_h0,final,reverse", GRADCHECK_CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_opcheck(dtype, kind, with_h0, final, reverse, gen):
    fwd, bwd = opcheck_args(gen, kind, dtype, with_h0, final, reverse)
    torch.library.opcheck(torch.ops.hgrn_cupy.fwd.default, fwd)
    torch.library.opcheck(torch.ops.hgrn_cupy.bwd.default, bwd)


class TinyMixer(torch.nn.Module):
    """Projection -> hgrn -> loss over o and the final state: what a compiled model calls."""

    def __init__(self, D):
        super().__init__()
        self.proj = torch.nn.Linear(D, 2 * D)

    def forward(self, u, h0, cu_seqlens=None):
        x, f = self.proj(u).chunk(2, -1)
        o, ht = htorch.hgrn(x, F.logsigmoid(f), h0, True, cu_seqlens)
        return o.square().mean() + ht.sum()


def compile_and_compare(backend, device="cpu", dynamic=False, varlen=False, gen=None):
    import torch._dynamo

    torch._dynamo.reset()
    D = 8
    model = TinyMixer(D).to(device).double()
    if varlen:
        u = torch.randn(1, 20, D, generator=gen, dtype=torch.float64).to(device)
        cu = torch.tensor([0, 7, 7, 20], device=device)
    else:
        u = torch.randn(3, 20, D, generator=gen, dtype=torch.float64).to(device)
        cu = None
    h0 = torch.randn(3, D, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)  # a graph break raises
    results = []
    for m in (compiled, model):
        model.zero_grad(set_to_none=True)
        h0.grad = None
        loss = m(u, h0, cu)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()] + [h0.grad.clone()])
    for a, b in zip(*results):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_compile_fullgraph_aot_eager(dynamic, varlen, gen):
    compile_and_compare("aot_eager", dynamic=dynamic, varlen=varlen, gen=gen)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_compile_fullgraph_inductor(gen):
    compile_and_compare("inductor", gen=gen)


# ----------------------------------------------------------------------------------------------
# GPU

def cuda_inputs(gen, kind, dtype):
    return make_inputs(gen, kind, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["hgrn"] + GPU_ENGINES)
def test_values_and_grads_gpu(name, dtype, kind, reverse, gen):
    x, g, h0, cu = make_inputs(gen, kind, dtype, device="cuda", size="long")
    run_and_check(FUNCTIONS[name], x, g, h0, cu, reverse, gen)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,with_h0,final,reverse", GRADCHECK_CASES)
@pytest.mark.parametrize("name", GPU_ENGINES)
def test_gradcheck_gpu(name, kind, with_h0, final, reverse, gen):
    gradcheck_case(name, kind, with_h0, final, reverse, gen, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_ENGINES)
def test_opcheck_gpu(name, gen):
    x, g, h0, cu = cuda_inputs(gen, "varlen", "float32")
    args = (leaf(x), leaf(g), leaf(h0), cu, True, False, name)
    torch.library.opcheck(torch.ops.hgrn_cupy.fwd.default, args)


@pytest.mark.gpu
def test_compile_fullgraph_gpu(gen):
    compile_and_compare("inductor", device="cuda", gen=gen)


def _fill_(static, gen):
    """New random values into captured inputs (in place: a graph reads fixed addresses)."""
    x, g, h0 = static
    x.copy_(torch.randn(x.shape, generator=gen))
    g.copy_(F.logsigmoid(torch.randn(g.shape, generator=gen)))
    h0.copy_(torch.randn(h0.shape, generator=gen))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("name", GPU_ENGINES)
def test_cuda_graph_forward(name, kind, gen):
    """Capture the forward (varlen included: its offsets are not read back while capturing),
    replay with new inputs, compare with the reference."""
    assert hc.config.check_cu_seqlens_values  # the capture must take the skip, not lose the check
    fn = FUNCTIONS[name]
    x, g, h0, cu = cuda_inputs(gen, kind, "float32")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up compiles the kernels outside the capture
        for _ in range(2):
            fn(x, g, h0, True, cu)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, ht = fn(x, g, h0, True, cu)
    for _ in range(2):
        _fill_((x, g, h0), gen)
        graph.replay()
        torch.cuda.synchronize()
        o_ref, ht_ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), to_numpy(h0), True,
                                                None if cu is None else cu.cpu().numpy())
        assert rel_err(o, o_ref) <= TOL["float32"] and rel_err(ht, ht_ref) <= TOL["float32"]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("name", GPU_ENGINES)
def test_cuda_graph_forward_backward(name, kind, gen):
    """Capture forward and backward (gradients into .grad, allocated inside the capture), replay
    with new inputs and cotangents, compare every gradient with the reference."""
    fn = FUNCTIONS[name]
    x, g, h0, cu = cuda_inputs(gen, kind, "float32")
    x, g, h0 = leaf(x), leaf(g), leaf(h0)
    w_o = torch.randn(x.shape, generator=gen).cuda()  # do = w_o, dht = w_h
    w_h = torch.randn(h0.shape, generator=gen).cuda()

    def step():
        o, ht = fn(x, g, h0, True, cu)
        ((o * w_o).sum() + (ht * w_h).sum()).backward()
        return o, ht

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for a in (x, g, h0):
        a.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, ht = step()
    for _ in range(2):
        with torch.no_grad():
            _fill_((x, g, h0), gen)
            w_o.copy_(torch.randn(w_o.shape, generator=gen))
            w_h.copy_(torch.randn(w_h.shape, generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference(x, g, h0, cu, False, o, w_o, w_h)
        got = {"o": o, "ht": ht, "dx": x.grad, "dg": g.grad, "dh0": h0.grad}
        errors = {k: rel_err(v, ref[k]) for k, v in got.items()}
        assert all(e <= TOL["float32"] for e in errors.values()), errors


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_ENGINES)
def test_non_default_stream(name, gen):
    """Work goes on torch's current stream: the side stream first sleeps, then overwrites the
    inputs; a kernel launched on any other stream would read the old values."""
    fn = FUNCTIONS[name]
    x, g, h0, cu = cuda_inputs(gen, "dense", "float32")
    new = [a.clone() for a in (x, g, h0)]
    _fill_(new, gen)
    x, g, h0 = leaf(x), leaf(g), leaf(h0)
    w_o = torch.randn(x.shape, generator=gen).cuda()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # tens of milliseconds of GPU time on s
        with torch.no_grad():
            for a, b in zip((x, g, h0), new):
                a.copy_(b)
        o, ht = fn(x, g, h0, True)
        (o * w_o).sum().backward()
    s.synchronize()
    ref = reference(x, g, h0, None, False, o, w_o, None)
    got = {"o": o, "ht": ht, "dx": x.grad, "dg": g.grad, "dh0": h0.grad}
    errors = {k: rel_err(v, ref[k]) for k, v in got.items()}
    assert all(e <= TOL["float32"] for e in errors.values()), errors


# ----------------------------------------------------------------------------------------------
# the eager path, the top-level functions on tensors that require grad, a whole training step

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


def _training_step_model(D, device, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"xp": torch.nn.Linear(D, D), "gp": torch.nn.Linear(D, D)}).to(device, dtype)


def _loss(model, inp, h0, cu):
    x, g = model["xp"](inp), F.logsigmoid(model["gp"](inp))
    o, ht = htorch.hgrn(x, g, h0, True, cu)
    return o.square().mean() + ht.square().mean()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", LAYOUTS)
def test_cuda_graph_whole_training_step(kind, gen):
    """A whole step (projections, hgrn, loss, backward, SGD update) captured once and replayed: the
    parameters follow the same path as the same steps run eagerly."""
    B, T, D, offsets = LAYOUT[kind, "long"]
    N = B if offsets is None else len(offsets) - 1
    cu = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device="cuda")
    inputs = [torch.randn(B, T, D, generator=gen).cuda() for _ in range(4)]
    h0 = torch.randn(N, D, generator=gen).cuda()

    eager = _training_step_model(D, "cuda")
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    for inp in inputs:
        opt_e.zero_grad(set_to_none=False)
        _loss(eager, inp, h0, cu).backward()
        opt_e.step()

    model = _training_step_model(D, "cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    static = inputs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the model's copy, then reset
        warm = _training_step_model(D, "cuda")
        _loss(warm, static, h0, cu).backward()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.zero_grad(set_to_none=False)
        _loss(model, static, h0, cu).backward()
        opt.step()
    # capture queued no work; the model is still at its start
    for inp in inputs:
        static.copy_(inp)
        graph.replay()
    torch.cuda.synchronize()
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        assert rel_err(a, b) <= 1e-5, (name, rel_err(a, b))
