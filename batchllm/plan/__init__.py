"""Global prefix planning (DESIGN 4.1): pure CPU, numpy only (pyarrow only for Arrow input).

``build_plan`` turns token id sequences into groups that share a prefix
(computed once) plus plain requests, in execution order; ``shard_plan`` splits
a plan across workers. See tree.py (sorted-LCP trie), types.py (Plan, stats),
groups.py (maximization) and order.py (ordering, sharding).
"""

from .groups import build_plan
from .order import shard_plan
from .tree import TokenTable
from .types import Group, Plan, PlanStats, make_plan

__all__ = ["Group", "Plan", "PlanStats", "TokenTable", "build_plan", "make_plan", "shard_plan"]
