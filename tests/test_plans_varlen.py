"""Varlen calls on the recording driver (``recording.RecordingDriver``: torch CPU tensors posing as CUDA
tensors, each launch computed by the float64 reference): plans kept across offsets, what a kept plan's
call still checks, the device guard's plan (and its runs without an engine launch), and the host check of
offsets: once per unwritten CUDA tensor, every call on the CPU.  Needs no GPU.
"""
import numpy as np
import pytest
from conftest import TOL, rel_err, to_numpy
from recording import fake_cuda, fresh_plans  # noqa: F401  (fixtures)

import hgrn_cupy as hc
from hgrn_cupy import checks


@pytest.mark.parametrize("engine", ["chunk", "fused_recurrent"])
def test_fake_cuda_varlen_plans_kept(engine, fake_cuda, fresh_plans, monkeypatch):
    """Varlen calls keep their plan: the first call of a signature makes it, later calls use it with their
    own offsets (other values, an empty sequence) and compute the reference, forward and backward, checking
    nothing but the offsets' values (offsets that fail raise with a plan kept); int64 offsets, another
    number of sequences and offsets the host does not check (the device guard's plan) are keys of their
    own."""
    torch = pytest.importorskip("torch")
    full_checks = []
    for name in ("check_forward", "check_backward"):
        monkeypatch.setattr(checks, name,
                            lambda *a, _f=getattr(checks, name), **k: full_checks.append(1) or _f(*a, **k))
    gen = torch.Generator().manual_seed(11)
    T, D = 300, 64
    x, do = (torch.randn(1, T, D, generator=gen).to(torch.bfloat16) for _ in range(2))
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, D, generator=gen)).to(torch.bfloat16)
    h0, dht = torch.randn(3, D, generator=gen), torch.randn(3, D, generator=gen)
    run = hc.chunk_hgrn if engine == "chunk" else hc.fused_recurrent_hgrn
    xs, gs, dos, h0s, dhts = (to_numpy(a) for a in (x, g, do, h0, dht))
    cases = (([0, 120, 200, 300], torch.int32), ([0, 0, 170, 300], torch.int32), ([0, 290, 300, 300], torch.int64))
    for k, (values, dtype) in enumerate(cases):
        cu = torch.tensor(values, dtype=dtype)
        o, ht = run(x, g, h0, True, cu)
        dx, dg, dh0 = hc.hgrn_backward(g, o, do, dht, h0, cu, engine=engine)
        ref_o, ref_ht = hc.naive_recurrent_hgrn(xs, gs, h0s, True, np.asarray(values))
        ref = hc.naive_recurrent_hgrn_bwd(gs, to_numpy(o), dos, dhts, h0s, np.asarray(values))
        assert rel_err(o, ref_o) <= TOL["bfloat16"] and rel_err(ht, ref_ht) <= TOL["float32"], values
        for got, want in zip((dx, dg, dh0), ref):
            assert rel_err(got, want) <= TOL["bfloat16"], values
        fwd, bwd = fake_cuda.launches[-2:]
        assert fwd["cu"] == bwd["cu"] == cu.data_ptr() and fwd["cu64"] == bwd["cu64"] == (dtype == torch.int64)
        assert len(fresh_plans) == (2 if k < 2 else 4)  # int64 offsets: a key of their own (the guard's dtype)
        assert len(full_checks) == (2 if k < 2 else 4)  # a kept plan's call checks the offsets' values alone
    with pytest.raises(ValueError, match="non-decreasing"):
        run(x, g, h0, True, torch.tensor([0, 200, 100, 300], dtype=torch.int32))
    with pytest.raises(ValueError, match="end at T"):
        hc.hgrn_backward(g, o, do, dht, h0, torch.tensor([0, 1, 2, 299], dtype=torch.int32), engine=engine)
    assert len(fake_cuda.launches) == 6
    cu = torch.tensor([0, 150, 300], dtype=torch.int32)
    o, _ = run(x, g, h0[:2], False, cu)
    assert rel_err(o, hc.naive_recurrent_hgrn(xs, gs, h0s[:2], False, np.asarray([0, 150, 300]))[0]) \
        <= TOL["bfloat16"]
    assert len(fresh_plans) == 5 and len(fake_cuda.launches) == 7
    assert [e[1] for e in fake_cuda.events if e[0] == "guard"] == ["int32"] * 2 + ["int64"] * 2 + ["int32"]
    assert not [e for e in fake_cuda.events if e[0].startswith("guard ")]  # the host checked every offsets
    monkeypatch.setattr(hc.config, "check_cu_seqlens_values", False)
    o, _ = run(x, g, h0[:2], False, cu)  # the same arrays, offsets left to the device guard: a plan of its own
    assert len(fresh_plans) == 6 and len(fake_cuda.launches) == 8
    assert [e[0] for e in fake_cuda.events[-4:]] == ["guard", "guard check", "kernel", "guard fill"]
    assert fake_cuda.events[-3][1:4] == (cu.data_ptr(), 3, T)  # N + 1 offsets against T


