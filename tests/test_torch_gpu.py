"""``hgrn_cupy.torch`` on CUDA tensors (GPU-marked): values and gradients of both engines against the
float64 reference, CUDA graph capture and replay (forward, forward and backward, a whole training
step), and work on a non-default stream.  Inputs are fresh random numbers each run (the seed is printed).
"""
import pytest
from conftest import TOL, capture_torch, rel_err, to_numpy

torch = pytest.importorskip("torch")
import hgrn_cupy as hc  # noqa: E402
import hgrn_cupy.torch as htorch  # noqa: E402
from torch_helpers import (FUNCTIONS, GPU_ENGINES, LAYOUT, LAYOUTS, REVERSE, cuda_inputs, leaf,  # noqa: E402
                           make_inputs, reference, run_and_check)
from torch_helpers import gen  # noqa: E402, F401  (a fixture)

F = torch.nn.functional


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["hgrn"] + GPU_ENGINES)
def test_values_and_grads_gpu(name, dtype, kind, reverse, gen):
    x, g, h0, cu = make_inputs(gen, kind, dtype, device="cuda", size="long")
    run_and_check(FUNCTIONS[name], x, g, h0, cu, reverse, gen)


def _fill_(static, gen):
    """New random values into captured inputs (in place: a graph reads fixed addresses)."""
    x, g, h0 = static
    x.copy_(torch.randn(x.shape, generator=gen))
    g.copy_(F.logsigmoid(torch.randn(g.shape, generator=gen)))
    h0.copy_(torch.randn(h0.shape, generator=gen))


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("name", GPU_ENGINES)
def test_cuda_graph_forward(name, kind, gen):
    """Capture the forward (varlen included: its offsets are not read back while capturing),
    replay with new inputs, compare with the reference."""
    assert hc.config.check_cu_seqlens_values  # the capture must take the skip, not lose the check
    fn = FUNCTIONS[name]
    x, g, h0, cu = cuda_inputs(gen, kind, "float32")
    graph, (o, ht) = capture_torch(lambda: fn(x, g, h0, True, cu))
    for _ in range(2):
        _fill_((x, g, h0), gen)
        graph.replay()
        torch.cuda.synchronize()
        o_ref, ht_ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), to_numpy(h0), True,
                                                None if cu is None else cu.cpu().numpy())
        assert rel_err(o, o_ref) <= TOL["float32"] and rel_err(ht, ht_ref) <= TOL["float32"]


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
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

    def clear_grads():
        for a in (x, g, h0):
            a.grad = None

    graph, (o, ht) = capture_torch(step, clear_grads)
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
@pytest.mark.usefixtures("poison")
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
# a whole training step captured once

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
