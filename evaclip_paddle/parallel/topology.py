"""Process-wide parallel topology. Layers read the model-parallel group from here at construction,
so one model definition serves every layout: with no group (or one rank) they are plain layers."""
from __future__ import annotations

from typing import Optional

_MP_GROUP = None


def set_mp_group(group) -> None:
    global _MP_GROUP
    _MP_GROUP = group


def get_mp_group():
    return _MP_GROUP


def mp_world_size() -> int:
    g = _MP_GROUP
    return 1 if g is None else int(g.nranks)


def mp_rank() -> int:
    g = _MP_GROUP
    return 0 if g is None else int(g.rank)
