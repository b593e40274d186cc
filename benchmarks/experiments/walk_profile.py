#!/usr/bin/env python
"""A few launches of one experimental block walk (or of the practical floor's add) for Nsight Compute.

    ncu --profile-from-start off --launch-count 1 \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,... \\
        python benchmarks/experiments/walk_profile.py --case bf16:8x4096x2048 --what block_pipe:"L8 W8 S8 N2 B2 H2"
    python benchmarks/experiments/walk_profile.py --case bf16:8x4096x2048 --what add

``--what`` names a variant of ``block_pipe.py`` (the staged walk; "L8 W8 S8 N2 B2 H2" is the library's
staged forward), of ``tma_walk.py`` (the walk fed by tensor-map copies) or of ``stream_schedule.py`` (the
chunk engine's geometry with no recurrence; ``chunk_profile.py`` has the chunk kernel and its bounds) as
``script:variant``, or ``add`` (``torch.add(x, g, out=o)``, the practical floor).  Runs it three times
on one input set, then once more between ``cudaProfilerStart`` and ``cudaProfilerStop``, so that a
profiler started with ``--profile-from-start off`` sees that warm fourth launch and none of the inputs'
kernels; only the named variant's kernel is compiled.  Prints nothing but what it ran: the numbers are the profiler's.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import block_pipe  # noqa: E402
import stream_schedule  # noqa: E402
import tma_walk  # noqa: E402

SCRIPTS = {"block_pipe": block_pipe, "tma_walk": tma_walk, "stream_schedule": stream_schedule}


def walk_call(torch, case, what):
    """``fwd(set)`` of the variant ``what`` ("script:variant"), its one kernel compiled alone."""
    import cupy

    script, _, variant = what.partition(":")
    mod = SCRIPTS.get(script)
    if mod is None or variant not in mod.VARIANTS:
        sys.exit(f"walk_profile: unknown --what {what!r}; scripts {list(SCRIPTS)} with their VARIANTS")
    if mod is stream_schedule:  # its launcher picks the instantiation by the input's dtype
        kernel, *rest = mod.VARIANTS[variant]
        name = mod.name_of(kernel, mod.ELEMENT[case.dtype], *rest)
        module = cupy.RawModule(code=mod.source(), options=mod.OPTIONS, name_expressions=[name])
        from hgrn_cupy import nvrtc

        return mod.launcher(torch, module, variant, torch.cuda.get_device_properties(0).multi_processor_count, nvrtc)
    name = mod.name_of(case.dtype, *mod.VARIANTS[variant])
    module = cupy.RawModule(code=mod.source(), options=mod.OPTIONS, name_expressions=[name])
    return mod.launcher(torch, module, variant)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", type=c.Case, default=c.Case("bf16:8x4096x2048"))
    p.add_argument("--what", default="add", help='"add", or SCRIPT:VARIANT, SCRIPT one of ' + ", ".join(SCRIPTS))
    args = p.parse_args()
    torch = c.torch_cuda()
    (s,) = c.make_sets(torch, args.case, count=1)
    if args.what == "add":
        out = torch.empty_like(s["x"])
        call = lambda: torch.add(s["x"], s["g"], out=out)  # noqa: E731
    else:
        fwd = walk_call(torch, args.case, args.what)
        call = lambda: fwd(s)  # noqa: E731
    for _ in range(3):
        call()
        torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"ran 4 x {args.what} on {args.case.name}")


if __name__ == "__main__":
    main()
