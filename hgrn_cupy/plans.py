"""Planned calls: the internal interface every front end calls, ``forward`` and ``backward``.

A call is checked once (:mod:`hgrn_cupy.checks`); its engine is chosen (:mod:`hgrn_cupy.dispatch`) and
its launch prepared (:mod:`hgrn_cupy.engines`) into a plan: a function that allocates the outputs from
the caller's allocator, reads the caller's current stream and queues the kernels.  A later call whose
arrays match in framework, device, dtype, shape and strides (its key) reuses the plan and skips every
check and decision: decoding repeats one key at every step, where checks would cost more than the
launch.  A varlen call's key adds the offsets' signature and whether the host checks their values; a hit
checks those values alone (read back once per unchanged tensor, see :mod:`hgrn_cupy.checks`), since
everything else the checks read is in the key.  CPU arrays run the NumPy reference; JAX arrays on a GPU
are viewed as CuPy arrays (DLPack) and back.
"""
from __future__ import annotations

import numpy as np

from . import arrays as ar
from . import checks, dispatch, workspace
from . import engines
from .engines.layout import Arr, row_major
from .nvrtc import ITEMSIZE
from .naive import naive_recurrent_hgrn, naive_recurrent_hgrn_bwd
from .settings import config

MAX_PLANS = 256  # keys kept before the cache starts over (shapes that keep changing, such as T)
_plans: dict = {}


def poison_outputs(on):
    """Tests: fill every GPU output with all-ones bytes (NaN) before the kernels run (``arrays.poison``), so
    that an element the kernels fail to write cannot pass as correct.  Plans made before are dropped."""
    ar.poison = bool(on)
    _plans.clear()


def _remember(key, plan):
    if len(_plans) >= MAX_PLANS:
        _plans.clear()
    _plans[key] = plan
    return plan


def _key(head, a, b, c):
    """The plan key of a call (``head`` plus the signature of arrays a, b and optional c), or None where
    the call cannot be planned: an array type not planned, or one the signature cannot read (the checks
    will say what is wrong)."""
    fw = ar.PLANNABLE.get(type(a))
    if fw is None and ar.framework_of(a) is not None:  # a type not seen before may be plannable
        fw = ar.PLANNABLE.get(type(a))
    if fw is None:
        return None
    try:
        return fw.signature(a, b, c, head)
    except Exception:
        return None


def _state_key(o, a):
    """A backward key's part for one optional state: None where absent, its signature otherwise; False
    where it cannot be planned."""
    if a is None:
        return None
    fw = ar.PLANNABLE.get(type(a))
    if fw is None or type(a) is not type(o):
        return False
    return fw.signature(a, a, None, None)


def _varlen_key(key, ref, cu):
    """A varlen call's key, or None: its arrays' key (``ref`` the first of them), the offsets' signature
    (their dtype and length decide the checks' outcome but for the values, and the guard's kernel),
    whether the host checks their values (else the plan brackets the launch in the device guard), and
    the framework (which a hit checks the values with)."""
    if key is None or type(cu) is not type(ref):
        return None
    signature = _key(None, cu, cu, None)
    if signature is None:
        return None
    fw = ar.PLANNABLE[type(ref)]
    return key, signature, checks.offsets_on_host(cu, fw, ref), fw


def _hit_offsets(key, cu, T):
    """What a hit of a varlen key (from _varlen_key) still checks: the offsets' values, where the host
    checks them."""
    if key[2]:
        checks.offsets_values(cu, key[3], T)


# ----------------------------------------------------------------------------------------------
# the interface

def forward(engine, x, g, h0, final, cu, reverse):
    """``(o, ht)`` of the recurrence (arguments as ``hgrn_cupy.hgrn``; ``engine`` as asked)."""
    key = None
    if (final is True or final is False) and (reverse is True or reverse is False):
        key = _key(("fwd", engine, config.engine, final, reverse), x, g, h0)
        if cu is not None:
            key = _varlen_key(key, x, cu)
        plan = _plans.get(key)
        if plan is not None:
            if cu is not None:  # a test, not a call, on the dense path that decoding repeats
                _hit_offsets(key, cu, x.shape[1])
            return plan(x, g, h0, cu)
    call = checks.check_forward(x, g, h0, cu, final, reverse)
    plan = _forward_plan(engine, call, x, g, h0, bool(final), cu, bool(reverse))
    if key is not None:
        _remember(key, plan)
    return plan(x, g, h0, cu)


