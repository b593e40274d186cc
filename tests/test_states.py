"""The state-only passes (``hgrn_cupy.states``, ``hgrn_cupy/kernels/states.cu``) against a sequential float64 walk.

CPU: the NumPy fold, the identity the backward pass rests on (``dh0 = A * dht + c``), argument errors, the
split plan, and the NVRTC build of every instantiation (no GPU needed).  GPU (marked, skipped without
one): the kernels for every dtype class, odd D, strided and misaligned views, reverse, T = 0 and 1, T far
beyond one split, outputs NaN-poisoned first.  Seeds are printed in every failure message.
"""
import itertools
import zlib

import numpy as np
import pytest

from conftest import TOL, rel_err

import hgrn_cupy as hc
from hgrn_cupy import states


def walk(x, g, reverse=False, backward=False):
    """(A, b) in float64 by the definition, one step at a time (v = x forward, do backward)."""
    B, T, D = x.shape
    a = np.exp(np.asarray(g, np.float64))
    v = np.asarray(x, np.float64)
    A, b = np.ones((B, D)), np.zeros((B, D))
    steps = range(T - 1, -1, -1) if reverse != backward else range(T)
    for t in steps:
        b = a[:, t] * (b + v[:, t]) if backward else a[:, t] * b + v[:, t]
        A = a[:, t] * A
    return A, b


def inputs(seed, B, T, D, gate_scale=None):
    """x, g, do in float64; gates of total size about -gate_scale (A stays a normal float32) or logsigmoid."""
    rng = np.random.default_rng(seed)
    x, do = rng.standard_normal((B, T, D)), rng.standard_normal((B, T, D))
    if gate_scale is None:
        g = -np.log1p(np.exp(-rng.standard_normal((B, T, D)) - 1.0))
    else:
        g = -rng.random((B, T, D)) * (2.0 * gate_scale / max(T, 1))
    return x, g, do


# ---------------------------------------------------------------------------------------------
# CPU

@pytest.mark.parametrize("T", [0, 1, 2, 5, 64, 131])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd_time", "reverse"])
def test_cpu_matches_walk(T, reverse):
    seed = 1000 + T
    x, g, do = inputs(seed, 3, T, 7)
    A, b = states.forward_states(x, g, reverse)
    A_ref, b_ref = walk(x, g, reverse)
    assert rel_err(A, A_ref) < TOL["float64"] and rel_err(b, b_ref) < TOL["float64"], f"seed {seed}"
    A2, c = states.backward_states(g, do, reverse)
    A2_ref, c_ref = walk(do, g, reverse, backward=True)
    assert rel_err(A2, A2_ref) < TOL["float64"] and rel_err(c, c_ref) < TOL["float64"], f"seed {seed}"


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd_time", "reverse"])
def test_backward_pass_gives_dh0(reverse):
    """The backward's dh0 with dht = lam is A * lam + c, for any lam: what the ranks compose."""
    seed = 7
    x, g, do = inputs(seed, 2, 37, 5)
    h0 = np.random.default_rng(seed).standard_normal((2, 5))
    o, _ = hc.naive_recurrent_hgrn(x, g, h0, reverse=reverse)
    A, c = states.backward_states(g, do, reverse)
    for lam in (np.zeros((2, 5)), np.random.default_rng(seed + 1).standard_normal((2, 5))):
        _, _, dh0 = hc.naive_recurrent_hgrn_bwd(g, o, do, lam, h0, reverse=reverse)
        assert rel_err(A * lam + c, dh0) < TOL["float64"], f"seed {seed}"
    A_f, b = states.forward_states(x, g, reverse)
    _, ht = hc.naive_recurrent_hgrn(x, g, h0, True, reverse=reverse)
    assert rel_err(A_f * h0 + b, ht) < TOL["float64"], f"seed {seed}"


def test_torch_cpu_dtypes():
    torch = pytest.importorskip("torch")
    x, g, do = inputs(3, 2, 20, 6)
    for dt, acc in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float32),
                    (torch.float64, torch.float64)):
        xt, gt = torch.tensor(x).to(dt), torch.tensor(g).to(dt)
        A, b = states.forward_states(xt, gt)
        assert A.dtype == b.dtype == acc and A.shape == (2, 6) and A.device.type == "cpu"
        A_ref, b_ref = walk(xt.double().numpy(), gt.double().numpy())
        assert rel_err(b, b_ref) < TOL[str(acc).split(".")[1]]
    A, b = states.forward_states(torch.tensor(x, dtype=torch.bfloat16), torch.tensor(g))  # mixed: float64 states
    assert A.dtype == torch.float64


