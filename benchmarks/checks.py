"""Correctness before timing: every implementation's output and gradients on a shape are compared
with the reference, ||out - ref|| / ||ref|| in float64, and a cell over the tolerance reads MISMATCH
and is not timed.  The reference is the first of REF_ORDER that agrees with a float64 loop over the
first steps; ``loop_hgrn`` is that loop in full (states in and out, packed sequences, reverse), for
the checks of ours with every option."""
from __future__ import annotations

import math
import time

from .context import log, one_line
from .plan import REF_ORDER, TOL

REF_PREFIX_STEPS = 128


def rel_err(ctx, out, ref):
    """||out - ref|| / ||ref|| in float64, in slices (no full-size float64 temporaries); inf on
    a shape mismatch or a NaN."""
    torch = ctx.torch
    if tuple(out.shape) != tuple(ref.shape):
        return float("inf")
    a, b = out.reshape(-1), ref.reshape(-1).to(out.device)
    num = den = 0.0
    step = 1 << 25
    for i in range(0, a.numel(), step):
        ai, bi = a[i:i + step].double(), b[i:i + step].double()
        num += float(torch.sum((ai - bi) ** 2))
        den += float(torch.sum(bi ** 2))
    if math.isnan(num) or math.isnan(den):
        return float("inf")
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)


def loop_prefix(ctx, x, g, steps):
    """float64 PyTorch loop over the first ``steps`` steps: an independent check of the reference."""
    torch = ctx.torch
    a, xv = torch.exp(g[:, :steps].double()), x[:, :steps].double()
    h = torch.zeros_like(xv[:, 0])
    outs = []
    for t in range(xv.shape[1]):
        h = a[:, t] * h + xv[:, t]
        outs.append(h)
    return torch.stack(outs, 1)


def loop_hgrn(torch, x, g, h0=None, cu_seqlens=None, reverse=False):
    """The recurrence as a differentiable float64 PyTorch loop: (o, ht) for x, g [B, T, D], h0 [N, D]
    or None, cu_seqlens [N+1] offsets into T (B == 1) or None.  Every sequence is gathered into a
    padded [N, Tmax, D] batch in the order it is walked (backwards under ``reverse``); padding steps
    have gate 1 and input 0, so they carry the last state to ht unchanged."""
    B, T, D = x.shape
    xd, gd = x.double().reshape(B * T, D), g.double().reshape(B * T, D)
    if cu_seqlens is None:
        bounds = [(b * T, (b + 1) * T) for b in range(B)]
    else:
        cu = [int(v) for v in cu_seqlens.tolist()]
        bounds = list(zip(cu[:-1], cu[1:]))
    N, tmax = len(bounds), max(e - s for s, e in bounds)
    pad = B * T  # index of an appended row: x = 0, g = 0 (gate exp(0) = 1)
    idx = torch.full((N, tmax), pad, dtype=torch.long, device=xd.device)
    for n, (s, e) in enumerate(bounds):
        walk = torch.arange(s, e, device=xd.device)
        idx[n, :e - s] = walk.flip(0) if reverse else walk
    zero = xd.new_zeros(1, D)
    xs, gs = torch.cat([xd, zero])[idx], torch.cat([gd, zero])[idx]
    h = xd.new_zeros(N, D) if h0 is None else h0.double()
    outs = []
    for t in range(tmax):
        h = torch.exp(gs[:, t]) * h + xs[:, t]
        outs.append(h)
    o_pad = torch.stack(outs, 1)
    o = xd.new_zeros(B * T + 1, D).index_add(0, idx.reshape(-1), o_pad.reshape(-1, D))[:B * T]
    return o.reshape(B, T, D), h


def note_first_call(name, kind, ms):
    """Log first calls that compile or autotune for long, so the log shows where a run's time goes."""
    if ms > 2000:
        log(f"  {name}: first {'forward' if kind == 'out' else 'forward+backward'} call {ms / 1e3:.1f} s "
            "(compile, autotuning)")