def backward(engine, g, o, do, dht, h0, cu, reverse):
    """``(dx, dg, dh0)`` (arguments as ``hgrn_cupy.hgrn_backward``)."""
    key = None
    if reverse is True or reverse is False:
        states = (_state_key(o, dht), _state_key(o, h0))
        if False not in states:
            key = _key(("bwd", engine, config.engine, reverse) + states, g, o, do)
            if cu is not None:
                key = _varlen_key(key, o, cu)
            plan = _plans.get(key)
            if plan is not None:
                if cu is not None:
                    _hit_offsets(key, cu, o.shape[1])
                return plan(g, o, do, dht, h0, cu)
    call = checks.check_backward(g, o, do, dht, h0, cu, reverse)
    plan = _backward_plan(engine, call, g, o, do, dht, h0, cu, bool(reverse))
    if key is not None:
        _remember(key, plan)
    return plan(g, o, do, dht, h0, cu)


# ----------------------------------------------------------------------------------------------
# the CPU: the NumPy reference, in the caller's framework

def _np(fw, a):
    return None if a is None else fw.to_numpy(a)


def _cu_values(fw, cu):
    return None if cu is None else fw.index_values(cu)


def _cpu_forward(fw, acc, final, reverse):
    def plan(x, g, h0, cu):
        o, ht = naive_recurrent_hgrn(_np(fw, x), _np(fw, g), _np(fw, h0), final, _cu_values(fw, cu), reverse,
                                     compute_dtype=np.float64 if acc == "float64" else np.float32)
        return fw.from_numpy(o, x, fw.dtype(x)), None if ht is None else fw.from_numpy(ht, x, acc)
    return plan


def _cpu_backward(fw, acc, reverse):
    def plan(g, o, do, dht, h0, cu):
        do_np = _np(fw, do).astype(_np(fw, o).dtype, copy=False)
        dx, dg, dh0 = naive_recurrent_hgrn_bwd(_np(fw, g), _np(fw, o), do_np, _np(fw, dht), _np(fw, h0),
                                               _cu_values(fw, cu), reverse,
                                               compute_dtype=np.float64 if acc == "float64" else np.float32)
        return (fw.from_numpy(dx, o, fw.dtype(o)), fw.from_numpy(dg, o, fw.dtype(g)),
                None if dh0 is None else fw.from_numpy(dh0, o, fw.dtype(h0)))
    return plan


def _via_cupy(run):
    """A plan for JAX arrays on a GPU: viewed as CuPy arrays (DLPack, stream-ordered) and back."""
    def plan(*args):
        c = ar.JAX.to_cupy
        res = run(*(None if a is None else c(a) for a in args))
        return tuple(None if r is None else ar.JAX.from_cupy(r) for r in res)
    return plan


# ----------------------------------------------------------------------------------------------
# the GPU: one kit per framework, one plan body per direction

class _Kit:
    """What a GPU plan needs from the caller's framework: ``empty(shape, dtype name)``, ``ptr(a)``,
    ``stream()`` (the current stream's handle), ``astate(a, dtype)`` (contiguous in that dtype),
    ``contiguous(a)``, ``device`` (index), ``workspace`` (see :mod:`hgrn_cupy.workspace`)."""

    def __init__(self, fw, like):
        import cupy

        if fw is ar.TORCH:
            import torch

            tdevice, names = like.device, ar._torch_dtype_names()
            self.device = dev = tdevice.index
            self.empty = lambda shape, dt: torch.empty(shape, dtype=names[dt], device=tdevice)
            self.ptr = torch.Tensor.data_ptr
            self.empty_like = torch.empty_like
            read = ar.torch_stream_reader(torch)
            self.stream = lambda: read(dev)
            self.workspace = workspace.source(torch_device=tdevice)
        else:
            self.device = dev = like.data.device_id
            np_dtype = ar.CUPY._np_dtype
            self.empty = lambda shape, dt: cupy.empty(shape, np_dtype(dt))
            self.ptr = lambda a: a.data.ptr
            current = cupy.cuda.get_current_stream
            self.stream = lambda: current(dev).ptr
            self.workspace = workspace.source(cupy_device=dev)
        self.astate = lambda a, dt: fw.contiguous(a if fw.dtype(a) == dt else fw.astype(a, dt))
        self.contiguous = fw.contiguous
        self.get_device, self.set_device = cupy.cuda.runtime.getDevice, cupy.cuda.runtime.setDevice
        if ar.poison:
            empty, memset, stream = self.empty, cupy.cuda.runtime.memsetAsync, self.stream

            def poisoned(shape, dt):
                a = empty(shape, dt)
                if a.nbytes:
                    memset(self.ptr(a), 0xFF, a.nbytes, stream())
                return a
            self.empty = poisoned


