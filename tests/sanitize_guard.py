"""The varlen guard's kernels on a few good and bad offsets, for compute-sanitizer (not a pytest module).

    compute-sanitizer --tool memcheck python tests/sanitize_guard.py
    compute-sanitizer --tool racecheck python tests/sanitize_guard.py

CuPy's memory pool is off, so every array is its own allocation of exactly its size and the sanitizer
sees any access past an end: cu_seqlens of n entries, and buffers whose ends are their allocations' ends
(misaligned starts come from slicing a few bytes off the front).  Exits non-zero on a wrong result.
"""
import sys

import cupy
import numpy as np

from hgrn_cupy.engines import guard


def main():
    cupy.cuda.set_allocator(None)
    s = cupy.cuda.Stream(non_blocking=True)
    sizes = [(0, 1), (3, 15), (1, 17), (0, 64), (5, 1 << 20 | 3), (0, 0)]  # (bytes sliced off the front, nbytes)
    cases = [([0, 3, 3, 10], 10, 0), ([0, 10], 10, 0), ([0], 0, 0), ([0, 4, 3, 10], 10, 1), ([1, 10], 10, 1),
             ([0, 11], 10, 1), ([0, 5, 9], 10, 1), ([], 0, 1), (list(range(3000)), 2999, 0),
             (list(range(3000)) + [2998], 2998, 1)]
    failures = 0
    with s:
        for dtype in ("int32", "int64"):
            g = guard.prepare(cupy.cuda.Device().id, dtype)
            for cu_host, T, want in cases:
                cu = cupy.asarray(np.asarray(cu_host, dtype))
                flag = cupy.empty(1, cupy.int32)
                allocs = [cupy.full(lead + nb, 0x5A, cupy.uint8) for lead, nb in sizes]
                views = [a[lead:] for a, (lead, _) in zip(allocs, sizes)]
                g.check(s.ptr, cu.data.ptr if cu.size else 0, len(cu_host), T, flag.data.ptr)
                g.fill(s.ptr, flag.data.ptr, [(v.data.ptr if v.size else 0, v.size) for v in views])
                s.synchronize()
                got = int(flag.get()[0])
                fill = 0xFF if want else 0x5A
                ok = got == want and all(bool((v == fill).all()) for v in views if v.size)
                ok = ok and all(bool((a[:lead] == 0x5A).all()) for a, (lead, _) in zip(allocs, sizes))
                if not ok:
                    failures += 1
                    print(f"FAIL {dtype} {cu_host[:8]} T={T}: flag {got}, want {want}")
    print("sanitize_guard:", "ok" if not failures else f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
