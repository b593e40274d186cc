"""``hgrn_cupy.torch`` under torch's checkers and compiler: gradcheck in float64 (initial state,
final-state gradient, reverse, varlen), ``torch.library.opcheck`` of both custom ops, and
``torch.compile(fullgraph=True)`` of a small model against the same model run eagerly; on the CPU,
and GPU-marked on CUDA tensors for each engine.
"""
import os
import shutil

import pytest
from conftest import TOL, rel_err

torch = pytest.importorskip("torch")
import hgrn_cupy.torch as htorch  # noqa: E402
from torch_helpers import FUNCTIONS, GPU_ENGINES, cuda_inputs, leaf, make_inputs  # noqa: E402
from torch_helpers import gen  # noqa: E402, F401  (a fixture)

F = torch.nn.functional


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

    def __init__(self, D, time_major=False):
        super().__init__()
        self.proj = torch.nn.Linear(D, 2 * D)
        self.time_major = time_major

    def forward(self, u, h0, cu_seqlens=None):
        y = self.proj(u)
        if self.time_major:  # channels with a stride: what a compiler's layout choice can hand over
            y = y.transpose(1, 2).contiguous().transpose(1, 2)
        x, f = y.chunk(2, -1)
        o, ht = htorch.hgrn(x, F.logsigmoid(f), h0, True, cu_seqlens)
        return o.square().mean() + ht.sum()


def compile_and_compare(backend, device="cpu", dynamic=False, varlen=False, gen=None, time_major=False):
    import torch._dynamo

    torch._dynamo.reset()
    D = 8
    model = TinyMixer(D, time_major).to(device).double()
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


def test_compile_strided_channels_aot_eager(gen):
    """x and g whose channel axis has a stride compile (the fake implementations check the dense copies
    the real ones read) and match eager."""
    compile_and_compare("aot_eager", gen=gen, time_major=True)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_compile_fullgraph_inductor(gen):
    compile_and_compare("inductor", gen=gen)


# ----------------------------------------------------------------------------------------------
# the same on the GPU

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


# ----------------------------------------------------------------------------------------------
# functorch transforms and the flags under torch.compile, on the CPU

@pytest.mark.parametrize("kind", ["dense", "varlen"])
def test_functorch_transforms(kind, gen):
    """torch.func.grad, vjp, jacrev and vmap (alone and of grad, per-example gradients) give what autograd
    gives; differentiating the gradient raises (no double backward)."""
    x, g, h0, cu = make_inputs(gen, kind, "float64", size="short")

    def loss(x, g, h0):
        o, ht = htorch.hgrn(x, g, h0, True, cu)
        return (o * o).sum() + (ht * ht).sum()

    grads = torch.func.grad(loss, argnums=(0, 1, 2))(x, g, h0)
    xs, gs, hs = leaf(x), leaf(g), leaf(h0)
    want = torch.autograd.grad(loss(xs, gs, hs), (xs, gs, hs))
    assert all(rel_err(a, b) <= TOL["float64"] for a, b in zip(grads, want))
    do = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    _, vjp = torch.func.vjp(lambda x: htorch.hgrn(x, g, None, False, cu)[0], x)
    want = torch.autograd.grad(htorch.hgrn(xs, g, None, False, cu)[0], xs, do)[0]
    assert rel_err(vjp(do)[0], want) <= TOL["float64"]
    jac = torch.func.jacrev(lambda x: htorch.hgrn(x, g, None, False, cu)[0].sum(1))(x)
    assert jac.shape == (x.shape[0], x.shape[2]) + tuple(x.shape)
    if kind == "dense":  # a batch of inputs, and a gradient per example
        batch = torch.func.vmap(lambda x: htorch.hgrn(x, g)[0])(torch.stack([x, 2 * x]))
        assert rel_err(batch[1], 2 * htorch.hgrn(x, g)[0]) <= TOL["float64"]
        one = lambda x1: htorch.hgrn(x1[None], g[:1])[0].sum()  # noqa: E731
        per_example = torch.func.vmap(torch.func.grad(one))(x)
        assert rel_err(per_example[1], torch.func.grad(one)(x[1])) <= TOL["float64"]
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.func.grad(lambda x: torch.func.grad(lambda y: htorch.hgrn(y, g)[0].sum())(x).sum())(x)


def test_compiled_flags_are_checked(gen):
    """A flag that is not a bool raises the eager TypeError in a compiled function too (it did not run
    the call with the value read as true)."""
    import torch._dynamo

    torch._dynamo.reset()
    x, g, _, _ = make_inputs(gen, "dense", "float64", size="short")
    for kw, name in (({"reverse": 1}, "reverse"), ({"output_final_state": "yes"}, "output_final_state")):
        with pytest.raises(TypeError, match=rf"^{name} must be a bool"):
            torch.compile(lambda x, g: htorch.hgrn(x, g, **kw), backend="aot_eager")(x, g)


@pytest.mark.parametrize("kind", ["dense", "varlen"])
def test_vmap_folds_examples_into_the_batch(kind, gen, monkeypatch):
    """torch.vmap of the operators: dense examples fold into the batch (one forward and one backward call
    for all of them, shared arguments expanded), packed ones are a call each; every example is what it
    gives alone, states and gradients included."""
    from hgrn_cupy import plans

    calls = []
    for name in ("forward", "backward"):
        real = getattr(plans, name)
        monkeypatch.setattr(plans, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    x, g, h0, cu = make_inputs(gen, kind, "float64", size="short")
    V = 3
    xs = torch.stack([x * (v + 1) for v in range(V)])
    hs = torch.stack([h0 - v for v in range(V)])

    def loss(x, h0):
        o, ht = htorch.hgrn(x, g, h0, True, cu)
        return (o * o).sum() + (ht * ht).sum()

    grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)))(xs, hs)
    assert calls == (["forward", "backward"] if kind == "dense" else ["forward"] * V + ["backward"] * V)
    for v in range(V):
        want = torch.func.grad(loss, argnums=(0, 1))(xs[v], hs[v])
        assert all(rel_err(a[v], b) <= TOL["float64"] for a, b in zip(grads, want)), v
