"""hgrn_cupy: CUDA kernels for the HGRN recurrence ``h[t] = exp(g[t]) * h[t-1] + x[t]``.

    o, ht = hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False)
    dx, dg, dh0 = hgrn_backward(g, o, do, dht=None, initial_state=None, cu_seqlens=None, reverse=False)

x, g: ``[B, T, D]``; states ``[N, D]``.  The math is in :mod:`hgrn_cupy.naive`.  NumPy, CuPy,
PyTorch and JAX arrays are accepted and returned as they came; GPU arrays run the CUDA kernels on
the caller's stream, CPU arrays run the NumPy reference.  ``hgrn_cupy.torch`` and
``hgrn_cupy.jax`` add differentiable wrappers.
"""
from .naive import naive_recurrent_hgrn, naive_recurrent_hgrn_bwd
from .ops import chunk_hgrn, config, fused_recurrent_hgrn, hgrn, hgrn_backward

__version__ = "0.1.0"
__all__ = ["hgrn", "chunk_hgrn", "fused_recurrent_hgrn", "hgrn_backward", "naive_recurrent_hgrn",
           "naive_recurrent_hgrn_bwd", "config", "__version__"]
