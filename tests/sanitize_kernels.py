"""Every kernel family on small shapes, for compute-sanitizer (not a pytest module): the chunk engine (its staged
forward and far prefetch too), the fused engine's thread walk, block walk (and the tuner's launch variants:
the other lane width, short windows, the staged and bulk forwards) and single step, forward and backward,
dense and varlen (an empty sequence included), with and without states, both directions of time; the
state-only passes and the composition of their maps (fold_maps on the GPU); the tuner's wait, with the
candidates it times queued behind it.

    compute-sanitizer --tool memcheck python tests/sanitize_kernels.py
    compute-sanitizer --tool racecheck python tests/sanitize_kernels.py

CuPy's memory pool is off, so every array is an allocation of exactly its size and the sanitizer sees any
access past an end.  Each result is compared with the float64 NumPy reference; exits non-zero on a wrong
result (the sanitizer's own summary says whether any access was bad).
"""
import sys

import cupy
import numpy as np

import hgrn_cupy as hc
from hgrn_cupy import plans, states, tuning
from hgrn_cupy.engines import VARIANTS, chunk

from conftest import TOL  # tests/, the script's folder, is on sys.path

# One type of each itemsize: bfloat16 takes float16's layouts and accesses (only its conversion differs).
DTYPES = ("float32", "float16", "float64")
# (B, T, D, cu_seqlens): thread walk (few channels), block walk (N * D of 8192), varlen with an empty sequence,
# one step (the single-step kernels, forward and backward).
CASES = ((2, 150, 72, None), (2, 200, 4096, None), (1, 300, 72, [0, 0, 100, 300]), (3, 1, 72, None))
# A float32 grid of L2_MIN_BLOCKS blocks (128 tiles, 8 chunks, the last one short): the far prefetch runs.
FAR_CASE = (2, 1001, 4096)
# The fused engine's launch variants (the tuner's; they run where the block walks do).
FUSED_VARIANTS = tuple(v for v in VARIANTS if VARIANTS[v][0] == "fused_recurrent")


