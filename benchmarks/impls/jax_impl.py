"""The JAX section: hgrn_cupy.jax inside jitted programs, two tables.

forward+backward (one call = ``o`` and the vjp's (dx, dg) for a cotangent do, under ``jax.jit``):
  jax-auto / jax-chunk / jax-fused (``hgrn_cupy.jax.hgrn / chunk_hgrn / fused_recurrent_hgrn``, our
  kernels inside XLA's program on XLA's stream), torch (``hgrn_cupy.torch.hgrn`` + autograd, on torch
  tensors of the same shape), jax-assoc-scan (``lax.associative_scan`` over the affine pairs
  (exp(g), x) in float32 and its JAX-derived gradient: the reference of the others).  Wall clock
  around one call and its ``block_until_ready`` (host time included), median of ``--jax-reps``.

training step (``jax.jit(jax.grad(loss))``, ``loss = sum(hgrn_cupy.jax.hgrn(x, g)[0] * do)``):
  host us per step, as the host-step table takes it (steps queued back to back on input sets in
  turn, one ``block_until_ready`` at the end); device us per step, from one jitted ``lax.fori_loop``
  running the step on every input set per iteration, timed around the whole program (no dispatch
  cost between steps).  Each iteration folds one element of the previous gradient, times a traced
  zero, into one element of x: the steps depend on the loop, so XLA cannot hoist them out of it, and
  the update is one element in place.

Floors: the copy floor of a forward+backward (8 tensors) and the practical floor, torch.add with the
forward's traffic timed by the run's timer, x8/3.  Every cell is checked against jax-assoc-scan
first (MISMATCH cells are not timed)."""
from __future__ import annotations

import statistics
import time

from ..context import log, one_line
from ..plan import BUDGET_NOTE, TOL, min_bytes, practical_scale
from ..timing import rotation_count

MAX_STEP_SETS = 16  # input sets unrolled in the device-time loop (enough to leave L2 at the small shapes)


def assoc_scan_hgrn(x, g):
    import jax
    import jax.numpy as jnp

    a, b = jnp.exp(g.astype(jnp.float32)), x.astype(jnp.float32)
    _, h = jax.lax.associative_scan(lambda e, l: (l[0] * e[0], l[0] * e[1] + l[1]), (a, b), axis=1)
    return h.astype(x.dtype)


def vjp_step(fn):
    import jax

    def step(x, g, do):
        o, pullback = jax.vjp(lambda x, g: fn(x, g), x, g)
        return (o,) + pullback(do)
    return jax.jit(step)


