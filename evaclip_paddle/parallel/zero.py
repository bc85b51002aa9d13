"""ZeRO-1 for the training loop's GroupOptimizer, on plain collectives (same code on gloo and NCCL).

Every parameter has one owner in the sharding group; only the owner keeps its optimizer state and
updates it, then the owners broadcast the new values. Gradients arrive already averaged over the
data ranks (the loop's sync_grads all-reduces them over dp x sharding), so every rank can compute
the true global grad norm itself and clip identically. Paddle's own stage-1 optimizer is not used:
it rejects parameter groups (per-group LR / weight decay / layer decay) and reduces each gradient to
its owner only.

state_dict() / set_state_dict() speak full tensors keyed by parameter name (tensor-parallel shards
merged, sharded state gathered), so checkpoints do not depend on the layout; the merged state is
only materialised on global rank 0 (the one that writes it).
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import paddle
import paddle.distributed as dist

from .state import shard
from .topology import Topology


SPLIT = -1    # owner value of a parameter whose rows are split over the whole sharding group


def assign_owners(named_params, n: int) -> Dict[str, int]:
    """{name: sharding rank or SPLIT}. A tensor too large to balance whole (more than 1/(2n) of all
    elements, e.g. a tiny model's token embedding) is split by rows over every rank (when its rows
    divide); the rest go greedily, largest first, to the least loaded rank (deterministic)."""
    sizes = [(int(np.prod(p.shape)), i, name, p) for i, (name, p) in enumerate(named_params)]
    total = sum(s for s, *_ in sizes)
    load, owner = [0] * n, {}
    for size, _, name, p in sizes:
        if n > 1 and size * 2 * n > total and len(p.shape) >= 1 and p.shape[0] % n == 0:
            owner[name] = SPLIT
            load = [x + size // n for x in load]
    for size, _, name, _ in sorted((t for t in sizes if t[2] not in owner), key=lambda t: (-t[0], t[1])):
        k = min(range(n), key=lambda r: (load[r], r))
        owner[name] = k
        load[k] += size
    return owner


class ShardedOptimizer:
    """Wraps a train.optim.GroupOptimizer for a multi-rank layout (sharding degree may be 1: then it
    only merges tensor-parallel state for checkpoints).

    A row-split tensor is handed to the inner optimizer as a proxy parameter holding this rank's
    rows (its gradient rows set before each step); every rank updates its rows, then the rows are
    all-gathered. LAMB's per-tensor norms of a proxy are summed over the sharding group.
    """

    def __init__(self, inner, topo: Topology):
        self.inner, self.topo = inner, topo
        self.named = list(inner.named_parameters())
        sd = topo.sharding_degree
        self.me = int(topo.sharding_group.rank) if sd > 1 else 0
        self.owner = assign_owners(self.named, sd) if sd > 1 else {n: 0 for n, _ in self.named}
        self._src = list(topo.sharding_group.ranks) if sd > 1 else [topo.rank]
        self.proxies: Dict[str, tuple] = {}     # name -> (full parameter, proxy, first row, last row)
        for name, p in self.named:
            if self.owner[name] == SPLIT:
                rows = p.shape[0] // sd
                q = paddle.create_parameter([rows] + list(p.shape[1:]), "float32")
                q.is_distributed = True          # routes LAMB's norms through _sum_shards
                self.proxies[name] = (p, q, self.me * rows, (self.me + 1) * rows)
        if self.proxies:   # new group dicts: the loop keeps using the original lists for its gradients
            inner.param_groups = [dict(g, params=[self.proxies[n][1] if n in self.proxies else q
                                                  for n, q in zip(g["param_names"], g["params"])])
                                  for g in inner.param_groups]
        if sd > 1:
            inner.owned = {n for n, k in self.owner.items() if k in (self.me, SPLIT)}
        if topo.mp_degree > 1 or self.proxies:
            inner.shard_sq_reduce = self._sum_shards

    def _sum_shards(self, sq):
        sq = sq.clone()
        cur = self.inner._current
        split = next((full for full, q, _, _ in self.proxies.values() if q is cur), None)
        if split is not None:
            dist.all_reduce(sq, group=self.topo.sharding_group)
            cur = split
        if self.topo.mp_degree > 1 and getattr(cur, "is_distributed", False):
            dist.all_reduce(sq, group=self.topo.mp_group)
        return sq

    # the loop reads/sets LRs through param_groups
    @property
    def param_groups(self):
        return self.inner.param_groups

    def clear_grad(self) -> None:
        self.inner.clear_grad()
        for p, _, _, _ in self.proxies.values():
            p.clear_gradient(False)

    def state_numel(self) -> int:
        """Optimizer-state elements held by this rank (measures the ZeRO saving)."""
        return sum(int(np.prod(t.shape)) for s in self.inner.state.values() for t in s.values())

    @paddle.no_grad()
    def step(self) -> None:
        for p, q, a, b in self.proxies.values():
            paddle.assign(p[a:b].astype("float32"), output=q)
            if p.grad is not None:
                q._set_grad_ivar(p.grad[a:b].astype("float32"))
        self.inner.step()
        if self.topo.sharding_degree > 1:
            self._broadcast_params()
        for p, q, _, _ in self.proxies.values():
            parts: List = []
            dist.all_gather(parts, q, group=self.topo.sharding_group)
            paddle.assign(paddle.concat(parts, axis=0).astype(p.dtype), output=p)

    def _broadcast_params(self) -> None:
        # one flat buffer per owner: a few large broadcasts instead of one per parameter
        for k, src in enumerate(self._src):
            params = [p for n, p in self.named if self.owner[n] == k]
            if not params:
                continue
            flat = paddle.concat([p.astype("float32").reshape([-1]) for p in params])
            dist.broadcast(flat, src=src, group=self.topo.sharding_group)
            if k == self.me:
                continue
            off = 0
            for p in params:
                size = int(np.prod(p.shape))
                paddle.assign(flat[off:off + size].reshape(p.shape).astype(p.dtype), output=p)
                off += size

    # ---- layout-independent state ----------------------------------------------------------
    def state_dict(self) -> dict:
        """Full state on global rank 0 (other ranks get the same keys with an empty 'state');
        collective over the whole job."""
        topo, inner = self.topo, self.inner
        have = paddle.to_tensor([1 if n in inner.state else 0 for n, _ in self.named], dtype="int32")
        # (a row-split tensor's state is on every rank; anything else on its owner only)
        if topo.sharding_degree > 1:
            dist.all_reduce(have, group=topo.sharding_group)
        have = have.numpy()
        full: Dict[str, dict] = {}
        keep = topo.rank == 0
        for i, (name, p) in enumerate(self.named):
            if not have[i]:
                continue
            slots = {}
            for key in inner.state_keys:
                t = inner.state[name][key] if name in inner.state else paddle.zeros(p.shape, dtype="float32")
                if self.owner[name] == SPLIT:
                    rows: List = []
                    dist.all_gather(rows, t, group=topo.sharding_group)
                    t = paddle.concat(rows, axis=0)
                elif topo.sharding_degree > 1:
                    t = t.clone()
                    dist.broadcast(t, src=self._src[self.owner[name]], group=topo.sharding_group)
                if topo.mp_degree > 1 and getattr(p, "is_distributed", False):
                    parts: List = []
                    dist.all_gather(parts, t, group=topo.mp_group)
                    arr = np.concatenate([x.numpy() for x in parts], axis=int(p.split_axis)) if keep else None
                else:
                    arr = t.numpy() if keep else None
                slots[key] = arr
            if keep:
                full[name] = slots
        return {"t": inner.t, "type": type(inner).__name__, "state": full if keep else {}, "merged": True,
                "groups": [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                           for g in inner.param_groups]}

    def set_state_dict(self, sd: dict) -> None:
        """Loads a full (merged or single-process) state: keeps this rank's owned, mp-sliced part."""
        topo, inner = self.topo, self.inner
        mine = {}
        params = dict(self.named)
        unknown = [n for n in sd["state"] if n not in params]
        if unknown:
            raise ValueError(f"optimizer state has parameters this model lacks: {unknown[:5]}")
        for name, slots in sd["state"].items():
            if self.owner[name] not in (self.me, SPLIT):
                continue
            p = params[name]
            dist_axis = int(p.split_axis) if topo.mp_degree > 1 and getattr(p, "is_distributed", False) else None
            mine[name] = {k: shard(np.asarray(v), dist_axis, topo.mp_rank, topo.mp_degree, name)
                          if dist_axis is not None else np.asarray(v) for k, v in slots.items()}
            if name in self.proxies:
                _, p, lo, hi = self.proxies[name]
                mine[name] = {k: np.ascontiguousarray(v[lo:hi]) for k, v in mine[name].items()}
            for k, v in mine[name].items():
                if list(v.shape) != list(p.shape):
                    raise ValueError(f"optimizer state '{name}::{k}' has shape {list(v.shape)}, the parameter "
                                     f"here is {list(p.shape)}")
        inner.set_state_dict(dict(sd, state=mine))
