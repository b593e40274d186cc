"""The fused engine's forward launch variants that the tuner measures, against the NumPy reference in float64
(GPU; skipped without one): the staged block walk (``fused_variants.STAGED``) and the bulk walk
(``fused_variants.BULK``), each forced where its layout allows it, with the kernel that ran checked.

Seeded and poisoned as ``test_gpu_kernels.py`` (``gpu_kernel_checks``); tolerances live in conftest.
"""
import numpy as np
import pytest

from conftest import force_block_walks

cupy = pytest.importorskip("cupy")
from gpu_kernel_checks import VARLEN, VECTOR_VIEWS, _rng, _seed, check_forward, launched_kernels, make_inputs  # noqa: E402
from gpu_kernel_checks import seeded  # noqa: E402, F401  (an autouse fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison")]


# The staged block walk (``fused_variants.STAGED``, a launch the tuner measures for 16-bit forwards): T
# around its 64-step window and past its two stages, D around its block of 128 channels (8-byte lanes).
STAGED_SHAPES = [(2, 2, 132), (3, 3, 4), (3, 63, 36), (2, 64, 128), (1, 65, 260), (2, 129, 36), (1, 1000, 4100),
                 (1, 4097, 96)]
STAGED = "fused_recurrent_staged_fwd"


def force_staged(monkeypatch):
    """The fused forward as the staged block walk wherever its 8-byte lanes fit: block walks opened to every
    channel count and T, plans made afresh."""
    from hgrn_cupy import plans
    from hgrn_cupy.engines import fused_recurrent

    force_block_walks(monkeypatch, narrow=False)
    prepare = fused_recurrent.prepare
    monkeypatch.setattr(fused_recurrent, "prepare", lambda *args, **kw: prepare(*args, **{**kw, "staged": True}))
    monkeypatch.setattr(plans, "_plans", {})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", STAGED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwdtime", "reverse"])
def test_staged_forward(dtype, shape, reverse, monkeypatch):
    """The staged block walk with and without h0 and ht, and it is the kernel that ran."""
    B, T, D = shape
    force_staged(monkeypatch)
    rng = _rng()
    x, g = make_inputs(B, T, D, rng=rng)
    launched = launched_kernels(monkeypatch)
    check_forward("fused_recurrent", x, g, dtype, rng.standard_normal((B, D)), reverse=reverse)
    check_forward("fused_recurrent", x, g, dtype, None, reverse=reverse, final=False)
    assert [k[0] for k in launched] == [STAGED] * 2, (_seed(), launched)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("cu", VARLEN, ids=lambda c: f"n{len(c) - 1}")
@pytest.mark.parametrize("reverse", [False, True], ids=["fwdtime", "reverse"])
def test_staged_forward_varlen(dtype, cu, reverse, monkeypatch):
    """Packed sequences (empty ones, one step, many windows) through the staged block walk, h0 in, ht out."""
    force_staged(monkeypatch)
    rng = _rng()
    x, g = make_inputs(1, cu[-1], 264, rng=rng)
    launched = launched_kernels(monkeypatch)
    check_forward("fused_recurrent", x, g, dtype, rng.standard_normal((len(cu) - 1, 264)), cu=cu, reverse=reverse)
    assert [k[0] for k in launched if k[0].startswith("fused")] == [STAGED], (_seed(), launched)


@pytest.mark.parametrize("view", list(VECTOR_VIEWS), ids=list(VECTOR_VIEWS))
def test_staged_forward_views(view, monkeypatch):
    """Strided views through the staged block walk where their pointers and strides allow 8-byte lanes, the
    thread walk where they do not."""
    fn, vector = VECTOR_VIEWS[view]
    force_staged(monkeypatch)
    rng = _rng()
    x, g = make_inputs(3, 700, 288, rng=rng)
    B, D = fn(np.empty((3, 700, 288)))[:, 0].shape
    launched = launched_kernels(monkeypatch)
    check_forward("fused_recurrent", x, g, "bfloat16", rng.standard_normal((B, D)), views=fn)
    assert [k[0] for k in launched] == [STAGED if vector else "fused_recurrent_fwd"], (_seed(), launched)