def _err(a, ref):
    a = np.asarray(cupy.asnumpy(a), np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


def _far_prefetch(rng, failures):
    """The chunk forward with the far L2 prefetch on FAR_CASE, both directions of time; appends what fails
    to ``failures`` and returns the launches."""
    B, T, D = FAR_CASE
    if chunk.FAR not in chunk.variants(B, T, D, "float32", "float32", 0):
        raise SystemExit(f"{B}x{T}x{D} no longer takes the far prefetch: choose another FAR_CASE")
    x = cupy.asarray(rng.standard_normal((B, T, D)), cupy.float32)
    g = cupy.asarray(-np.logaddexp(0, -rng.standard_normal((B, T, D))), cupy.float32)
    xr, gr = (cupy.asnumpy(a).astype(np.float64) for a in (x, g))
    for reverse in (False, True):
        ref_o, ref_ht = hc.naive_recurrent_hgrn(xr, gr, None, True, None, reverse)
        o, ht = plans.forward(chunk.FAR, x, g, None, True, None, reverse)
        errs = {"o": _err(o, ref_o), "ht": _err(ht, ref_ht)}
        if not all(e < TOL["float32"] for e in errs.values()):
            failures.append(f"float32 {B}x{T}x{D} reverse={reverse} {chunk.FAR}: {errs}")
    return 2


def main():
    cupy.cuda.set_allocator(None)
    seed = 20261204
    rng = np.random.default_rng(seed)
    failures, launches = [], 0
    for dtype in DTYPES:
        for B, T, D, offsets in CASES:
            N = B if offsets is None else len(offsets) - 1
            xs = rng.standard_normal((B, T, D))
            gs = -np.logaddexp(0, -rng.standard_normal((B, T, D)))
            dos = rng.standard_normal((B, T, D))
            h0s, dhts = rng.standard_normal((N, D)), rng.standard_normal((N, D))
            x, g, do = (cupy.asarray(a).astype(dtype) for a in (xs, gs, dos))
            xr, gr, dor = (cupy.asnumpy(a).astype(np.float64) for a in (x, g, do))
            cu = None if offsets is None else cupy.asarray(offsets, dtype=cupy.int32)
            cur = None if offsets is None else np.asarray(offsets)
            # the state passes' own gates, near 0, so that A = exp(sum g) stays a normal number
            g_small = cupy.asarray(gs / T).astype(dtype)
            g_small_r = cupy.asnumpy(g_small).astype(np.float64)
            for reverse in (False, True):
                for with_states in (False, True):
                    h0 = cupy.asarray(h0s) if with_states else None
                    dht = cupy.asarray(dhts) if with_states else None
                    h0r = h0s if with_states else None
                    ref_o, ref_ht = hc.naive_recurrent_hgrn(xr, gr, h0r, True, cur, reverse)
                    ref_b = hc.naive_recurrent_hgrn_bwd(gr, ref_o, dor, dhts if with_states else None, h0r, cur,
                                                        reverse)
                    # the staged chunk forward everywhere; the fused variants where the block walks run
                    # (float64 has none)
                    launchers = ("chunk", chunk.STAGED, "fused_recurrent") + (
                        FUSED_VARIANTS if D == 4096 and dtype != "float64" else ())
                    for engine in launchers:
                        name = f"{dtype} {B}x{T}x{D} cu={offsets} reverse={reverse} states={with_states} {engine}"
                        o, ht = plans.forward(engine, x, g, h0, True, cu, reverse)
                        grads = plans.backward(engine, g, o, do, dht, h0, cu, reverse)
                        launches += 2
                        errs = {"o": _err(o, ref_o), "ht": _err(ht, ref_ht), "dx": _err(grads[0], ref_b[0]),
                                "dg": _err(grads[1], ref_b[1])}
                        if with_states:
                            errs["dh0"] = _err(grads[2], ref_b[2])
                        bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
                        if bad:
                            failures.append(f"{name}: {bad}")
                if offsets is None:
                    A, b = states.forward_states(x, g_small, reverse)
                    Ac, c = states.backward_states(g_small, do, reverse)
                    launches += 2
                    zero = np.zeros((B, D))
                    ref_b_only = hc.naive_recurrent_hgrn(xr, g_small_r, zero, True, None, reverse)[1]
                    ref_a = np.exp(g_small_r.sum(axis=1))
                    ref_o0 = hc.naive_recurrent_hgrn(xr, g_small_r, None, False, None, reverse)[0]
                    ref_c = hc.naive_recurrent_hgrn_bwd(g_small_r, ref_o0, dor, zero, zero, None, reverse)[2]
                    # the combine kernel as fold_maps: each row's map composed with itself
                    Af, bf = states.fold_maps(cupy.stack([A, A]), cupy.stack([b, b]), cupy)
                    launches += 1
                    ref_af = ref_a * ref_a
                    ref_bf = ref_a * ref_b_only + ref_b_only
                    for what, got, ref in (("A", A, ref_a), ("b", b, ref_b_only), ("A bwd", Ac, ref_a),
                                           ("c", c, ref_c), ("folded A", Af, ref_af), ("folded b", bf, ref_bf)):
                        e = _err(got, ref)
                        if not e < TOL[dtype]:
                            failures.append(f"states {dtype} {B}x{T}x{D} reverse={reverse} {what}: {e}")
    launches += _far_prefetch(rng, failures)
    tuning.settings.on_disk = False  # the tuner's wait kernel (hgrn_cupy.measure), decisions in memory only
    tuning.tune([(2, 200, 4096)], ("float32",))
    launches += 1
    cupy.cuda.runtime.deviceSynchronize()
    for f in failures:
        print(f)
    print(f"seed {seed}: kernel launches checked: {launches} failures: {len(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
