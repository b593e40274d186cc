"""The engines: one module per engine, each turning a planned call into prepared kernel launches with
one interface, ``prepare(direction, tensors, N, reverse, device, varlen) -> launch(stream_ptr, pointers,
states, cu, workspace)`` (see ``chunk.prepare``), plus ``names`` (every instantiation, for CI); and the
launch variants the tuner may choose besides the engines as their rules set them up."""
from . import chunk, fused_recurrent, fused_variants

ENGINES = {"chunk": chunk, "fused_recurrent": fused_recurrent}
# name -> (engine, options of its prepare): launches whose best setting moves with the card, so that the
# tuner measures them (hgrn_cupy.dispatch.candidates); internal names, stored in the tuning cache.
VARIANTS = {name: ("fused_recurrent", options) for name, options in fused_variants.VARIANTS.items()}
VARIANTS.update({name: ("chunk", options) for name, options in chunk.VARIANTS.items()})


def prepare(name, direction, tensors, N, reverse, device, varlen=False):
    """The prepared launch of engine or variant ``name`` (arguments as ``chunk.prepare``)."""
    engine, options = VARIANTS.get(name, (name, {}))
    return ENGINES[engine].prepare(direction, tensors, N, reverse, device, varlen, **options)
