"""The engines: one module per engine, each turning a planned call into prepared kernel launches with
one interface, ``prepare(direction, tensors, N, reverse, device, varlen) -> launch(stream_ptr, pointers,
states, cu, workspace)`` (see ``chunk.prepare``), plus ``names`` (every instantiation, for CI)."""
from . import chunk, fused_recurrent

ENGINES = {"chunk": chunk, "fused_recurrent": fused_recurrent}
