"""``hgrn()`` adds nothing on the device to the engine it chooses (CPU, on the recording driver).

The automatic entry points (``hgrn_cupy.hgrn`` / ``hgrn_backward(engine="auto")`` and ``hgrn_cupy.torch.hgrn``
through autograd) choose an engine and then must launch exactly what that engine's own function launches: the
same kernels, grids, blocks, shared memory, options and arguments, and the same fills, in the same order, once
the call's plans and kept scratch exist.  Only the addresses of the tensors may differ.  The choice is forced
through the built-in rule (the recording driver has no device index, so nothing is tuned).
"""

import pytest
from recording import fake_cuda, fresh_plans, launch_args  # noqa: F401  (fixtures)

import hgrn_cupy as hc
from hgrn_cupy import dispatch


def _device_work(rec):
    """The recorded events with the tensors' addresses left out."""
    out = []
    for event in rec.events:
        if event[0] == "kernel":
            out.append(("kernel", launch_args(event[1])))
        elif event[0] == "fill":
            out.append(("fill",) + event[2:])  # value, bytes, stream
        else:
            out.append(event)
    return out


def _run(rec, step):
    """What a call does on the device once its plans and kept scratch exist (the first call also fills the
    scratch it keeps)."""
    step()
    rec.events.clear()
    step()
    return _device_work(rec)


@pytest.mark.parametrize("engine", ["chunk", "fused_recurrent"])
def test_auto_launches_what_the_chosen_engine_launches(engine, fake_cuda, monkeypatch):
    torch = pytest.importorskip("torch")
    import hgrn_cupy.torch as ht

    monkeypatch.setattr(dispatch, "rule", lambda *args: engine)
    gen = torch.Generator().manual_seed(5)
    x, do = torch.randn(2, 2, 300, 64, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(2, 300, 64, generator=gen))
    h0 = torch.randn(2, 64, generator=gen)
    pinned = {"chunk": (hc.chunk_hgrn, ht.chunk_hgrn), "fused_recurrent": (hc.fused_recurrent_hgrn,
                                                                           ht.fused_recurrent_hgrn)}[engine]

    def top(fn, backward_engine):
        def step():
            o, _ = fn(x, g, h0, True)
            hc.hgrn_backward(g, o, do, None, h0, engine=backward_engine)
        return step

    def autograd(fn):
        def step():
            xs, gs = x.clone().requires_grad_(), g.clone().requires_grad_()
            o, _ = fn(xs, gs, h0, True)
            torch.autograd.grad(o, (xs, gs), do)
        return step

    auto_top = _run(fake_cuda, top(hc.hgrn, "auto"))
    assert [e[1]["kernel"] for e in auto_top if e[0] == "kernel"][0].startswith(engine[:5])
    assert auto_top == _run(fake_cuda, top(pinned[0], engine))
    assert _run(fake_cuda, autograd(ht.hgrn)) == _run(fake_cuda, autograd(pinned[1]))
