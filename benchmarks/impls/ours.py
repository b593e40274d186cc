"""hgrn_cupy, through its public functions only, three ways:

* ours-chunk, ours-fused, ours-auto: ``hgrn_cupy.torch.chunk_hgrn / fused_recurrent_hgrn / hgrn``, what a
  PyTorch model calls; gradients through ``torch.autograd.grad(o, (x, g), do)``, as the peers' are.
  Forward cells call the same function on tensors that need no gradient (the inference path).
* ours-auto-direct: ``hgrn_cupy.hgrn(x, g)`` then ``hgrn_cupy.hgrn_backward(g, o, do)``, no autograd.
* ours-probe: a minimal ``torch.autograd.Function`` whose forward calls ``hgrn_cupy.hgrn(x, g)`` and
  saves g and o, and whose backward calls ``hgrn_cupy.hgrn_backward(g, o, do)``: the least any
  autograd wrapper of these kernels can cost, which hgrn_cupy.torch is judged against.

``option_steps`` builds the training step with every option (states in and out, packed sequences,
reverse) both through hgrn_cupy.torch and through the probe extended to those options.
"""
from __future__ import annotations

import importlib

from .base import Autograd, Impl

NAMES = ("ours-chunk", "ours-fused", "ours-auto", "ours-auto-direct", "ours-probe")
_FN = {"ours-chunk": "chunk_hgrn", "ours-fused": "fused_recurrent_hgrn", "ours-auto": "hgrn"}


def probe_functions(torch, hc):
    """(Probe, ProbeWithOptions): plain autograd.Functions over hgrn_cupy's top-level calls."""

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, g):
            o, _ = hc.hgrn(x, g)
            ctx.save_for_backward(g, o)
            return o

        @staticmethod
        def backward(ctx, do):
            g, o = ctx.saved_tensors
            dx, dg, _ = hc.hgrn_backward(g, o, do)
            return dx, dg

    class ProbeWithOptions(torch.autograd.Function):
        """The probe with initial_state, output_final_state, cu_seqlens and reverse: returns (o, ht)
        (ht None without output_final_state); gradients to x, g and initial_state."""

        @staticmethod
        def forward(ctx, x, g, h0, cu_seqlens, reverse, final):
            o, ht = hc.hgrn(x, g, initial_state=h0, output_final_state=final, cu_seqlens=cu_seqlens,
                            reverse=reverse)
            ctx.save_for_backward(g, o, h0, cu_seqlens)
            ctx.reverse, ctx.final = reverse, final
            return (o, ht) if final else o

        @staticmethod
        def backward(ctx, do, dht=None):
            g, o, h0, cu_seqlens = ctx.saved_tensors
            dx, dg, dh0 = hc.hgrn_backward(g, o, do, dht=dht if ctx.final else None, initial_state=h0,
                                           cu_seqlens=cu_seqlens, reverse=ctx.reverse)
            return dx, dg, (dh0 if h0 is not None else None), None, None, None

    return Probe, ProbeWithOptions


class OursAutograd(Autograd):
    """hgrn_cupy.torch.<fn>: the library's own differentiable wrapper."""

    def __init__(self, ctx, hct, name):
        super().__init__(ctx)
        self.name, self.fn = name, getattr(hct, _FN[name])

    def model(self, x, g):
        return self.fn(x, g)[0]


class OursProbe(Autograd):
    name = "ours-probe"

    def __init__(self, ctx, probe):
        super().__init__(ctx)
        self.apply = probe.apply

    def model(self, x, g):
        return self.apply(x, g)


class OursDirect(Impl):
    """hgrn_cupy.hgrn then hgrn_cupy.hgrn_backward on torch tensors, no autograd."""
    name = "ours-auto-direct"

    def __init__(self, ctx, hc):
        super().__init__(ctx)
        self.hc = hc

    def out(self, s):
        return self.hc.hgrn(s["x"], s["g"])[0]

    def grads(self, s):
        o = self.hc.hgrn(s["x"], s["g"])[0]
        dx, dg, _ = self.hc.hgrn_backward(s["g"], o, s["do"])
        return dx, dg

    def make_fwd(self, s):
        f, x, g = self.hc.hgrn, s["x"], s["g"]
        return lambda: f(x, g)

    def make_bwd(self, s):
        bwd, g, do = self.hc.hgrn_backward, s["g"], s["do"]
        o = self.hc.hgrn(s["x"], g)[0]
        return lambda: bwd(g, o, do)

    def make_fwdbwd(self, s):
        f, bwd, x, g, do = self.hc.hgrn, self.hc.hgrn_backward, s["x"], s["g"], s["do"]

        def run():
            o = f(x, g)[0]
            return bwd(g, o, do)
        return run