def grad_step(fn):
    import jax
    import jax.numpy as jnp

    def loss(x, g, do):
        return jnp.sum((fn(x, g) * do).astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def rel_err(a, b):
    import jax.numpy as jnp

    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def wall_ms(fn, sync, reps, warmup=3):
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def inputs(dev, shape, dtype, seed):
    import jax
    import jax.numpy as jnp

    kx, kg, kd = jax.random.split(jax.random.PRNGKey(seed), 3)
    jdt = getattr(jnp, dtype)
    x = jax.device_put(jax.random.normal(kx, shape, jdt), dev)
    g = jax.device_put(jax.nn.log_sigmoid(jax.random.normal(kg, shape)).astype(jdt), dev)
    return x, g, jax.device_put(jax.random.normal(kd, shape, jdt), dev)


def floors(ctx, B, T, D, dtype, copy_gbps, measure_add):
    nbytes = min_bytes(B, T, D, dtype, dtype, "fwdbwd")
    add_ms = measure_add(ctx, B, T, D, dtype)
    return dict(B=B, T=T, D=D, dtype=dtype, min_bytes=nbytes, floor_ms=nbytes / (copy_gbps * 1e9) * 1e3,
                add_ms=add_ms, practical_ms=add_ms * practical_scale(B, T, D, dtype, "fwdbwd"), results={})


def fwdbwd_row(ctx, hj, dev, shape, dtype, row):
    import jax

    from ..checks import Checker
    from ..sections import make_sets

    block, reps = jax.block_until_ready, ctx.args.jax_reps
    x, g, do = inputs(dev, shape, dtype, 0)
    ref_step = vjp_step(assoc_scan_hgrn)
    ref = ref_step(x, g, do)
    res, tol = row["results"], TOL[dtype]
    for name, fn in (("jax-auto", hj.hgrn), ("jax-chunk", hj.chunk_hgrn), ("jax-fused", hj.fused_recurrent_hgrn)):
        try:
            step = vjp_step(lambda x, g, fn=fn: fn(x, g)[0])
            err = max(rel_err(a, b) for a, b in zip(step(x, g, do), ref))
            res[name] = dict(status="mismatch", err=err, note=f"rel err {err:.2e} > {tol:g}") if err > tol else \
                dict(status="ok", err=err, ms=wall_ms(lambda: step(x, g, do), block, reps))
        except Exception as e:
            res[name] = dict(status="error", note=one_line(e))
    impl = ctx.impls.get("ours-auto")
    if impl is not None:
        try:
            s = make_sets(ctx, *shape, dtype, 1, with_do=True)[0]
            bad = Checker(ctx, s, dtype).cell(impl, ("out", "grad"))
            res["torch"] = bad or dict(status="ok", ms=wall_ms(impl.make_fwdbwd(s), lambda _: ctx.sync(), reps))
            del s
        except Exception as e:
            res["torch"] = dict(status="error", note=one_line(e))
            ctx.after_error()
    if ctx.over_budget():
        res["jax-assoc-scan"] = dict(status="skip", note=BUDGET_NOTE)
    else:
        res["jax-assoc-scan"] = dict(status="ok", ms=wall_ms(lambda: ref_step(x, g, do), block, reps))
    return row


def fori_step_us(step, sets, iters):
    """Device us per step: ``iters`` iterations of a jitted fori_loop that runs ``step`` on every set.
    The sets are the program's arguments (closed over, they would be baked into it as constants)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def run(xs, gs, dos, zero):
        def body(i, carry):
            xs, grads = carry
            new_xs, new_grads = [], []
            for x, (dx, _), g, do in zip(xs, grads, gs, dos):
                x = x.at[0, 0, 0].add((zero * dx[0, 0, 0]).astype(x.dtype))
                new_xs.append(x)
                new_grads.append(step(x, g, do))
            return tuple(new_xs), tuple(new_grads)

        grads = tuple((jnp.zeros_like(x), jnp.zeros_like(x)) for x in xs)
        return jax.lax.fori_loop(0, iters, body, (xs, grads))[1]

    args = tuple(tuple(s[k] for s in sets) for k in range(3)) + (jnp.zeros((), jnp.float32),)
    jax.block_until_ready(run(*args))  # compile
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / (iters * len(sets)) * 1e6


def step_row(ctx, hj, dev, shape, row):
    import jax

    dtype = row["dtype"]
    count = min(MAX_STEP_SETS, rotation_count(min_bytes(*shape, dtype, dtype, "fwd"), ctx.rotate_bytes))
    sets = [inputs(dev, shape, dtype, seed) for seed in range(count)]
    step = grad_step(lambda x, g: hj.hgrn(x, g)[0])
    ref = grad_step(assoc_scan_hgrn)(*sets[0])
    err = max(rel_err(a, b) for a, b in zip(step(*sets[0]), ref))
    del ref
    if err > TOL[dtype]:
        row["results"]["jax-auto"] = dict(status="mismatch", err=err, note=f"rel err {err:.2e} > {TOL[dtype]:g}")
        return row
    for i in range(max(5, count)):  # warm-up
        out = step(*sets[i % count])
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for i in range(5):
        out = step(*sets[i % count])
    jax.block_until_ready(out)
    n = max(10, min(ctx.args.host_steps, int(0.25 / max((time.perf_counter() - t0) / 5, 1e-7))))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(n):
            out = step(*sets[i % count])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n * 1e6)
    host = statistics.median(times)
    cell = row["results"]["jax-auto"] = dict(status="ok", err=err, host_us=host, steps=n, input_sets=count)
    try:
        iters = max(1, min(100, int(0.05e6 / (host * count))))
        cell.update(device_us=fori_step_us(step, sets, iters), loop_iters=iters)
    except Exception as e:
        cell["device_note"] = one_line(e)
    return row


def run_jax(ctx, fwdbwd_shapes, dtypes, step_shapes, copy_gbps, save):
    """Both JAX tables into ctx.results["jax"]; one line and nothing else when JAX cannot run."""
    import os

    from ..sections import measure_add

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import jax

        import hgrn_cupy.jax as hj
        dev = jax.devices("cpu" if ctx.device == "cpu" else "gpu")[0]
    except Exception as e:
        why = one_line(e)
        ctx.missing["jax"] = why
        log(f"skipping jax: {why}")
        return None
    ctx.versions["jax"] = jax.__version__
    res = ctx.results["jax"] = dict(device=dev.device_kind, jax=jax.__version__, fwdbwd=[], step=[], not_started=[])
    todo = [("fwdbwd", s, dt) for s in fwdbwd_shapes for dt in dtypes] + [("step", s, "bfloat16") for s in step_shapes]
    for kind, shape, dtype in todo:
        label = f"jax {kind} {'x'.join(map(str, shape))} {dtype}"
        if ctx.args.time_limit and ctx.elapsed() > ctx.args.time_limit:
            res["not_started"].append(label)
            continue
        t0 = time.perf_counter()
        try:
            row = floors(ctx, *shape, dtype, copy_gbps, measure_add)
            if kind == "fwdbwd":
                row = fwdbwd_row(ctx, hj, dev, shape, dtype, row)
            else:
                row = step_row(ctx, hj, dev, shape, row)
            res[kind].append(row)
            log(f"[{ctx.elapsed():6.0f}s] {label}: " + ", ".join(
                f"{n} {c['status'] if c['status'] != 'ok' else jax_cell_text(c)}" for n, c in row["results"].items()))
        except Exception as e:
            log(f"[{ctx.elapsed():6.0f}s] {label}: {one_line(e)}")
            ctx.after_error()
        finally:
            ctx.account("jax", timing_s=time.perf_counter() - t0)
            ctx.free()
        save()
        if ctx.broken:
            break
    return res


def jax_cell_text(c):
    if "host_us" in c:
        return f"host {c['host_us']:.1f} us" + (f", device {c['device_us']:.1f} us" if "device_us" in c else "")
    return f"{c['ms']:.3f} ms"