@pytest.mark.parametrize("gate", ["zero", "very_negative", "neg_inf"])
def test_staged_forward_gate_extremes(gate, monkeypatch):
    force_staged(monkeypatch)
    x, g = make_inputs(2, 700, 40, gate=gate)
    launched = launched_kernels(monkeypatch)
    o = check_forward("fused_recurrent", x, g, "bfloat16", _rng().standard_normal((2, 40)))
    assert bool(cupy.isfinite(o).all()), _seed()
    assert [k[0] for k in launched] == [STAGED], (_seed(), launched)


# The bulk walk (``fused_variants.BULK``, launches the tuner measures for dense forwards whose inputs share
# an itemsize of 2 or 4): the staged walk's shapes at both lane widths.  It takes a layout whose strides are
# multiples of 16 bytes and pointers 16-byte aligned; others fall back to the walks.
BULK = "fused_recurrent_bulk_fwd"


def force_bulk(monkeypatch, lanes):
    """The fused forward as the bulk walk of ``lanes``-byte lanes wherever the layout allows it: block walks
    opened to every channel count and T, plans made afresh."""
    from hgrn_cupy import plans
    from hgrn_cupy.engines import fused_recurrent

    force_block_walks(monkeypatch, narrow=False)
    prepare = fused_recurrent.prepare
    monkeypatch.setattr(fused_recurrent, "prepare",
                        lambda *args, **kw: prepare(*args, **{**kw, "bulk": True, "lanes": lanes}))
    monkeypatch.setattr(plans, "_plans", {})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("lanes", [4, 8])
@pytest.mark.parametrize("shape", STAGED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwdtime", "reverse"])
def test_bulk_forward(dtype, lanes, shape, reverse, monkeypatch):
    """The bulk walk with and without h0 and ht; it is the kernel that ran wherever rows are whole
    16-byte multiples and D divides into its lanes, and no kernel ran it elsewhere."""
    B, T, D = shape
    force_bulk(monkeypatch, lanes)
    rng = _rng()
    x, g = make_inputs(B, T, D, rng=rng)
    launched = launched_kernels(monkeypatch)
    check_forward("fused_recurrent", x, g, dtype, rng.standard_normal((B, D)), reverse=reverse)
    check_forward("fused_recurrent", x, g, dtype, None, reverse=reverse, final=False)
    size = 4 if dtype == "float32" else 2
    takes = D * size % 16 == 0 and D % (lanes // size) == 0
    ran = [k[0] for k in launched]
    assert (ran == [BULK] * 2) if takes else (BULK not in ran), (_seed(), launched)


@pytest.mark.parametrize("view", list(VECTOR_VIEWS), ids=list(VECTOR_VIEWS))
def test_bulk_forward_views(view, monkeypatch):
    """Strided views through the bulk walk where their strides are positive multiples of 16 bytes, each
    sequence's stride at least T time strides and their pointers 16-byte aligned; the block walk elsewhere
    (reversed time; every third step, whose 234 steps of three rows span 702 rows of a 700-row sequence) or
    the thread walk (odd offset)."""
    fn, _ = VECTOR_VIEWS[view]
    force_bulk(monkeypatch, 8)
    rng = _rng()
    x, g = make_inputs(3, 700, 288, rng=rng)
    B, D = fn(np.empty((3, 700, 288)))[:, 0].shape
    launched = launched_kernels(monkeypatch)
    check_forward("fused_recurrent", x, g, "bfloat16", rng.standard_normal((B, D)), views=fn)
    expect = {"reversed_time": "fused_recurrent_block_fwd", "time_stride": "fused_recurrent_block_fwd",
              "odd_offset": "fused_recurrent_fwd"}.get(view, BULK)
    assert [k[0] for k in launched] == [expect], (_seed(), launched)


@pytest.mark.parametrize("gate", ["zero", "very_negative", "neg_inf"])
@pytest.mark.parametrize("lanes", [4, 8])
def test_bulk_forward_gate_extremes(gate, lanes, monkeypatch):
    force_bulk(monkeypatch, lanes)
    x, g = make_inputs(2, 700, 40, gate=gate)
    launched = launched_kernels(monkeypatch)
    o = check_forward("fused_recurrent", x, g, "bfloat16", _rng().standard_normal((2, 40)))
    assert bool(cupy.isfinite(o).all()), _seed()
    assert [k[0] for k in launched] == [BULK], (_seed(), launched)
