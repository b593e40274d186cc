"""Context-parallel HGRN for torch (``hgrn_cupy.distributed.torch``) against one call on the whole sequence.

CPU: ``torch.multiprocessing`` (spawn) with gloo on loopback, world sizes 1, 2, 3, 4 and 7 (T not divisible
by W); each spawn runs every case (dtypes, reverse, initial state on the first rank / on every rank / none,
final state with per-rank cotangents) and each rank checks its own slice of o, dx, dg, and ht and dh0,
against the float64 NumPy reference (``naive_recurrent_hgrn`` / ``_bwd``).  GPU (marked): several processes
sharing one GPU over gloo with CUDA tensors against ``hgrn_cupy.torch.hgrn`` on the whole sequence; NCCL
across GPUs where there are at least two.  Seeds are printed with every failure.
"""
import os
import socket
import traceback

import numpy as np
import pytest

from conftest import TOL, rel_err, to_numpy

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import hgrn_cupy as hc  # noqa: E402

B, D = 2, 5
T_OF = {1: 13, 2: 16, 3: 20, 4: 22, 7: 29}  # total steps per world size: uneven slices where W > 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bounds(T, W):
    """Slice boundaries: as even as possible, the first T % W ranks one step longer."""
    base, extra = divmod(T, W)
    sizes = [base + (r < extra) for r in range(W)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(int)


def full_inputs(seed, T, W):
    """The whole sequence's inputs and cotangents in float64 (every rank makes the same ones)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D))
    g = np.log(1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, D)) - 1.0)))
    h0 = rng.standard_normal((B, D))
    do = rng.standard_normal((B, T, D))
    dhts = rng.standard_normal((W, B, D))  # each rank's own cotangent of ht
    return x, g, h0, do, dhts


def cases():
    for dtype in ("float32", "float64", "bfloat16"):
        for reverse in (False, True):
            for h0_on in ("none", "first", "every"):
                for final in (False, True):
                    yield dtype, reverse, h0_on, final


def run_case(rank, W, case, seed, device):
    """One case on this rank; returns a failure message or None."""
    from hgrn_cupy.distributed.torch import hgrn

    dtype, reverse, h0_on, final = case
    T = T_OF[W]
    cut = bounds(T, W)
    x64, g64, h064, do64, dhts = full_inputs(seed, T, W)
    tdt = getattr(torch, dtype)
    acc = torch.float64 if dtype == "float64" else torch.float32
    sl = slice(cut[rank], cut[rank + 1])
    first = (W - 1 if reverse else 0) == rank
    x = torch.tensor(x64[:, sl]).to(device, tdt).requires_grad_()
    g = torch.tensor(g64[:, sl]).to(device, tdt).requires_grad_()
    h0 = None
    if h0_on == "every" or (h0_on == "first" and first):
        h0 = torch.tensor(h064, dtype=acc, device=device).requires_grad_()
    o, ht = hgrn(x, g, h0, final, reverse=reverse)
    loss = (o.double() * torch.tensor(do64[:, sl], device=device)).sum()
    if final:
        loss = loss + (ht.double() * torch.tensor(dhts[rank], device=device)).sum()
    loss.backward()

    # the reference: the whole sequence on the rounded inputs, ht's cotangent summed over the ranks
    xr, gr = to_numpy(torch.tensor(x64).to(tdt)), to_numpy(torch.tensor(g64).to(tdt))
    h0r = None if h0_on == "none" else to_numpy(torch.tensor(h064).to(acc))
    o_ref, ht_ref = hc.naive_recurrent_hgrn(xr, gr, h0r, True, reverse=reverse)
    dx_ref, dg_ref, dh0_ref = hc.naive_recurrent_hgrn_bwd(gr, o_ref, do64, dhts.sum(0) if final else None, h0r,
                                                          reverse=reverse)
    tol = TOL[dtype]
    errs = {"o": rel_err(o, o_ref[:, sl]), "dx": rel_err(x.grad, dx_ref[:, sl]), "dg": rel_err(g.grad, dg_ref[:, sl])}
    if final:
        errs["ht"] = rel_err(ht, ht_ref)
        if ht.dtype != acc:
            return f"ht dtype {ht.dtype}"
    elif ht is not None:
        return "ht returned without output_final_state"
    if h0 is not None:
        if first:
            errs["dh0"] = rel_err(h0.grad, dh0_ref)
        elif h0.grad is not None:
            return "initial_state off the first rank received a gradient"
    if o.dtype != tdt or x.grad.dtype != tdt:
        return f"dtypes o {o.dtype}, dx {x.grad.dtype}"
    bad = {k: v for k, v in errs.items() if not v < tol}
    return f"rel errors above {tol}: {bad}" if bad else None


def check_argument_errors():
    from hgrn_cupy.distributed.torch import hgrn

    x = torch.zeros(2, 3, 4)
    for kwargs, exc, text in (
            (dict(cu_seqlens=torch.tensor([0, 3])), ValueError, "cu_seqlens is not supported"),
            (dict(g=torch.zeros(2, 3, 5)), ValueError, "g must have shape"),
            (dict(x=torch.zeros(3, 4), g=torch.zeros(3, 4)), ValueError, "x must have 3 dimensions"),
            (dict(initial_state=torch.zeros(3, 4)), ValueError, r"initial_state must have shape \[N, D\]"),
            (dict(g=torch.zeros(2, 3, 4, dtype=torch.int32)), TypeError, "g has dtype"),
            (dict(reverse=1), TypeError, "reverse must be a bool"),
            (dict(output_final_state=None), TypeError, "output_final_state must be a bool"),
            (dict(x=np.zeros((2, 3, 4))), TypeError, "x must be a torch.Tensor"),
            (dict(g=torch.zeros(2, 3, 4).tolist()), TypeError, "g must be a torch.Tensor"),
            (dict(x=torch.zeros(2, 3, 4).to_sparse()), TypeError, r"^x is .*sparse")):
        args = dict(x=x, g=torch.zeros(2, 3, 4))
        args.update(kwargs)
        with pytest.raises(exc, match=text):
            hgrn(**args)
    o, _ = hgrn(x, torch.zeros(2, 3, 4), reverse=np.bool_(True))  # NumPy bools pass, as at the top level
    assert o.shape == x.shape


def worker(rank, W, port, seed, device, failures):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    try:
        if device == "cuda":
            torch.cuda.set_device(0)
        if W == 1 and device == "cpu":
            check_argument_errors()
        for case in cases():
            try:  # every rank runs every case (each holds collectives), so errors are collected, not raised
                msg = run_case(rank, W, case, seed, device)
            except Exception:
                msg = traceback.format_exc()
            if msg:
                failures.put(f"W={W} rank={rank} case={case} seed={seed}: {msg}")
    finally:
        dist.destroy_process_group()


def spawn(W, device="cpu", seed=None):
    import torch.multiprocessing as mp

    seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else seed
    ctx = mp.get_context("spawn")
    failures = ctx.SimpleQueue()
    mp.spawn(worker, args=(W, free_port(), seed, device, failures), nprocs=W, join=True)
    msgs = []
    while not failures.empty():
        msgs.append(failures.get())
    assert not msgs, f"seed {seed}:\n" + "\n".join(msgs[:10])


@pytest.mark.parametrize("W", [1, 2, 3, 4, 7])
def test_gloo_cpu(W):
    spawn(W)


# ---------------------------------------------------------------------------------------------
# GPU

@pytest.mark.gpu
@pytest.mark.parametrize("W", [3])
def test_gloo_processes_sharing_one_gpu(W):
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    spawn(W, device="cuda")


def _nccl_worker(rank, W, port, seed, failures):
    from hgrn_cupy.distributed.torch import hgrn
    from hgrn_cupy.torch import hgrn as single

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    try:
        T = 4096 * W + 37
        cut = bounds(T, W)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(4, T, 256, generator=gen).bfloat16()
        g = torch.nn.functional.logsigmoid(torch.randn(4, T, 256, generator=gen)).bfloat16()
        h0, do = torch.randn(4, 256, generator=gen), torch.randn(4, T, 256, generator=gen).bfloat16()
        dht = torch.randn(4, 256, generator=gen)
        xs, gs = (a[:, cut[rank]:cut[rank + 1]].cuda().requires_grad_() for a in (x, g))
        h0r = h0.cuda().requires_grad_()
        o, ht = hgrn(xs, gs, h0r, True)
        torch.autograd.backward((o, ht), (do[:, cut[rank]:cut[rank + 1]].cuda(), dht.cuda() / W))
        xf, gf, h0f = (a.cuda().requires_grad_() for a in (x, g, h0))
        of, htf = single(xf, gf, h0f, True)
        torch.autograd.backward((of, htf), (do.cuda(), dht.cuda()))
        sl = slice(cut[rank], cut[rank + 1])
        errs = {"o": rel_err(o, of[:, sl]), "ht": rel_err(ht, htf), "dx": rel_err(xs.grad, xf.grad[:, sl]),
                "dg": rel_err(gs.grad, gf.grad[:, sl])}
        if rank == 0:
            errs["dh0"] = rel_err(h0r.grad, h0f.grad)
        bad = {k: v for k, v in errs.items() if not v < TOL["bfloat16"]}
        if bad:
            failures.put(f"rank {rank} seed {seed}: {bad}")
    except Exception:
        failures.put(traceback.format_exc())
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_nccl_across_gpus():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("NCCL across GPUs needs at least two CUDA devices")
    import torch.multiprocessing as mp

    W, seed = torch.cuda.device_count(), 1234
    failures = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_nccl_worker, args=(W, free_port(), seed, failures), nprocs=W, join=True)
    msgs = []
    while not failures.empty():
        msgs.append(failures.get())
    assert not msgs, "\n".join(msgs)