@pytest.mark.parametrize("engine", ["chunk", "fused_recurrent"])
def test_fake_cuda_no_sequence_left_to_the_guard(engine, fake_cuda, fresh_plans, monkeypatch):
    """Offsets of one entry (no sequence) against T > 0, left to the device guard: no engine kernel runs (no
    step belongs to a sequence, and the kernels would look for one), the guard checks the offsets and is
    asked to fill every output with bytes, forward and backward; against T = 0 nothing runs at all."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(hc.config, "check_cu_seqlens_values", False)
    gen = torch.Generator().manual_seed(12)
    T, D = 300, 64
    x, do = (torch.randn(1, T, D, generator=gen) for _ in range(2))
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, D, generator=gen))
    cu = torch.tensor([0], dtype=torch.int32)
    run = hc.chunk_hgrn if engine == "chunk" else hc.fused_recurrent_hgrn
    o, ht = run(x, g, None, True, cu)
    dx, dg, dh0 = hc.hgrn_backward(g, x, do, None, None, cu, engine=engine)
    assert not fake_cuda.launches
    events = [e for e in fake_cuda.events if e[0] != "guard"]
    assert [e[0] for e in events] == ["guard check", "guard fill"] * 2
    assert events[0][1:4] == events[2][1:4] == (cu.data_ptr(), 1, T)
    filled = [e[-1] for e in events[1::2]]  # the (pointer, bytes) of the outputs with bytes
    assert filled[0] == [(o.data_ptr(), T * D * 4)]
    assert filled[1] == [(dx.data_ptr(), T * D * 4), (dg.data_ptr(), T * D * 4)]
    assert ht.shape == (0, D) and dh0 is None
    fake_cuda.events.clear()
    empty = x[:, :0]
    run(empty, g[:, :0], None, True, cu)
    hc.hgrn_backward(g[:, :0], empty, do[:, :0], None, None, cu, engine=engine)
    assert not fake_cuda.launches and not [e for e in fake_cuda.events if e[0] != "guard"]


def test_offsets_read_once_per_unchanged_tensor(fake_cuda, monkeypatch):
    """A CUDA torch cu_seqlens (the recording driver's) is read back (a synchronisation) once: later calls on
    the same tensor with the same T reuse the check; an in-place write (its version counter), another T,
    another tensor with the same values, or an inference tensor (no counter) are read again, and bad values
    still raise."""
    torch = pytest.importorskip("torch")
    reads = []  # the checks' reads (the CPU reference reads the offsets as well, to compute)
    real = checks.cu_seqlens_values
    monkeypatch.setattr(checks, "cu_seqlens_values", lambda v, T: reads.append(1) or real(v, T))
    monkeypatch.setattr(checks, "_offsets_checked", {})
    T, D = 9, 4
    x = torch.randn(1, T, D, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, D, dtype=torch.float64))
    cu = torch.tensor([0, 4, T])
    want = hc.hgrn(x, g, cu_seqlens=cu)[0]
    for _ in range(3):
        torch.testing.assert_close(hc.hgrn(x, g, cu_seqlens=cu)[0], want)
        hc.hgrn_backward(g, want, x, cu_seqlens=cu)
    assert len(reads) == 1
    with pytest.raises(ValueError, match="end at T"):  # another T: read again
        hc.hgrn(x[:, :7], g[:, :7], cu_seqlens=cu)
    assert len(reads) == 2
    hc.hgrn(x, g, cu_seqlens=torch.tensor([0, 4, T]))  # equal values, another tensor
    assert len(reads) == 3
    cu[1] = 11  # written in place: read again, and refused
    with pytest.raises(ValueError, match="non-decreasing"):
        hc.hgrn(x, g, cu_seqlens=cu)
    assert len(reads) == 4
    with torch.inference_mode():
        cu_inf = torch.tensor([0, 4, T])
    for _ in range(2):
        hc.hgrn(x, g, cu_seqlens=cu_inf)
    assert len(reads) == 6


def test_cpu_offsets_read_every_call(monkeypatch):
    """CPU offsets are checked on every call, unwritten or not and whatever config.check_cu_seqlens_values
    says: a write through a NumPy view of the tensor (no version bump) is caught, and there is no device
    guard to fall back on."""
    torch = pytest.importorskip("torch")
    reads = []
    real = checks.cu_seqlens_values
    monkeypatch.setattr(checks, "cu_seqlens_values", lambda v, T: reads.append(1) or real(v, T))
    T, D = 9, 4
    x = torch.randn(1, T, D, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, D, dtype=torch.float64))
    cu = torch.tensor([0, 4, T])
    for _ in range(3):
        hc.hgrn(x, g, cu_seqlens=cu)
    assert len(reads) == 3
    cu.numpy()[1] = 11  # behind torch's back: the version counter stays
    with pytest.raises(ValueError, match="non-decreasing"):
        hc.hgrn(x, g, cu_seqlens=cu)
    monkeypatch.setattr(hc.config, "check_cu_seqlens_values", False)
    for call in (lambda: hc.hgrn(x.numpy(), g.numpy(), cu_seqlens=np.array([0, 2, 3])),
                 lambda: hc.hgrn_backward(g, x, x, cu_seqlens=torch.tensor([0, 4, 8]))):
        with pytest.raises(ValueError, match="end at T"):
            call()