class Checker:
    """Compares each implementation's forward output and gradients on input set 0 with the
    reference: the first of REF_ORDER that runs and agrees with a float64 loop over the first steps."""

    def __init__(self, ctx, s, dtype):
        self.ctx, self.s, self.tol = ctx, s, TOL[dtype]
        self.ref_name = self._out = self._grads = None
        self.results = {}  # (impl, "out" | "grad") -> dict(ok, err, first_ms, note)
        self.ref_prefix_err = None

    def _reference(self):
        if self.ref_name is not None or self._out is False:
            return
        steps = min(self.s["x"].shape[1], REF_PREFIX_STEPS)
        prefix = None
        for name in REF_ORDER:
            impl = self.ctx.impls.get(name)
            if impl is None:
                continue
            try:
                t0 = time.perf_counter()
                o = impl.out(self.s)
                self.ctx.sync()
                first = (time.perf_counter() - t0) * 1e3
                if prefix is None:
                    prefix = loop_prefix(self.ctx, self.s["x"], self.s["g"], steps)
                err = rel_err(self.ctx, o[:, :steps], prefix)
            except Exception as e:
                self.results[(name, "out")] = dict(ok=False, error=one_line(e))
                self.ctx.after_error()
                continue
            note_first_call(name, "out", first)
            if err <= self.tol:
                self.ref_name, self._out, self.ref_prefix_err = name, o, err
                self.results[(name, "out")] = dict(ok=True, err=err, first_ms=first, note="reference")
                return
            self.results[(name, "out")] = dict(ok=False, err=err, first_ms=first,
                                               note=f"first {steps} steps differ from a float64 loop")
            log(f"  WARNING: {name} disagrees with a float64 loop on the first {steps} steps (rel {err:.2e})")
        self._out = False

    def check(self, impl, kind):
        key = (impl.name, kind)
        if key in self.results:
            return self.results[key]
        self._reference()
        if self.ref_name is None:
            res = dict(ok=False, error="no reference implementation agreed with the float64 loop")
            self.results[key] = res
            return res
        ref_impl = self.ctx.impls[self.ref_name]
        if kind == "grad" and self._grads is None and ref_impl is not impl:
            try:
                self._grads = tuple(ref_impl.grads(self.s))
            except Exception as e:
                res = dict(ok=False, error=f"reference {self.ref_name} gradients failed: {one_line(e)}")
                self.results[key] = res
                self.ctx.after_error()
                return res
        try:
            self.ctx.sync()
            t0 = time.perf_counter()
            if kind == "out":
                got = (impl.out(self.s),)
                ref = (self._out,)
            else:
                got = tuple(impl.grads(self.s))
                if self._grads is None:  # impl is the reference
                    self._grads = got
                ref = self._grads
            self.ctx.sync()
            first = (time.perf_counter() - t0) * 1e3
            note_first_call(impl.name, kind, first)
            err = max(rel_err(self.ctx, a, b) for a, b in zip(got, ref))
            del got
            res = dict(ok=err <= self.tol, err=err, first_ms=first)
        except Exception as e:
            res = dict(ok=False, error=one_line(e))
            self.ctx.after_error()
        self.results[key] = res
        return res

    def cell(self, impl, kinds):
        """Check ``kinds`` ("out", "grad") of ``impl``: None when all agree (then ``errs`` and ``first``
        hold the errors and the first call's ms), else the cell's result (error or mismatch)."""
        self.errs, self.first = {}, None
        for kind in kinds:
            chk = self.check(impl, kind)
            if "error" in chk:
                return dict(status="error", note=chk["error"])
            self.errs[kind] = chk["err"]
            self.first = chk.get("first_ms") if self.first is None else self.first
            if not chk["ok"]:
                return dict(status="mismatch", err=self.errs, note=chk.get("note") or
                            f"{'output' if kind == 'out' else 'gradients'} rel err {chk['err']:.2e} > {self.tol:g}")
        return None
