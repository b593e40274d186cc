"""The implementations, one module per family: ours (hgrn_cupy), fla, ascan (accelerated-scan),
fpscan, torch_loop, and jax_impl (the JAX section).  Each family's ``load`` returns its selected
implementations or raises; a family that does not load is reported in one line per name and its
columns are skipped.  Family modules import torch and the peers only inside functions, so the plan
and --dry-run never need them."""
from __future__ import annotations

from ..context import log, one_line
from ..plan import HOSTSTEP_IMPLS, IMPLS, OURS, impl_selected

ORDER = IMPLS + tuple(n for n in HOSTSTEP_IMPLS if n not in IMPLS)


def _why(e):
    return e.args[0] if type(e).__name__ == "Unavailable" and e.args else one_line(e)


def _sorted(impls):
    return {n: impls[n] for n in ORDER if n in impls}


def load_impls(ctx, sections):
    """Every selected implementation except fpscan (``load_fpscan``, once its build is done).
    ``sections``: the sections that run (the probe is loaded only for the host-step table)."""
    from . import ascan, fla, ours, torch_loop

    impls, missing = {}, {}

    def want(names):
        return [n for n in names if impl_selected(ctx.args, n)
                and (n != "ours-probe" or "hoststep" in sections)]

    def add(names, loader):
        names = want(names)
        if not names:
            return
        try:
            impls.update(loader(ctx, names))
        except Exception as e:
            missing.update({n: _why(e) for n in names})

    add(OURS, ours.load)
    add(fla.NAMES, fla.load)
    names = want(ascan.NAMES)
    if names:
        got, failed = ascan.load(ctx, names)
        impls.update(got)
        missing.update({n: _why(e) for n, e in failed.items()})
    add(torch_loop.NAMES, torch_loop.load)
    for name, why in missing.items():
        log(f"skipping {name}: {why}")
    ctx.impls = _sorted(impls)
    ctx.missing = missing


def fpscan_wanted(args):
    from .fpscan import NAMES
    return [n for n in NAMES if impl_selected(args, n)]


def load_fpscan(ctx, build):
    """fpscan's columns, after its build (``build``: None when --fpscan-src was not given)."""
    from . import fpscan

    names = fpscan_wanted(ctx.args)
    if not names:
        return
    try:
        got = fpscan.load(ctx, names, build)
    except Exception as e:
        for n in names:
            ctx.drop_impl(n, _why(e))
        if ctx.device == "cuda":
            ctx.after_error()
        return
    ctx.impls = _sorted({**ctx.impls, **got})
    log(f"fpscan: {', '.join(got)} loaded")
