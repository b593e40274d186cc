"""Context-parallel HGRN for JAX (``hgrn_cupy.distributed.jax``) under ``jax.shard_map`` on host CPU devices.

The checks run in a subprocess (this file as a script) that sets ``XLA_FLAGS`` to 8 host devices before
JAX is imported, whatever this process has imported already.  Meshes of 1, 2, 4 and 7 devices; forward and
gradients (``jax.vjp`` of the jitted shard_map, random cotangents for o and ht) against the float64 NumPy
reference on the whole sequence; float32 in every combination of reverse / initial state / final state,
float64 and bfloat16 in two.  Seeds are printed with every failure.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax")


def test_shard_map_matches_one_sequence():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]
    assert "all cases passed" in r.stdout, r.stdout[-4000:]


# ---------------------------------------------------------------------------------------------
# the subprocess

def cases():
    for reverse in (False, True):
        for h0 in (False, True):
            for final in (False, True):
                yield "float32", reverse, h0, final
    for dtype in ("float64", "bfloat16"):
        yield dtype, False, False, False
        yield dtype, True, True, True


def run_case(W, case, seed):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import hgrn_cupy as hc
    from conftest import TOL, rel_err
    from hgrn_cupy.distributed.jax import hgrn

    dtype, reverse, with_h0, final = case
    B, D, T = 2, 5, 3 * W
    rng = np.random.default_rng(seed)
    x64, do64 = rng.standard_normal((B, T, D)), rng.standard_normal((B, T, D))
    g64 = -np.log1p(np.exp(-rng.standard_normal((B, T, D)) - 1.0))
    h064, dht64 = rng.standard_normal((B, D)), rng.standard_normal((B, D))
    jdt = jnp.dtype(dtype)
    acc = jnp.float64 if dtype == "float64" else jnp.float32
    x, g = jnp.asarray(x64).astype(jdt), jnp.asarray(g64).astype(jdt)
    h0 = jnp.asarray(h064).astype(acc)
    mesh = Mesh(np.array(jax.devices()[:W]), ("sp",))
    seq = P(None, "sp")

    def body(x, g, *h):
        return hgrn(x, g, h[0] if h else None, final, reverse=reverse, axis_name="sp")

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(seq, seq) + ((P(),) if with_h0 else ()),
                              out_specs=(seq, P() if final else None)))
    args = (x, g) + ((h0,) if with_h0 else ())
    (o, ht), vjp = jax.vjp(f, *args)
    grads = vjp((jnp.asarray(do64).astype(jdt), jnp.asarray(dht64).astype(acc) if final else None))

    f64 = lambda a: np.asarray(a.astype(jnp.float64) if a.dtype == jnp.bfloat16 else a, np.float64)  # noqa: E731
    xr, gr, h0r = f64(x), f64(g), (f64(h0) if with_h0 else None)
    o_ref, ht_ref = hc.naive_recurrent_hgrn(xr, gr, h0r, True, reverse=reverse)
    dx_ref, dg_ref, dh0_ref = hc.naive_recurrent_hgrn_bwd(gr, o_ref, do64, dht64 if final else None, h0r,
                                                          reverse=reverse)
    errs = {"o": rel_err(f64(o), o_ref), "dx": rel_err(f64(grads[0]), dx_ref), "dg": rel_err(f64(grads[1]), dg_ref)}
    if final:
        errs["ht"] = rel_err(f64(ht), ht_ref)
        assert ht.dtype == acc, ht.dtype
    else:
        assert ht is None
    if with_h0:
        errs["dh0"] = rel_err(f64(grads[2]), dh0_ref)
    assert o.dtype == jdt and grads[0].dtype == jdt
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, f"W={W} case={case} seed={seed}: rel errors above {TOL[dtype]}: {bad}"


def check_argument_errors():
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from hgrn_cupy.distributed.jax import hgrn

    x = jnp.zeros((2, 4, 3))
    with pytest.raises(ValueError, match="not a mesh axis"):
        hgrn(x, x, axis_name="sp")
    mesh = Mesh(np.array(jax.devices()[:2]), ("sp",))
    seq = P(None, "sp")

    def mapped(**kw):
        return jax.shard_map(lambda x, g: hgrn(x, g, axis_name="sp", **kw)[0], mesh=mesh, in_specs=(seq, seq),
                             out_specs=seq)

    with pytest.raises(ValueError, match="cu_seqlens is not supported"):
        mapped(cu_seqlens=jnp.array([0, 2]))(x, x)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, D\]"):
        mapped(initial_state=jnp.zeros((3, 3)))(x, x)
    with pytest.raises(TypeError, match="reverse must be a bool"):
        mapped(reverse=1)(x, x)
    with pytest.raises(TypeError, match="g must be a JAX or NumPy array, got list"):
        jax.shard_map(lambda x, g: hgrn(x, [[[0.0] * 3] * 2] * 2, axis_name="sp")[0], mesh=mesh,
                      in_specs=(seq, seq), out_specs=seq)(x, x)
    assert mapped(reverse=np.bool_(True))(x, x).shape == x.shape  # NumPy bools pass, as at the top level
    with pytest.raises(TypeError, match="x has dtype int32"):
        jax.shard_map(lambda x, g: hgrn(x.astype(jnp.int32), g, axis_name="sp")[0], mesh=mesh,
                      in_specs=(seq, seq), out_specs=seq)(x, x)


def main():
    import jax

    jax.config.update("jax_enable_x64", True)
    assert len(jax.devices()) >= 7, f"XLA_FLAGS gave {len(jax.devices())} devices"
    check_argument_errors()
    seed = int(np.random.SeedSequence().entropy % 2**31)
    failures = []
    for W in (1, 2, 4, 7):
        for i, case in enumerate(cases()):
            try:
                run_case(W, case, seed + 97 * W + i)
            except Exception as e:  # keep going: every failure is reported
                failures.append(f"W={W} case={case} seed={seed + 97 * W + i}: {type(e).__name__}: {e}")
    if failures:
        print("\n".join(failures))
        sys.exit(1)
    print("all cases passed")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
