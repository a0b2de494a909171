"""The rank allocator: schedule and state (:mod:`.rank_allocator`), scorers behind one protocol
(:mod:`.scorers`, :mod:`.triton_scorer`) and compaction (:mod:`.compaction`).

It works on the adapted layers' parameters (:class:`adalora_fast.factors.AdapterLayer`), never on the
layer class itself.
"""

from .compaction import compact_layers_
from .rank_allocator import STATE_FLAGS, RankAllocator, check_state, make_scorer
from .scorers import CHUNKS, FlatScorer, ReferenceScorer, Scorer, reject_sharded_adapters

__all__ = [
    "CHUNKS",
    "STATE_FLAGS",
    "FlatScorer",
    "RankAllocator",
    "ReferenceScorer",
    "Scorer",
    "check_state",
    "compact_layers_",
    "make_scorer",
    "reject_sharded_adapters",
]