def option_inputs(torch, s, option, seed=0):
    """The arguments of one option row on input set ``s``: (x, g, h0, cu_seqlens, reverse, final, dht).
    varlen packs the B sequences of [B, T, D] along time as [1, B*T, D] with uneven lengths (each
    sequence T +- T/4, the last one taking the rest), so boundaries fall inside blocks and tiles."""
    x, g = s["x"], s["g"]
    B, T, D = x.shape
    states = option in ("states", "all")
    varlen = option in ("varlen", "all")
    cu = None
    if varlen:
        x, g = x.reshape(1, B * T, D), g.reshape(1, B * T, D)
        cuts, pos = [0], 0
        for b in range(B - 1):
            pos += max(1, T + (T // 4 if b % 2 == 0 else -(T // 4)))
            cuts.append(min(pos, B * T - (B - 1 - b)))
        cuts.append(B * T)
        cu = torch.tensor(cuts, dtype=torch.int32, device=x.device)
    N = B if cu is None else cu.numel() - 1
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h0 = torch.randn(N, D, generator=gen).to(x.device) if states else None
    dht = torch.randn(N, D, generator=gen).to(x.device) if states else None
    return x, g, h0, cu, option in ("reverse", "all"), states, dht


def option_steps(ctx, s, option):
    """({"ours-auto": step, "ours-probe": step}, grads, inputs) for one option row on input set ``s``:
    ``grads(which)`` gives (o, ht, dx, dg, dh0) without the absent ones, for the check; ``inputs`` the
    arguments.  The plain row's probe is the minimal one; the others extend it to the options."""
    torch, hct, probe_min, probe_opts = ctx.torch, ctx.hct, ctx.probe, ctx.probe_opts
    x, g, h0, cu, reverse, final, dht = option_inputs(torch, s, option)
    do = s["do"].reshape(x.shape)
    xr, gr = x.detach().requires_grad_(True), g.detach().requires_grad_(True)
    h0r = h0.detach().requires_grad_(True) if h0 is not None else None
    wrt = (xr, gr) + ((h0r,) if h0r is not None else ())

    def ours():
        o, ht = hct.hgrn(xr, gr, initial_state=h0r, output_final_state=final, cu_seqlens=cu, reverse=reverse)
        return (o, ht) if final else (o,)

    def probe():
        if option == "plain":
            return (probe_min.apply(xr, gr),)
        out = probe_opts.apply(xr, gr, h0r, cu, reverse, final)
        return out if final else (out,)

    cot = (do, dht) if final else (do,)

    def step(fwd):
        return lambda: torch.autograd.grad(fwd(), wrt, cot)

    def grads(which):
        outs = (ours if which == "ours-auto" else probe)()
        gs = torch.autograd.grad(outs, wrt, cot)
        return tuple(t.detach() for t in outs) + tuple(gs)

    inputs = dict(x=x, g=g, h0=h0, cu=cu, reverse=reverse, do=do, dht=dht)
    return {"ours-auto": step(ours), "ours-probe": step(probe)}, grads, inputs


def load(ctx, want):
    """The selected ``ours-*`` implementations; raises when hgrn_cupy (or hgrn_cupy.torch) does not import."""
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    if (repo / "hgrn_cupy").is_dir() and str(repo) not in sys.path:
        sys.path.insert(0, str(repo))  # benchmark this checkout
    hc = importlib.import_module("hgrn_cupy")
    hct = importlib.import_module("hgrn_cupy.torch")
    ctx.hc, ctx.hct = hc, hct
    ctx.versions["hgrn_cupy"] = getattr(hc, "__version__", "?")
    ctx.probe, ctx.probe_opts = probe_functions(ctx.torch, hc)
    impls = {}
    for name in want:
        if name in _FN:
            impls[name] = OursAutograd(ctx, hct, name)
        elif name == "ours-auto-direct":
            impls[name] = OursDirect(ctx, hc)
        elif name == "ours-probe":
            impls[name] = OursProbe(ctx, ctx.probe)
    return impls
