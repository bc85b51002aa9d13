"""Where a parallel layout plugs into the training loop.

The loop calls these and nothing else for anything that depends on the layout; the single-process
defaults do nothing. `default_hooks(topo)` gives plain data parallelism on top of
parallel.topology (gradients averaged over the data group); tensor parallelism needs nothing more
here (the layers communicate themselves, and grad norms count sharded tensors once per mp group);
ZeRO sharding plugs in through `wrap_optimizer` (parallel.zero.ShardedOptimizer); stage 2 also
replaces the gradient all-reduce and the norm with the owner-only reduce of that optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import paddle


_BUCKET = 64   # gradients per all-reduce buffer


def _identity(x):
    return x


def _noop(*_args, **_kw):
    return None


def _local_state(model) -> Dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


@dataclass
class ParallelHooks:
    # model -> the object the loop calls forward on (e.g. fleet.distributed_model); state is read from
    # the unwrapped model.
    wrap_model: Callable = _identity
    # GroupOptimizer -> object with step(), clear_grad(), state_dict(), set_state_dict(), param_groups
    wrap_optimizer: Callable = _identity
    # params -> None: make gradients the data-parallel average (after backward, before the norm)
    sync_grads: Optional[Callable[[List], None]] = None
    # params -> 0-d fp32 tensor: global L2 norm of gradients (None: optim.global_grad_norm)
    grad_norm: Optional[Callable[[List], paddle.Tensor]] = None
    # params -> the tensors whose gradients the clip scales (stage 2 adds its row-split proxies)
    grad_params: Callable[[List], List] = _identity
    # model -> full numpy state dict (on rank 0 at least) for checkpoints
    full_state_dict: Callable = _local_state
    # (model, numpy state dict) -> None: load full tensors (slicing shards under TP)
    load_state_dict: Optional[Callable] = None
    # bool -> bool: True when the flag is True on any rank (non-finite step consensus)
    any_rank: Callable[[bool], bool] = _identity
    # loss tensor -> float logged for the step (the global batch's loss, equal on every rank)
    loss_value: Callable = float
    barrier: Callable[[], None] = _noop
    extra: dict = field(default_factory=dict)


def default_hooks(topo) -> ParallelHooks:
    """Hooks for a topology from parallel.topology.init_topology (single process: all defaults)."""
    if topo is None or topo.world == 1:
        return ParallelHooks()
    import paddle.distributed as dist
    from ..parallel import state as pstate

    from ..parallel.zero import ShardedOptimizer

    def sync_grads(params):
        """Averages gradients over the data ranks, coalesced into a few flat buffers."""
        if topo.data_world == 1:
            return
        with paddle.no_grad():
            live = [p for p in params if p.grad is not None]
            for i in range(0, len(live), _BUCKET):
                chunk = live[i:i + _BUCKET]
                flat = paddle.concat([p.grad.reshape([-1]) for p in chunk])
                dist.all_reduce(flat, group=topo.data_group)
                flat.scale_(1.0 / topo.data_world)
                off = 0
                for p in chunk:
                    n = int(np.prod(p.grad.shape))
                    p.grad.copy_(flat[off:off + n].reshape(p.grad.shape), False)
                    off += n

    def loss_value(loss) -> float:
        """The loss of the global batch: mean of the data ranks' (local_loss) values."""
        if topo.data_world == 1:
            return float(loss)
        t = loss.detach().astype("float32").reshape([1])
        dist.all_reduce(t, group=topo.data_group)
        return float(t.numpy()[0]) / topo.data_world

    def any_rank(flag: bool) -> bool:
        t = paddle.to_tensor([1 if flag else 0], dtype="int32")
        dist.all_reduce(t)
        return int(t.numpy()[0]) > 0

    grad_norm = lambda params: pstate.global_grad_norm_sq(params, topo).sqrt()  # noqa: E731
    sharded: dict = {}

    stage2 = topo.sharding_stage == "stage2" and topo.sharding_degree > 1

    def wrap_optimizer(opt):
        sharded["opt"] = ShardedOptimizer(opt, topo)
        if stage2:
            sharded["opt"].enable_stage2()
        return sharded["opt"]

    if stage2:
        sync_grads = lambda params: sharded["opt"].reduce_grads()              # noqa: E731
        grad_norm = lambda params: sharded["opt"].grad_norm_sq().sqrt()        # noqa: E731
        grad_params = lambda params: sharded["opt"].grad_params(params)        # noqa: E731
    else:
        grad_params = _identity

    return ParallelHooks(
        wrap_optimizer=wrap_optimizer,
        sync_grads=sync_grads,
        loss_value=loss_value,
        grad_norm=grad_norm,
        grad_params=grad_params,
        full_state_dict=lambda model: pstate.full_state_dict(model, topo),
        load_state_dict=lambda model, sd: pstate.load_full_state_dict(model, sd, topo, strict=False),
        any_rank=any_rank,
        barrier=dist.barrier,
    )
