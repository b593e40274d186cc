"""The fused engine's launch variants: the launches whose best setting moves with the card, which the
tuner measures besides the two engines as their rules set them up (``hgrn_cupy.dispatch.candidates``).
This module owns their names (internal, stored in the tuning cache), the options of
``fused_recurrent.prepare`` each stands for, and which of them apply to a call; where each walk fits is
``fused_recurrent``'s rule."""
from __future__ import annotations

from ..nvrtc import ITEMSIZE
from . import fused_recurrent as fr


def _name(lanes, steps, staged=False, bulk=False):
    return ("fused_recurrent" + (", staged" if staged else "") + (", bulk copies" if bulk else "")
            + (f", {lanes}-byte lanes" if lanes else "") + (f", {steps}-step windows" if steps else ""))


STAGED = _name(fr.STAGED_LANES, None, True)
BULK = {lanes: _name(lanes, None, bulk=True) for lanes in sorted(fr.BULK_STAGES)}
# By name, prepare's options: the block walk with the 16-bit forward's lanes fixed at 4 or 8 bytes and / or
# windows of SHORT_STEPS steps a warp (None: as the rules say), the staged forward, and the bulk walk at
# each lane width.
VARIANTS = {_name(lanes, steps): {"lanes": lanes, "steps": steps}
            for steps in (None, fr.SHORT_STEPS) for lanes in (None, 4, 8) if lanes or steps}
VARIANTS[STAGED] = {"lanes": fr.STAGED_LANES, "steps": None, "staged": True}
VARIANTS.update({name: {"lanes": lanes, "steps": None, "bulk": True} for lanes, name in BULK.items()})


def variants(N, T, D, x_dtype, g_dtype, direction):
    """The names (of VARIANTS) of the launches a call's tuning measures besides the two engines, where the
    rules take a block walk: windows of SHORT_STEPS steps; for a 16-bit forward whose D also divides
    into the lane width the rule does not take, that width with either window; for a 16-bit forward whose
    D divides into 8-byte lanes, the staged forward; for a forward the bulk walk serves, the bulk walk at
    each lane width D divides into."""
    fits = fr.block_walk_fits
    if not fits(N, T, D, x_dtype, g_dtype, direction):
        return ()
    lanes = [None]
    forward16 = direction == 0 and max(ITEMSIZE[x_dtype], ITEMSIZE[g_dtype]) == 2
    if forward16:
        other = 8 if N * D < fr.BLOCK_WALK_NARROW_BELOW else 4
        if fits(N, T, D, x_dtype, g_dtype, 0, other):
            lanes.append(other)
    staged = (STAGED,) if forward16 and fits(N, T, D, x_dtype, g_dtype, 0, fr.STAGED_LANES) else ()
    bulk = tuple(name for n, name in BULK.items() if direction == 0 and fr.bulk_fits(N, T, D, x_dtype, g_dtype, n))
    return tuple(_name(n, s) for s in (None, fr.SHORT_STEPS) for n in lanes if n or s) + staged + bulk
