"""What every implementation offers the runner, on one input set ``s = {x, g, do}`` ([B, T, D]):

    out(s) -> o                   the forward output, for the check
    grads(s) -> (dx, dg)          the gradients for cotangent do, for the check
    make(pass, s) -> callable     what is timed: "fwd", "bwd" (from a saved forward) or "fwdbwd"
    skip_reason(B, T, D, dtype)   why it cannot run a shape (None: it can)
    pass_skip_reason(pass, T)     why it must not run a pass at this length

``Autograd`` fills all of it in from ``model(x, g) -> o`` through torch.autograd, the way a model
trains: fwd calls the model on tensors that need no gradient, bwd and fwdbwd take the gradients
with ``torch.autograd.grad(o, (x, g), do)``.
"""
from __future__ import annotations


class Unavailable(Exception):
    """An implementation that cannot run here (not installed, not built, disabled)."""


def leaves(*ts):
    return tuple(t.detach().requires_grad_(True) for t in ts)


class Impl:
    name = ""

    def __init__(self, ctx):
        self.ctx = ctx
        self.torch = ctx.torch

    def skip_reason(self, B, T, D, dtype):
        return None

    def pass_skip_reason(self, pazz, T):
        return None

    def make(self, pazz, s):
        return getattr(self, "make_" + pazz)(s)


class Autograd(Impl):
    """Anything differentiable through torch.autograd: model(x, g) -> o [B, T, D]."""

    def model(self, x, g):
        raise NotImplementedError

    def out(self, s):
        with self.torch.no_grad():
            return self.model(s["x"], s["g"])

    def grads(self, s):
        x, g = leaves(s["x"], s["g"])
        return self.torch.autograd.grad(self.model(x, g), (x, g), s["do"])

    def make_fwd(self, s):
        m, x, g = self.model, s["x"], s["g"]
        return lambda: m(x, g)

    def make_bwd(self, s):
        grad, (x, g), do = self.torch.autograd.grad, leaves(s["x"], s["g"]), s["do"]
        o = self.model(x, g)
        return lambda: grad(o, (x, g), do, retain_graph=True)

    def make_fwdbwd(self, s):
        m, grad, (x, g), do = self.model, self.torch.autograd.grad, leaves(s["x"], s["g"]), s["do"]

        def run():
            return grad(m(x, g), (x, g), do)
        return run


def power_of_two_skip(T, lo, hi):
    if T < 1 or T & (T - 1):
        return "T not a power of two"
    if not lo <= T <= hi:
        return f"needs {lo} <= T <= {hi}"
    return None


def linear_scan_skip(B, T, D, dtype, lo, hi):
    """Why a [B, D, T] scan of the accelerated-scan / fpscan kind cannot run a shape, or None: T a power
    of two in [lo, hi], D within the grid's y dimension, 32-bit offsets, a 16- or 32-bit float dtype."""
    why = power_of_two_skip(T, lo, hi)
    if why:
        return why
    if D > 65535:
        return "D > 65535 (grid y dimension)"
    if B * D * T >= 2 ** 31:
        return "B*D*T >= 2^31 (32-bit offsets)"
    if dtype not in ("float32", "bfloat16", "float16"):
        return f"{dtype} unsupported"
    return None


class LinearGateScan(Impl):
    """A peer that scans ``h[t] = a[t] * h[t-1] + x[t]`` on its own layout [B, D, T] with linear gates
    (accelerated-scan, fpscan), mapped onto our [B, T, D] op with log gates g: a = exp(g).

    native: the inputs already in its layout (a = exp(g) and x, transposed) before timing; gradients
      are d/da and d/dx of the scan, and d/dg = d/da * a is formed for the check only.
    +T: what a [B, T, D] model pays: exp, the transposes in and out and the scan, from [B, T, D]
      leaves, gradients through all of it.
    """
    family = ""

    def __init__(self, ctx, scan, variant, transposed):
        super().__init__(ctx)
        self.scan, self.variant, self.transposed = scan, variant, transposed
        self.name = f"{self.family}{'-' + variant if variant else ''}" + ("+T" if transposed else "")

    def native(self, s):
        """(a, x, do) in [B, D, T], shared by every variant through the input set."""
        if "bdt" not in s:
            t = lambda v: v.transpose(1, 2).contiguous()  # noqa: E731
            s["bdt"] = (t(self.torch.exp(s["g"])), t(s["x"]), t(s["do"]) if "do" in s else None)
        return s["bdt"]

    def model(self, x, g):
        torch, scan = self.torch, self.scan
        h = scan(torch.exp(g).transpose(1, 2).contiguous(), x.transpose(1, 2).contiguous())
        return h.transpose(1, 2).contiguous()

    def out(self, s):
        with self.torch.no_grad():
            if self.transposed:
                return self.model(s["x"], s["g"])
            a, xt, _ = self.native(s)
            return self.scan(a, xt).transpose(1, 2)

    def grads(self, s):
        grad = self.torch.autograd.grad
        if self.transposed:
            x, g = leaves(s["x"], s["g"])
            return grad(self.model(x, g), (x, g), s["do"])
        a, xt, dot = self.native(s)
        ar, xr = leaves(a, xt)
        da, dx = grad(self.scan(ar, xr), (ar, xr), dot)
        return dx.transpose(1, 2), (da.float() * a.float()).transpose(1, 2)  # d/dg = d/da * a

    def make_fwd(self, s):
        if self.transposed:
            m, x, g = self.model, s["x"], s["g"]
            return lambda: m(x, g)
        scan, (a, xt, _) = self.scan, self.native(s)
        return lambda: scan(a, xt)

    def make_bwd(self, s):
        grad = self.torch.autograd.grad
        if self.transposed:
            (x, g), do = leaves(s["x"], s["g"]), s["do"]
            o = self.model(x, g)
            return lambda: grad(o, (x, g), do, retain_graph=True)
        a, xt, dot = self.native(s)
        ar, xr = leaves(a, xt)
        h = self.scan(ar, xr)
        return lambda: grad(h, (ar, xr), dot, retain_graph=True)

    def make_fwdbwd(self, s):
        grad = self.torch.autograd.grad
        if self.transposed:
            m, (x, g), do = self.model, leaves(s["x"], s["g"]), s["do"]
            return lambda: grad(m(x, g), (x, g), do)
        scan, (a, xt, dot) = self.scan, self.native(s)
        ar, xr = leaves(a, xt)
        return lambda: grad(scan(ar, xr), (ar, xr), dot)
