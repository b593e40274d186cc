"""Both engines, forward and backward, with invalid cu_seqlens and the host check off, for
compute-sanitizer (not a pytest module): the kernels must stay inside every tensor and the guard must
turn every output into NaN.

    compute-sanitizer --tool memcheck python tests/sanitize_bad_offsets.py

CuPy's memory pool is off, so every array is an allocation of exactly its size.  Exits non-zero when an
output is not all NaN, or when a valid call is wrong.
"""
import sys

import cupy
import numpy as np

import hgrn_cupy as hc

from conftest import TOL  # tests/, the script's folder, is on sys.path

# [0]: no sequence against T = 20 (no engine kernel runs; the guard fills the outputs)
BAD = ([1, 5, 20], [0, 12, 5, 20], [0, 25, 20], [-4, 5, 20], [0, 5, 19], [0, 5, 1 << 40], [0])


def main():
    cupy.cuda.set_allocator(None)
    hc.config.check_cu_seqlens_values = False
    rng = np.random.default_rng(7)
    T, D = 20, 40
    x = cupy.asarray(rng.standard_normal((1, T, D)), dtype=cupy.float32)
    g = cupy.asarray(-np.logaddexp(0, -rng.standard_normal((1, T, D))), dtype=cupy.float32)
    counts = {len(offsets) - 1 for offsets in BAD} | {2}  # sequences per offsets list (2: the valid call)
    h0s = {n: cupy.asarray(rng.standard_normal((n, D)), dtype=cupy.float32) for n in sorted(counts)}
    failures = 0
    for engine, fwd in (("chunk", hc.chunk_hgrn), ("fused_recurrent", hc.fused_recurrent_hgrn)):
        for dtype in ("int32", "int64"):
            for offsets in BAD:
                cu = cupy.asarray(np.asarray(offsets, dtype=np.int64).astype(dtype))
                h0 = h0s[len(offsets) - 1]
                o, ht = fwd(x, g, h0, True, cu)
                dx, dg, dh0 = hc.hgrn_backward(g, x, x, ht, h0, cu, engine=engine)
                outs = {"o": o, "ht": ht, "dx": dx, "dg": dg, "dh0": dh0}
                bad = [k for k, v in outs.items() if not bool(cupy.isnan(v).all())]
                if bad:
                    failures += 1
                    print(f"{engine} {dtype} {offsets}: not all NaN: {bad}")
            cu, h0 = cupy.asarray(np.asarray([0, 7, 20]).astype(dtype)), h0s[2]
            o, _ = fwd(x, g, h0, True, cu)
            ref, _ = hc.naive_recurrent_hgrn(x.get(), g.get(), h0.get(), True, cu.get())
            err = float(np.linalg.norm(o.get() - ref) / np.linalg.norm(ref))
            if not err < TOL["float32"]:
                failures += 1
                print(f"{engine} {dtype} valid offsets: relative error {err}")
    cupy.cuda.runtime.deviceSynchronize()
    print("bad-offset launches:", 2 * 2 * len(BAD) * 2, "failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