def _launches(direction, tensors, N, reverse, device, varlen):
    """``launch_of(engine or variant name)``: the prepared launches, made on first request."""
    made = {}

    def launch_of(name):
        if name not in made:
            made[name] = engines.prepare(name, direction, tensors, N, reverse, device, varlen)
        return made[name]
    return launch_of


def _guarded(kit, call, launch, cu):
    """``launch`` wrapped in the device guard where cu_seqlens' values were not checked on the host:
    ``run(stream, pointers, states, cu, workspace, outputs)`` with ``outputs`` the (pointer, bytes) the
    guard fills with NaN when the offsets are invalid; None where nothing runs.  The guard runs even where
    the engine has nothing to compute but an output has bytes: offsets of one entry (no sequence) against
    T > 0 are invalid.  Every GPU varlen plan loads the guard, so that a CUDA graph captured after an eager
    call finds it loaded."""
    if call.varlen:
        from .engines import guard

        checker = guard.prepare(kit.device, ar.framework_of(cu).dtype(cu))
    if not call.varlen or call.values_checked:
        if launch is None:
            return None
        return lambda s, pointers, states, cu, ws, outputs: launch(s, pointers, states, cu, ws)
    T, n = call.T, call.N + 1
    if launch is None and (call.D == 0 or T == call.N == 0):
        return None  # no output has a byte

    def run(s, pointers, states, cu, ws, outputs):
        flag = kit.empty((1,), "int32")
        checker.check(s, cu[0], n, T, kit.ptr(flag))
        if launch is not None:
            launch(s, pointers, states, cu, ws)
        checker.fill(s, kit.ptr(flag), [b for b in outputs if b[1]])
    return run


def _cu_arg(kit, cu):
    if cu is None:
        return (0, 0), None
    cu = kit.contiguous(cu)
    return (kit.ptr(cu), int(ar.framework_of(cu).dtype(cu) == "int64")), cu


def _forward_plan(engine, call, x, g, h0, final, cu, reverse):
    fw = call.fw
    if not fw.is_gpu(x):
        dispatch.choose(engine, call, 0, reverse)  # an unknown engine name fails alike on every device
        return _cpu_forward(fw, call.acc, final, reverse)
    if fw is ar.JAX:
        return _via_cupy(lambda x, g, h0, cu: forward(engine, x, g, h0, final, cu, reverse))
    kit = _Kit(fw, x)
    B, T, D, N, acc = call.B, call.T, call.D, call.N, call.acc
    xd = call.dtypes[0]
    o_like_x = fw is ar.TORCH and x.is_contiguous()  # empty_like keeps x's strides and parses no arguments
    o_strides = fw.strides(x) if o_like_x else row_major((B, T, D))
    tensors = (Arr(0, (B, T, D), fw.strides(x), xd), Arr(0, (B, T, D), fw.strides(g), call.dtypes[1]),
               Arr(0, (B, T, D), o_strides, xd))
    launch_of = _launches(0, tensors, N, reverse, kit.device, call.varlen)
    direct = h0 is not None and fw.dtype(h0) == acc and kit.contiguous(h0) is h0  # read in place
    empty, ptr, stream, astate, ws = kit.empty, kit.ptr, kit.stream, kit.astate, kit.workspace
    empty_o = kit.empty_like if o_like_x and not ar.poison else (lambda x: empty((B, T, D), xd))
    o_bytes, s_bytes = B * T * D * ITEMSIZE[xd], N * D * ITEMSIZE[acc]
    get_device, set_device, dev = kit.get_device, kit.set_device, kit.device

    def body(run, x, g, h0, cu):
        prev = get_device()
        if prev != dev:
            set_device(dev)
        try:
            o = empty_o(x)
            ht = empty((N, D), acc) if final else None
            if h0 is not None and not direct:
                h0 = astate(h0, acc)
            if run is not None:
                cu_arg, cu_keep = _cu_arg(kit, cu)
                op, hp = ptr(o), 0 if ht is None else ptr(ht)
                run(stream(), (ptr(x), ptr(g), op), (0 if h0 is None else ptr(h0), hp), cu_arg, ws,
                    ((op, o_bytes), (hp, s_bytes if final else 0)))
        finally:
            if prev != dev:
                set_device(prev)
        return o, ht

    def timed(name):
        body(_guarded(kit, call, launch_of(name), cu), x, g, h0, cu)
    s = stream()
    engine = dispatch.choose(engine, call, 0, reverse, kit.device, timed, not workspace.capturing(s), s)
    run = _guarded(kit, call, launch_of(engine), cu)
    return lambda x, g, h0, cu: body(run, x, g, h0, cu)


