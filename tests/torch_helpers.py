"""Shared plumbing of the ``hgrn_cupy.torch`` tests: the function table, the ``gen`` fixture, the input
layouts and random inputs in them (CPU or CUDA), the float64 NumPy reference, and the check of values and
gradients against it.

Test modules import what they use by name (``from torch_helpers import ...``), fixtures included.
"""
import numpy as np
import pytest
from conftest import TOL, rel_err, to_numpy

torch = pytest.importorskip("torch")
import hgrn_cupy as hc  # noqa: E402
import hgrn_cupy.torch as htorch  # noqa: E402

F = torch.nn.functional
FUNCTIONS = {"hgrn": htorch.hgrn, "chunk": htorch.chunk_hgrn, "fused_recurrent": htorch.fused_recurrent_hgrn}
GPU_ENGINES = ["chunk", "fused_recurrent"]
REVERSE = [pytest.param(False, id="forward"), pytest.param(True, id="reverse")]
LAYOUTS = ["dense", "varlen"]


@pytest.fixture
def gen():
    """A torch generator with a fresh seed, printed so that a failing draw can be replayed."""
    seed = int(np.random.SeedSequence().generate_state(1)[0])
    print(f"torch seed: {seed}")
    return torch.Generator().manual_seed(seed)


LAYOUT = {  # (B, T, D, cu_seqlens offsets or None); each varlen layout holds an empty sequence
    ("dense", "short"): (2, 9, 5, None),
    ("varlen", "short"): (1, 9, 4, (0, 3, 3, 9)),
    ("dense", "medium"): (3, 37, 19, None),
    ("varlen", "medium"): (1, 53, 19, (0, 11, 11, 40, 53)),
    ("dense", "long"): (2, 700, 67, None),  # several chunks; odd channel count
    ("varlen", "long"): (1, 700, 67, (0, 100, 100, 457, 700)),
}


def make_inputs(gen, kind, dtype, device="cpu", state_dtype=None, size="medium"):
    """x = randn, g = logsigmoid(randn) (never zeros), h0 = randn; cu_seqlens as int64 (int32 on
    the GPU, to cover both).  Drawn on the CPU with ``gen``, then moved."""
    B, T, D, offsets = LAYOUT[kind, size]
    dt = getattr(torch, dtype)
    N = B if offsets is None else len(offsets) - 1
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64).to(device, dt)
    g = F.logsigmoid(torch.randn(B, T, D, generator=gen, dtype=torch.float64)).to(device, dt)
    sdt = getattr(torch, state_dtype or ("float64" if dtype == "float64" else "float32"))
    h0 = torch.randn(N, D, generator=gen, dtype=torch.float64).to(device, sdt)
    cu = None
    if offsets is not None:
        cu = torch.tensor(offsets, dtype=torch.int32 if device != "cpu" else torch.int64, device=device)
    return x, g, h0, cu


def leaf(a):
    return None if a is None else a.detach().clone().requires_grad_()


def np_or_none(a):
    return None if a is None else to_numpy(a)


def reference(x, g, h0, cu, reverse, o, do, dht):
    """Float64 reference of the forward from the inputs, and of the backward from the library's
    own o (the backward reads its states from o, so both see the same rounded states)."""
    cu_np = None if cu is None else cu.cpu().numpy()
    o_ref, ht_ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), np_or_none(h0), True, cu_np, reverse)
    dx, dg, dh0 = hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do), np_or_none(dht),
                                               np_or_none(h0), cu_np, reverse)
    return {"o": o_ref, "ht": ht_ref, "dx": dx, "dg": dg, "dh0": dh0}


def run_and_check(fn, x, g, h0, cu, reverse, gen):
    """Forward, backward from random cotangents of o and ht, and every result against the
    reference at the tolerance of the least precise dtype involved."""
    x, g, h0 = leaf(x), leaf(g), leaf(h0)
    o, ht = fn(x, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, reverse=reverse)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
    dht = torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(ht.device, ht.dtype)
    torch.autograd.backward([o, ht], [do, dht])

    acc = torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32
    assert o.dtype == x.dtype and o.shape == x.shape and o.device == x.device
    assert ht.dtype == acc and ht.shape == h0.shape
    assert (x.grad.dtype, g.grad.dtype, h0.grad.dtype) == (x.dtype, g.dtype, h0.dtype)

    ref = reference(x, g, h0, cu, reverse, o, do, dht)
    got = {"o": o, "ht": ht, "dx": x.grad, "dg": g.grad, "dh0": h0.grad}
    names = {str(a.dtype).replace("torch.", "") for a in (x, g, h0)}
    tol = max(TOL[n] for n in names)
    errors = {k: rel_err(v, ref[k]) for k, v in got.items()}
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors over {tol:g}: {bad}"


def cuda_inputs(gen, kind, dtype):
    return make_inputs(gen, kind, dtype, device="cuda")
