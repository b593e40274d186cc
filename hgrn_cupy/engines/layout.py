"""What a launcher sees of a tensor (``Arr``) and the rules for vector accesses that both engines share.

A kernel moves VEC adjacent channels per access where D, every pointer (in bytes) and the strides of
every axis longer than one (in elements) are multiples of VEC; a stride of an axis of length one never
moves a pointer, so it does not count.  Layouts are fixed when a launch is prepared; pointers are
checked at each call against the masks from :func:`alignment_masks`.
"""
from __future__ import annotations

from typing import NamedTuple

from ..nvrtc import ITEMSIZE


class Arr(NamedTuple):
    """A GPU tensor as the launchers see it: pointer, shape, strides in elements, dtype name."""
    ptr: int
    shape: tuple
    strides: tuple
    dtype: str


def row_major(shape) -> tuple:
    """Strides in elements of a dense row-major array of ``shape``."""
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(out))


def vector_width(x_dtype: str, g_dtype: str) -> int:
    """Elements per 16-byte access of the wider of the two storage types."""
    return 16 // max(ITEMSIZE[x_dtype], ITEMSIZE[g_dtype])


def layout_vector_width(D, arrs, vec=None) -> int:
    """``vec`` (by default ``vector_width`` of the first two arrays' dtypes) where D and the strides of
    every axis of ``arrs`` (``Arr`` [B, T, D]) longer than one are multiples of it, else 1."""
    vec = vec or vector_width(arrs[0].dtype, arrs[1].dtype)
    if D % vec:
        return 1
    for a in arrs:
        for n, s in zip(a.shape[:2], a.strides[:2]):
            if n > 1 and s % vec:
                return 1
    return vec


def alignment_masks(vec, arrs) -> tuple:
    """Per ``Arr`` of ``arrs`` (pointers not read), the pointer bits that must be clear for ``vec``-wide
    accesses."""
    return tuple(vec * ITEMSIZE[a.dtype] - 1 for a in arrs)


def aligned(pointers, masks) -> bool:
    """Whether every pointer clears its mask (a loop: on every launch, cheaper than any() of a generator)."""
    for p, m in zip(pointers, masks):
        if p & m:
            return False
    return True
