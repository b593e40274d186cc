#!/usr/bin/env python
"""Host time per call: planned calls against the checked path, for decoding and for small shapes.

    python benchmarks/experiments/host_time.py [--calls 2000] [--smoke]

A call whose arrays match an earlier valid call (framework, device, dtype, shape, strides, flags) runs
that call's plan: no checks, the launch prepared, outputs from the caller's allocator.  "checked" turns
the plan cache off, so every call validates, decides and prepares again.  Each figure is the wall time
of ``--calls`` calls queued back to back with one synchronisation at the end, divided by the number of
calls, best of three: for these small shapes the host is the bottleneck, so it is the host time.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


def library():
    """(settings that turn the plan cache off, a function that drops cached plans), under the current
    module names.  Re-point here after a rename."""
    from hgrn_cupy import plans

    return [(plans, "_key", lambda *args, **kwargs: None)], plans._plans.clear


def wall_us(torch, fn, calls):
    best = float("inf")
    for _ in range(3):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def calls_to_time(torch, hc, hct, cupy):
    """{row name: function of no arguments}, bf16 throughout."""
    F = torch.nn.functional
    bf = torch.bfloat16

    def inputs(B, T, D):
        x = torch.randn(B, T, D, device="cuda", dtype=bf)
        return x, F.logsigmoid(torch.randn(B, T, D, device="cuda")).to(bf), torch.randn(B, T, D, device="cuda", dtype=bf)
    x1, g1, _ = inputs(1, 1, 1024)
    h1 = torch.randn(1, 1024, device="cuda")
    cx, cg, ch = cupy.asarray(x1.float()), cupy.asarray(g1.float()), cupy.asarray(h1)  # CuPy has no bfloat16
    xs, gs, dos = inputs(4, 2048, 512)
    xb, gb, dob = inputs(1, 256, 1024)
    hb, dhtb = torch.randn(1, 1024, device="cuda"), torch.randn(1, 1024, device="cuda")
    ob = hc.hgrn(xb, gb, initial_state=hb)[0]

    def decode_torch_no_grad():
        with torch.no_grad():
            hct.fused_recurrent_hgrn(x1, g1, initial_state=h1, output_final_state=True)

    def chunk_pair():
        o = hc.chunk_hgrn(xs, gs)[0]
        hc.hgrn_backward(gs, o, dos, engine="chunk")
    return {
        "decode 1x1x1024, state in and out: fused_recurrent_hgrn (torch)":
            lambda: hc.fused_recurrent_hgrn(x1, g1, initial_state=h1, output_final_state=True),
        "decode 1x1x1024, state in and out: fused_recurrent_hgrn (CuPy, float32)":
            lambda: hc.fused_recurrent_hgrn(cx, cg, initial_state=ch, output_final_state=True),
        "decode 1x1x1024, state in and out: hgrn_cupy.torch, no_grad": decode_torch_no_grad,
        "chunk forward + backward 4x2048x512": chunk_pair,
        "backward 1x256x1024 with dht and h0, chunk":
            lambda: hc.hgrn_backward(gb, ob, dob, dht=dhtb, initial_state=hb, engine="chunk"),
        "backward 1x256x1024 with dht and h0, fused_recurrent":
            lambda: hc.hgrn_backward(gb, ob, dob, dht=dhtb, initial_state=hb, engine="fused_recurrent"),
    }


def main():
    checked, forget = library()
    args = c.parse(__doc__, [], "bf16:1x1x1024", lambda p: p.add_argument("--calls", type=int, default=2000))
    torch = c.torch_cuda()
    import cupy

    import hgrn_cupy as hc
    import hgrn_cupy.torch as hct

    calls = 50 if args.smoke else args.calls
    p = torch.cuda.get_device_properties(0)
    print(f"## Host time per call\n\n- GPU: {p.name}; host: {c.host_cpu()}\n- command: `python "
          f"{' '.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}` at commit {c.commit()}\n"
          f"- wall time of {calls} queued calls and one synchronisation, per call, best of 3\n")
    rows = []
    for name, fn in calls_to_time(torch, hc, hct, cupy).items():
        forget()
        planned = wall_us(torch, fn, calls)
        with c.patched(*checked):
            forget()
            slow = wall_us(torch, fn, calls)
        forget()
        rows.append([name, f"{planned:.1f}", f"{slow:.1f}"])
    c.table(["call", "planned, us", "checked, us"], rows)


if __name__ == "__main__":
    main()
