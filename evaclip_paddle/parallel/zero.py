"""ZeRO stage 1 and 2 for the training loop's GroupOptimizer, on plain collectives (same code on gloo
and NCCL, so CPU CI runs exactly what GPU users run).

Every parameter has one owner in the sharding group; only the owner keeps its optimizer state and
updates it, then the owners broadcast the new values.
- stage 1: gradients arrive already averaged over the data ranks (the loop's sync_grads all-reduces
  them over dp x sharding), so every rank computes the true global grad norm itself.
- stage 2 (`enable_stage2`): while backward runs, each bucket of gradients is summed onto the
  owners only (one reduce per owner present, i.e. a reduce-scatter: half the traffic of an
  all-reduce), averaged over the dp replicas of that owner, and freed on the other ranks. The global
  norm is the sum of the owners' partial squares.
Paddle's own sharding is not used: its stage-1 optimizer rejects parameter groups (per-group LR /
weight decay / layer decay), and its stage 2 (group_sharded_parallel) needs a paddle.optimizer and
has no CPU support in Paddle 3.3.1.

state_dict() / set_state_dict() speak full tensors keyed by parameter name (tensor-parallel shards
merged, sharded state gathered), so checkpoints do not depend on the layout; the merged state is
only materialised on global rank 0 (the one that writes it).
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import paddle
import paddle.distributed as dist

from .state import global_grad_norm_sq, shard
from .topology import Topology


SPLIT = -1    # owner value of a parameter whose rows are split over the whole sharding group
_OVERLAP_BUCKET_NUMEL = 1 << 23   # stage-2 buckets: about 8M elements (32 MiB fp32) each


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
        self._params = dict(self.named)
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
        self._proxy_of = {id(p): q for p, q, _, _ in self.proxies.values()}
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

    def grad_numel(self) -> int:
        """Gradient elements this rank holds (stage 2 keeps a row-split tensor's rows on its proxy)."""
        held = [p for _, p in self.named] + [q for _, q, _, _ in self.proxies.values()]
        return sum(int(np.prod(p.grad.shape)) for p in held if p.grad is not None)

    def grad_params(self, params) -> List:
        """The parameters whose gradients the loop clips: under stage 2 the proxies hold the rows."""
        return list(params) + [q for _, q, _, _ in self.proxies.values()]

    # ---- stage 2 -------------------------------------------------------------------------------
    def enable_stage2(self) -> None:
        """Reduces gradients bucket by bucket while backward runs: a hook on every parameter marks
        its gradient final; when a bucket's last one arrives, the bucket is reduced onto the owners
        and the other ranks' copies are freed, so backward never holds much more than 1/S of the
        gradients plus one bucket. Buckets follow reverse registration order (about backward order);
        every rank runs the same graph, so they complete, and communicate, in the same order."""
        order = [name for name, _ in reversed(self.named)]
        sizes = {name: int(np.prod(p.shape)) for name, p in self.named}
        self._buckets: List[List[str]] = [[]]
        numel = 0
        for name in order:
            if self._buckets[-1] and numel + sizes[name] > _OVERLAP_BUCKET_NUMEL:
                self._buckets.append([])
                numel = 0
            self._buckets[-1].append(name)
            numel += sizes[name]
        self._bucket_of = {name: b for b, names in enumerate(self._buckets) for name in names}
        self._pending = [len(names) for names in self._buckets]   # 0: the bucket has been reduced
        # gradient elements held so far this step, and the most held at once (measures the saving)
        self._held, self.peak_grad_numel = 0, 0
        for name, p in self.named:
            p._register_backward_hook(self._make_hook(name, sizes[name]))

    def _make_hook(self, name: str, size: int):
        def hook():
            self._held += size
            self.peak_grad_numel = max(self.peak_grad_numel, self._held)
            b = self._bucket_of[name]
            self._pending[b] -= 1
            if self._pending[b] == 0:
                self._reduce_bucket(b)
        return hook

    @paddle.no_grad()
    def reduce_grads(self) -> None:
        """Stage 2, after backward: reduces the buckets backward did not complete (in bucket order,
        the same on every rank), then re-arms the buckets for the next step. Every rank must hold
        gradients for the same parameters (true for a CLIP step)."""
        for b in range(len(self._buckets)):
            if self._pending[b]:
                self._reduce_bucket(b)
        self._pending = [len(names) for names in self._buckets]
        self._held = 0

    @paddle.no_grad()
    def _reduce_bucket(self, b: int) -> None:
        """The data-parallel average of the bucket's gradients, on their owners only; freed elsewhere."""
        topo = self.topo
        self._pending[b] = 0
        names = [n for n in self._buckets[b] if self._params[n].grad is not None]
        for k, src in enumerate(self._src):
            chunk = []
            for name in names:
                p = self._params[name]
                if self.owner[name] == k:
                    chunk.append((p, None, None))
                elif name in self.proxies:      # owner k's rows of a row-split tensor
                    rows = self.proxies[name][1].shape[0]
                    chunk.append((p, k * rows, (k + 1) * rows))
            if not chunk:
                continue
            flat = paddle.concat([(p.grad if a is None else p.grad[a:c]).astype("float32").reshape([-1])
                                  for p, a, c in chunk])
            dist.reduce(flat, dst=src, group=topo.sharding_group)
            if k != self.me:
                continue
            if topo.dp_degree > 1:
                dist.all_reduce(flat, group=topo.dp_group)
            flat.scale_(1.0 / topo.data_world)
            off = 0
            for p, a, c in chunk:
                shape = list(p.shape) if a is None else [c - a] + list(p.shape[1:])
                size = int(np.prod(shape))
                val = flat[off:off + size].reshape(shape).astype(p.grad.dtype)
                if a is None:
                    p.grad.copy_(val, False)
                else:
                    self._proxy_of[id(p)]._set_grad_ivar(val.clone())
                off += size
        for name in names:
            if self.owner[name] != self.me:
                p = self._params[name]
                kept = int(np.prod(self.proxies[name][1].shape)) if name in self.proxies else 0  # rows on the proxy
                self._held -= int(np.prod(p.shape)) - kept
                p.clear_gradient(False)     # this rank keeps 1/S of the gradients

    def grad_norm_sq(self) -> paddle.Tensor:
        """Stage 2: squared global gradient norm from the owners' pieces, equal on every rank."""
        mine = [(p, self.proxies[name][1].grad if name in self.proxies else p.grad)   # (row-split: on the proxy)
                for name, p in self.named if self.owner[name] in (self.me, SPLIT)]
        return global_grad_norm_sq(mine, self.topo, owned_shard=True)

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
