"""hgrn_cupy: CUDA kernels for the HGRN recurrence ``h[t] = exp(g[t]) * h[t-1] + x[t]``.

    o, ht = hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False)
    dx, dg, dh0 = hgrn_backward(g, o, do, dht=None, initial_state=None, cu_seqlens=None, reverse=False,
                                engine="auto")

x, g: ``[B, T, D]``; states ``[N, D]``.  The math is in :mod:`hgrn_cupy.naive`.  NumPy, CuPy,
PyTorch and JAX arrays are accepted and returned as they came; GPU arrays run the CUDA kernels on
the caller's stream, CPU arrays run the NumPy reference.  ``hgrn_cupy.torch`` and
``hgrn_cupy.jax`` add differentiable wrappers; ``hgrn_cupy.distributed`` splits time across devices.
The flow of a call: api -> checks -> plans -> dispatch -> engines -> kernels (docs/design.md).
"""
from .api import chunk_hgrn, fused_recurrent_hgrn, hgrn, hgrn_backward
from .dispatch import UntunedWarning
from .naive import naive_recurrent_hgrn, naive_recurrent_hgrn_bwd
from .settings import config
from .workspace import release as release_workspaces

__version__ = "0.1.0"
__all__ = ["hgrn", "chunk_hgrn", "fused_recurrent_hgrn", "hgrn_backward", "naive_recurrent_hgrn",
           "naive_recurrent_hgrn_bwd", "config", "release_workspaces", "UntunedWarning", "__version__"]
