"""Context parallelism on one GPU: a W-way split in time run back to back against one call on the whole sequence.

    python benchmarks/experiments/cp_split.py [--quick] [--shapes 1x1048576x1024,8x131072x2048] [--splits 2,4,8]

Each of the W "ranks" does what ``hgrn_cupy.distributed.torch.hgrn`` does on its slice, with the all_gather
replaced by a local stack of the ranks' payloads: forward, the state pass (``forward_states``), the
composition of its predecessors, the slice's forward from that state; backward, the state pass over (g, do),
the composition of its successors, the slice's backward.  The total over the W ranks is what one GPU spends
on the same work (a real run spreads it over W GPUs, each taking about total / W plus the collective).

Reported, per shape (bf16) and W: split total / single call, forward and forward+backward (targets: <= 1.7
and <= 1.5; the ideal is 5/3 and 12/8 of the floor, as the split reads x and g twice forward and g and do
twice backward), the state passes' time per rank and their read bandwidth against the copy floor (a
device-to-device copy, bytes read + written over time).  The ratios come twice: timed with CUDA events
around the calls from an idle GPU (host time included wherever the Python of the W ranks outruns their
kernels: one process adds up what W hosts would each spend on their own), and from CUDA graphs of the
same work (device time only, split and single call alike).  Prints a Markdown table naming the GPU.
Standalone: needs torch with CUDA and hgrn_cupy importable.
"""
from __future__ import annotations

import argparse

import torch

import hgrn_cupy as hc
from hgrn_cupy.distributed import compose
from hgrn_cupy.states import backward_states, forward_states


def timed(fn, reps, warmup=2):
    """Median milliseconds of ``fn()`` over ``reps`` runs (CUDA events), after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graphed(fn, reps):
    """Median milliseconds of one replay of a CUDA graph of ``fn()`` (captured after a warm-up on a side
    stream): the device time of the work, without the host time of the calls that queue it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    result = timed(graph.replay, reps)
    del graph
    return result


def cuts(T, W):
    base, extra = divmod(T, W)
    out, t = [], 0
    for r in range(W):
        n = base + (r < extra)
        out.append(slice(t, t + n))
        t += n
    return out


def split_forward(x, g, W):
    """Every rank's forward, back to back; returns the slices' outputs and incoming states."""
    parts = [(x[:, s], g[:, s]) for s in cuts(x.shape[1], W)]
    maps = [forward_states(xs, gs) for xs, gs in parts]
    G = torch.stack([torch.stack(m) for m in maps])  # the all_gather: [W, 2, B, D]
    outs, states = [], []
    for p, (xs, gs) in enumerate(parts):
        s = compose.incoming_state(G[:, 0], G[:, 1], p, torch)
        states.append(s)
        outs.append(hc.hgrn(xs, gs, initial_state=s)[0])
    compose.final_state(G[:, 0], G[:, 1], torch)
    return outs, states


def split_backward(g, outs, states, do, W):
    parts = [(g[:, s], do[:, s]) for s in cuts(g.shape[1], W)]
    maps = [backward_states(gs, ds) for gs, ds in parts]
    G = torch.stack([torch.stack(m) for m in maps])
    for p, ((gs, ds), o, s) in enumerate(zip(parts, outs, states)):
        lam = compose.outgoing_gradient(G[:, 0], G[:, 1], p, None, torch)
        hc.hgrn_backward(gs, o, ds, dht=lam, initial_state=s)


