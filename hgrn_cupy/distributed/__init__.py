"""Context parallelism: one sequence split in time across ranks (processes or devices), in time order.

    from hgrn_cupy.distributed.torch import hgrn    # torch.distributed process group (NCCL, gloo)
    from hgrn_cupy.distributed.jax import hgrn      # inside jax.shard_map, over a named sequence axis

A rank's whole effect on later time is one affine map per channel, ``h_end = A * h_start + b``
(:mod:`hgrn_cupy.states` computes it without writing anything of size T).  The ranks exchange these maps
with one all_gather, compose their predecessors' into their incoming state (:mod:`.compose`), and run the
library's kernels on their slice; the backward mirrors it.  docs/context_parallel.md has the math, the
traffic and which rank receives what.  Importing this package imports neither torch nor JAX.
"""
