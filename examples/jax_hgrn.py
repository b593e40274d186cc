"""Train a small HGRN block in JAX, with the recurrence through ``hgrn_cupy.jax.hgrn``.

    i  = silu(x W_i) * (1 - f)                  input, scaled by what the gate lets in
    f  = lb + (1 - lb) * sigmoid(x W_f)         forget gate with a lower bound lb
    h  = hgrn(i, log f)                         h[t] = f[t] * h[t-1] + i[t]
    y  = (rmsnorm(h) * silu(x W_g)) W_o         output gate and projection

The task is synthetic: predict an exponentially decaying running sum of a fixed projection of the
inputs (a job a gated linear recurrence can learn).  The whole training step (forward, backward
through the recurrence's custom VJP, update) is one ``jax.jit`` program: on a GPU the CUDA kernels
run inside it; on CPU the NumPy reference does.  Uses optax when it is installed, plain SGD
otherwise.  Prints the loss at the start and the end, and exits with status 1 unless it decreased.
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hgrn_cupy.jax import hgrn

B, T, D_MODEL, D_HIDDEN = 8, 64, 32, 64
STEPS, LR = 150, 3e-3
LOWER_BOUND = 0.5


def init_params(key):
    ks = jax.random.split(key, 4)
    scale = D_MODEL ** -0.5
    return {
        "w_i": jax.random.normal(ks[0], (D_MODEL, D_HIDDEN)) * scale,
        "w_f": jax.random.normal(ks[1], (D_MODEL, D_HIDDEN)) * scale,
        "w_g": jax.random.normal(ks[2], (D_MODEL, D_HIDDEN)) * scale,
        "w_o": jax.random.normal(ks[3], (D_HIDDEN, D_MODEL)) * D_HIDDEN ** -0.5,
        "norm": jnp.ones((D_HIDDEN,)),
    }


def hgrn_block(params, x):
    f = LOWER_BOUND + (1.0 - LOWER_BOUND) * jax.nn.sigmoid(x @ params["w_f"])
    i = jax.nn.silu(x @ params["w_i"]) * (1.0 - f)
    h, _ = hgrn(i, jnp.log(f))
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6) * params["norm"]
    return (h * jax.nn.silu(x @ params["w_g"])) @ params["w_o"]


def make_data(key):
    """Inputs and their targets: y[t] = 0.9 * y[t-1] + x[t] A, a fixed linear recurrence."""
    kx, ka = jax.random.split(key)
    x = jax.random.normal(kx, (B, T, D_MODEL))
    a = jax.random.normal(ka, (D_MODEL, D_MODEL)) * D_MODEL ** -0.5
    u = x @ a
    y = jax.lax.scan(lambda h, ut: (0.9 * h + ut, 0.9 * h + ut), jnp.zeros((B, D_MODEL)), u.swapaxes(0, 1))[1]
    y = y.swapaxes(0, 1)
    return x, y / jnp.std(y)


def loss_fn(params, x, y):
    return jnp.mean((hgrn_block(params, x) - y) ** 2)


def make_step():
    try:
        import optax
    except ImportError:
        optax = None
    if optax is None:
        def step(params, state, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            return jax.tree_util.tree_map(lambda p, g: p - 30 * LR * g, params, grads), state, loss
        return "plain SGD", jax.jit(step), lambda params: None

    opt = optax.adam(LR)

    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss
    return "optax.adam", jax.jit(step), opt.init


def main():
    backend = jax.default_backend()
    path = "CUDA kernels inside the jitted step" if backend == "gpu" else "NumPy reference (pure_callback)"
    name, step, init = make_step()
    print(f"backend: {backend}; recurrence: {path}; optimizer: {name}")
    params = init_params(jax.random.PRNGKey(0))
    state = init(params)
    x, y = make_data(jax.random.PRNGKey(1))

    t0 = time.perf_counter()
    first = float(loss_fn(params, x, y))
    for _ in range(STEPS):
        params, state, loss = step(params, state, x, y)
    last = float(loss_fn(params, x, y))
    seconds = time.perf_counter() - t0

    print(f"loss at start: {first:.4f}")
    print(f"loss at end:   {last:.4f}   ({STEPS} steps, {seconds:.1f} s)")
    decreased = bool(np.isfinite(last) and last < first)
    print(f"loss decreased: {'yes' if decreased else 'no'}")
    return 0 if decreased else 1


if __name__ == "__main__":
    sys.exit(main())
