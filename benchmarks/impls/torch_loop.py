"""Plain PyTorch: torch-loop (``for t in range(T): h = exp(g[:, t]) * h + x[:, t]`` in float32, a
Python loop, short T only) for the pass tables, and torch-eager, the same one step, for decode."""
from __future__ import annotations

from .base import Autograd

NAMES = ("torch-loop",)


class TorchLoop(Autograd):
    name = "torch-loop"

    def skip_reason(self, B, T, D, dtype):
        if T > self.ctx.args.torch_loop_max_t:
            return f"T > {self.ctx.args.torch_loop_max_t} (python loop)"
        return None

    def model(self, x, g):
        torch = self.torch
        a, xf = torch.exp(g.float()), x.float()
        h = xf.new_zeros(x.shape[0], x.shape[2])
        outs = []
        for t in range(x.shape[1]):
            h = a[:, t] * h + xf[:, t]
            outs.append(h)
        return torch.stack(outs, 1).to(x.dtype)


def eager_step(torch):
    """One decode step with state in and out, in float32: (x, g, h) -> (o, h)."""
    def step(x, g, h):
        hn = torch.exp(g[:, 0].float()) * h.float() + x[:, 0].float()
        return hn.to(x.dtype).unsqueeze(1), hn
    return step


def load(ctx, want):
    return {n: TorchLoop(ctx) for n in want}