def test_fold_maps_is_the_sequential_composition():
    rng = np.random.default_rng(11)
    for K in (1, 2, 3, 7, 8, 13):
        A, b = rng.random((K, 4)), rng.standard_normal((K, 4))
        A_ref, b_ref = np.ones(4), np.zeros(4)
        for k in range(K):
            A_ref, b_ref = A[k] * A_ref, A[k] * b_ref + b[k]
        Af, bf = states.fold_maps(A, b, np)
        assert np.allclose(Af, A_ref) and np.allclose(bf, b_ref), K


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("fw_name", ["torch", "cupy"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fold_maps_on_the_gpu_is_the_sequential_composition(fw_name, dtype):
    """CUDA arrays take the combine kernel: the same maps as the NumPy fold, for K on both sides of a warp,
    210 channels (not a multiple of 32) and a strided view; outputs NaN-poisoned first."""
    xp = pytest.importorskip(fw_name)
    if fw_name == "torch" and not xp.cuda.is_available():
        pytest.skip("torch has no CUDA")
    seed = zlib.crc32(repr((fw_name, dtype)).encode())
    rng = np.random.default_rng(seed)
    dev = (lambda a: xp.tensor(a, device="cuda")) if fw_name == "torch" else xp.asarray
    for K in (2, 3, 7, 8, 13, 33, 300):
        A, b = rng.random((K, 3, 140)).astype(dtype), rng.standard_normal((K, 3, 140)).astype(dtype)
        for view in (lambda a: a[:, :, :70], lambda a: a[:, :, ::2]):
            A_ref, b_ref = states.fold_maps(view(A), view(b), np)
            Af, bf = states.fold_maps(view(dev(A)), view(dev(b)), xp)
            assert type(Af) is type(dev(A)) and tuple(Af.shape) == (3, 70)
            got_a, got_b = (np.asarray(t.cpu() if fw_name == "torch" else t.get()) for t in (Af, bf))
            assert rel_err(got_a, A_ref) < TOL[dtype] and rel_err(got_b, b_ref) < TOL[dtype], f"K {K}, seed {seed}"


def test_nan_reaches_the_map():
    x, g, do = inputs(5, 1, 9, 3)
    g[0, 4, 1] = np.nan
    A, b = states.forward_states(x, g)
    assert np.isnan(A[0, 1]) and np.isnan(b[0, 1]) and not np.isnan(A[0, [0, 2]]).any()
    g[0, 4, 1] = -np.inf  # a full reset: the map forgets everything before it
    A, b = states.forward_states(x, g)
    assert A[0, 1] == 0 and np.isclose(b[0, 1], walk(x[:, 4:], g[:, 4:])[1][0, 1])


def test_argument_errors():
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="g must have shape"):
        states.forward_states(x, np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="do must have 3 dimensions"):
        states.backward_states(np.zeros((3, 4)), np.zeros((3, 4)))
    with pytest.raises(TypeError, match="x has dtype int64"):
        states.forward_states(np.zeros((2, 3, 4), np.int64), x)
    with pytest.raises(TypeError, match="reverse must be a bool"):
        states.forward_states(x, x, reverse=1)
    with pytest.raises(TypeError, match="^x must be a NumPy, CuPy, PyTorch or JAX array, got list"):
        states.forward_states([[[0.0]]], x)


def test_argument_errors_across_frameworks():
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match="^g is a numpy array but do is a torch array"):
        states.backward_states(np.zeros((2, 3, 4)), torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="^x must be a NumPy, CuPy or PyTorch array, got .*hgrn_cupy.distributed.jax"):
        states.forward_states(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)))


def test_split_plan():
    q = states.WARPS * states.UNROLL
    assert states.split_plan(4, 0, 264) == (0, 0)
    assert states.split_plan(4, 1, 264) == (1, q)
    nsplit, span = states.split_plan(4, 131072, 264)
    assert nsplit * 4 <= 264 and span % q == 0 and (nsplit - 1) * span < 131072 <= nsplit * span
    assert states.split_plan(1000, 131072, 264)[0] == 1  # more tiles than a wave: no split
    for ntiles, T, at_once in itertools.product((1, 3, 64), (1, 63, 64, 65, 1000, 99991), (132, 264, 1056)):
        nsplit, span = states.split_plan(ntiles, T, at_once)
        assert span % q == 0 and (nsplit - 1) * span < T <= nsplit * span
        assert nsplit == 1 or ntiles * nsplit <= at_once


# ---------------------------------------------------------------------------------------------
# GPU