def bench_shape(B, T, D, splits, reps):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, D, device="cuda", generator=gen).bfloat16()
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, D, device="cuda", generator=gen)).bfloat16()
    do = torch.randn(B, T, D, device="cuda", generator=gen).bfloat16()
    nbytes = x.numel() * x.element_size()

    buf = torch.empty_like(x)
    copy_ms = timed(lambda: buf.copy_(x), reps)
    copy_bw = 2 * nbytes / copy_ms / 1e6  # GB/s, read + write
    del buf

    o_full = hc.hgrn(x, g)[0]
    fwd_ms = timed(lambda: hc.hgrn(x, g), reps)
    bwd_ms = timed(lambda: hc.hgrn_backward(g, o_full, do), reps)
    fwd_dev, bwd_dev = graphed(lambda: hc.hgrn(x, g), reps), graphed(lambda: hc.hgrn_backward(g, o_full, do), reps)
    rows = []
    for W in splits:
        fwd_split = timed(lambda: split_forward(x, g, W), reps)
        outs, states = split_forward(x, g, W)
        bwd_split = timed(lambda: split_backward(g, outs, states, do, W), reps)
        fwd_split_dev = graphed(lambda: split_forward(x, g, W), reps)
        bwd_split_dev = graphed(lambda: split_backward(g, outs, states, do, W), reps)
        s0 = cuts(T, W)[0]
        xs, gs, ds = x[:, s0], g[:, s0], do[:, s0]
        st_f = timed(lambda: forward_states(xs, gs), reps)
        st_b = timed(lambda: backward_states(gs, ds), reps)
        read = 2 * xs.numel() * xs.element_size()
        rows.append(dict(W=W, fwd=fwd_split / fwd_ms, fwdbwd=(fwd_split + bwd_split) / (fwd_ms + bwd_ms),
                         fwd_dev=fwd_split_dev / fwd_dev,
                         fwdbwd_dev=(fwd_split_dev + bwd_split_dev) / (fwd_dev + bwd_dev),
                         fwd_split=fwd_split, bwd_split=bwd_split, st_f=st_f, st_b=st_b,
                         bw_f=read / st_f / 1e6, bw_b=read / st_b / 1e6))
        del outs, states
    return dict(shape=f"{B}x{T}x{D}", copy_bw=copy_bw, fwd_ms=fwd_ms, bwd_ms=bwd_ms,
                fwd_floor=3 * nbytes / copy_bw / 1e6, bwd_floor=5 * nbytes / copy_bw / 1e6, rows=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1x1048576x1024,8x131072x2048")
    ap.add_argument("--splits", default="2,4,8")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions (a smoke run)")
    a = ap.parse_args()
    shapes = "1x65536x1024,2x16384x2048" if a.quick else a.shapes
    reps = 3 if a.quick else a.reps
    splits = [int(w) for w in a.splits.split(",")]
    print(f"## Context-parallel split on one GPU: {torch.cuda.get_device_name()}, bf16\n")
    print("| shape | W | split/single fwd | split/single fwd+bwd | device (graphs): fwd | fwd+bwd | split fwd ms | "
          "split bwd ms | state pass fwd ms (per rank) | GB/s (x copy floor) | state pass bwd ms | "
          "GB/s (x copy floor) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in shapes.split(","):
        B, T, D = (int(n) for n in spec.split("x"))
        r = bench_shape(B, T, D, splits, reps)
        for row in r["rows"]:
            print(f"| {r['shape']} | {row['W']} | {row['fwd']:.3f} | {row['fwdbwd']:.3f} | {row['fwd_dev']:.3f} | "
                  f"{row['fwdbwd_dev']:.3f} | {row['fwd_split']:.3f} | "
                  f"{row['bwd_split']:.3f} | {row['st_f']:.3f} | "
                  f"{row['bw_f']:.0f} ({row['bw_f'] / r['copy_bw']:.2f}) | "
                  f"{row['st_b']:.3f} | {row['bw_b']:.0f} ({row['bw_b'] / r['copy_bw']:.2f}) |")
        print(f"\n{r['shape']}: single call fwd {r['fwd_ms']:.3f} ms (floor {r['fwd_floor']:.3f}), bwd "
              f"{r['bwd_ms']:.3f} ms (floor {r['bwd_floor']:.3f}); copy {r['copy_bw']:.0f} GB/s\n")


if __name__ == "__main__":
    main()