def _backward_plan(engine, call, g, o, do, dht, h0, cu, reverse):
    fw = call.fw
    if not fw.is_gpu(o):
        dispatch.choose(engine, call, 1, reverse)
        return _cpu_backward(fw, call.acc, reverse)
    if fw is ar.JAX:
        return _via_cupy(lambda g, o, do, dht, h0, cu: backward(engine, g, o, do, dht, h0, cu, reverse))
    kit = _Kit(fw, o)
    B, T, D, N, acc = call.B, call.T, call.D, call.N, call.acc
    od, gd = call.dtypes
    shape, row = (B, T, D), row_major((B, T, D))
    cast_do = fw.dtype(do) != od
    with_h0 = h0 is not None
    h0_dtype = fw.dtype(h0) if with_h0 else None
    cast_dh0 = with_h0 and h0_dtype != acc  # dh0 comes back in h0's dtype
    h0_direct = with_h0 and not cast_dh0 and kit.contiguous(h0) is h0
    dht_direct = dht is not None and fw.dtype(dht) == acc and kit.contiguous(dht) is dht
    tensors = (Arr(0, shape, fw.strides(g), gd), Arr(0, shape, fw.strides(o), od),
               Arr(0, shape, row if cast_do else fw.strides(do), od), Arr(0, shape, row, od), Arr(0, shape, row, gd))
    launch_of = _launches(1, tensors, N, reverse, kit.device, call.varlen)
    empty, ptr, stream, astate, ws = kit.empty, kit.ptr, kit.stream, kit.astate, kit.workspace
    t_bytes = B * T * D
    dx_bytes, dg_bytes, s_bytes = t_bytes * ITEMSIZE[od], t_bytes * ITEMSIZE[gd], N * D * ITEMSIZE[acc]
    get_device, set_device, dev = kit.get_device, kit.set_device, kit.device

    def body(run, g, o, do, dht, h0, cu):
        prev = get_device()
        if prev != dev:
            set_device(dev)
        try:
            if cast_do:  # row-major in o's dtype, as the launch was prepared for
                do = astate(do, od)
            dx, dg = empty(shape, od), empty(shape, gd)
            dh0 = empty((N, D), acc) if with_h0 else None
            if run is not None:
                h0_in = h0 if h0_direct or h0 is None else astate(h0, acc)
                dht_in = dht if dht_direct or dht is None else astate(dht, acc)
                cu_arg, cu_keep = _cu_arg(kit, cu)
                dxp, dgp, dp = ptr(dx), ptr(dg), 0 if dh0 is None else ptr(dh0)
                run(stream(), (ptr(g), ptr(o), ptr(do), dxp, dgp),
                    (0 if h0_in is None else ptr(h0_in), 0 if dht_in is None else ptr(dht_in), dp), cu_arg, ws,
                    ((dxp, dx_bytes), (dgp, dg_bytes), (dp, s_bytes if with_h0 else 0)))
            if cast_dh0:
                dh0 = fw.astype(dh0, h0_dtype)
        finally:
            if prev != dev:
                set_device(prev)
        return dx, dg, dh0

    def timed(name):
        body(_guarded(kit, call, launch_of(name), cu), g, o, do, dht, h0, cu)
    s = stream()
    engine = dispatch.choose(engine, call, 1, reverse, kit.device, timed, not workspace.capturing(s), s)
    run = _guarded(kit, call, launch_of(engine), cu)
    return lambda g, o, do, dht, h0, cu: body(run, g, o, do, dht, h0, cu)