DTYPE_PAIRS = [("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "float32"), ("float64", "float64"),
               ("bfloat16", "float32"), ("float16", "float64")]
# (B, T, D): odd D (scalar access), T = 0 and 1, T far beyond one split with few channels (many splits and
# the combine), many channels (more tiles than a wave: one split, written in place).
SHAPES = [(2, 0, 64), (3, 1, 40), (2, 300, 33), (1, 70000, 64), (2, 20000, 7), (64, 70, 4096)]


def _torch_dev(a64, dtype, torch):
    return torch.tensor(a64, dtype=torch.float64, device="cuda").to(getattr(torch, dtype))


def _acc_tol(xd, gd, T):
    """Accumulation error only (the reference walks the same rounded inputs); it grows with the walk."""
    acc = "float64" if "float64" in (xd, gd) else "float32"
    return TOL[acc] * max(1.0, T / 1024)  # A is a product of T rounded factors: its error grows with T


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("xd, gd", DTYPE_PAIRS, ids=[f"{a}-{b}" for a, b in DTYPE_PAIRS])
@pytest.mark.parametrize("B, T, D", SHAPES, ids=[f"{b}x{t}x{d}" for b, t, d in SHAPES])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd_time", "reverse"])
def test_kernels_match_walk(xd, gd, B, T, D, reverse):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    seed = zlib.crc32(repr((xd, gd, B, T, D, reverse)).encode())
    x64, g64, do64 = inputs(seed, B, T, D, gate_scale=3.0)  # A a normal float32 at every T
    x, g, do = _torch_dev(x64, xd, torch), _torch_dev(g64, gd, torch), _torch_dev(do64, xd, torch)
    tol = _acc_tol(xd, gd, T)
    A, b = states.forward_states(x, g, reverse)
    A_ref, b_ref = walk(x.double().cpu().numpy(), g.double().cpu().numpy(), reverse)
    assert A.shape == (B, D) and A.dtype == (torch.float64 if "float64" in (xd, gd) else torch.float32)
    assert rel_err(A, A_ref) < tol and rel_err(b, b_ref) < tol, f"seed {seed}"
    A2, c = states.backward_states(g, do, reverse)
    A2_ref, c_ref = walk(do.double().cpu().numpy(), g.double().cpu().numpy(), reverse, backward=True)
    assert rel_err(A2, A2_ref) < tol and rel_err(c, c_ref) < tol, f"seed {seed}"


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_strided_views(dtype):
    """Batch and time strides of views (time stride 3; a channel offset that breaks 16-byte alignment)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    seed = 21
    x64, g64, _ = inputs(seed, 3, 3 * 500, 130, gate_scale=3.0)
    x, g = _torch_dev(x64, dtype, torch), _torch_dev(g64, dtype, torch)
    for view in (lambda a: a[:, ::3, :128], lambda a: a[1:, :, 2:130], lambda a: a[:, 7:901, 1:129]):
        xv, gv = view(x), view(g)
        for reverse in (False, True):
            A, b = states.forward_states(xv, gv, reverse)
            A_ref, b_ref = walk(xv.double().cpu().numpy(), gv.double().cpu().numpy(), reverse)
            tol = _acc_tol(dtype, dtype, xv.shape[1])
            assert rel_err(A, A_ref) < tol and rel_err(b, b_ref) < tol, f"seed {seed}"


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
def test_cupy_arrays_and_negative_strides():
    cupy = pytest.importorskip("cupy")
    seed = 33
    x64, g64, do64 = inputs(seed, 2, 5000, 96, gate_scale=3.0)
    x, g, do = cupy.asarray(x64, cupy.float32), cupy.asarray(g64, cupy.float32), cupy.asarray(do64, cupy.float32)
    for xv, gv, dv in ((x, g, do), (x[:, ::-1], g[:, ::-1], do[:, ::-1])):
        A, b = states.forward_states(xv, gv)
        assert isinstance(A, cupy.ndarray) and A.dtype == cupy.float32
        A_ref, b_ref = walk(cupy.asnumpy(xv), cupy.asnumpy(gv))
        assert rel_err(A, A_ref) < _acc_tol("float32", "float32", 5000), f"seed {seed}"
        assert rel_err(b, b_ref) < _acc_tol("float32", "float32", 5000), f"seed {seed}"
        A2, c = states.backward_states(gv, dv, True)
        A2_ref, c_ref = walk(cupy.asnumpy(dv), cupy.asnumpy(gv), True, backward=True)
        assert rel_err(c, c_ref) < _acc_tol("float32", "float32", 5000), f"seed {seed}"
