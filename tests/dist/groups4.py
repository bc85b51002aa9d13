"""4 ranks on gloo, layout from $LAYOUT: mp2dp2 (tensor 2 x data 2) or mp2sh2 (tensor 2 x sharding 2).

1. Every group of the topology all-reduces / all-gathers rank ids: members and their order are checked.
2. A small tensor-parallel net (vocab-parallel embedding, column linear, sharded LayerNorm, row linear)
   on each data rank's slice of a batch: data-parallel averaged, merged gradients and the global
   gradient norm equal one process on the whole batch.
3. mp2sh2 only: fleet's stage-1 sharding optimizer (DygraphShardingOptimizer) reduces each gradient to
   its owner; global_grad_norm_sq(owned params, owned_shard=True) must equal the true norm, and an SGD
   step with global-norm clipping must match the single-process step.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import dict_diff, report  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402
import paddle.nn as nn  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

from evaclip_paddle.model.norm import make_norm  # noqa: E402
from evaclip_paddle.parallel import state  # noqa: E402
from evaclip_paddle.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding  # noqa: E402
from evaclip_paddle.parallel.topology import init_topology, mp_group_scope  # noqa: E402

TOL = 1e-5
paddle.set_device("cpu")
LAYOUT = os.environ.get("LAYOUT", "mp2dp2")
V, H, FF, B, T, CLASSES = 16, 8, 16, 8, 5, 4


class Net(nn.Layer):
    def __init__(self):
        super().__init__()
        self.emb = VocabParallelEmbedding(V, H)
        self.fc1 = ColumnParallelLinear(H, FF)
        self.norm = make_norm(FF, 1e-5, sharded=True)
        self.fc2 = RowParallelLinear(FF, H)
        self.head = nn.Linear(H, CLASSES)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc2(self.norm(F.gelu(self.fc1(h))))
        return self.head(h.mean(1))


def full_weights():
    rng = np.random.RandomState(3)
    with mp_group_scope(None):
        net = Net()
    return {k: (rng.randn(*v.shape) * 0.5).astype("float32") for k, v in net.state_dict().items()}


def check_groups(topo):
    W, mp, sd = topo.world, topo.mp_degree, topo.sharding_degree
    r = topo.rank
    want = {  # members from the rank formula rank = (dp*sd + s)*mp + m
        "mp": [r - r % mp + i for i in range(mp)],
        "sharding": [(topo.dp_rank * sd + s) * mp + topo.mp_rank for s in range(sd)],
        "dp": [(d * sd + topo.sharding_rank) * mp + topo.mp_rank for d in range(topo.dp_degree)],
        "data": list(range(topo.mp_rank, W, mp)),
    }
    checked = {}
    for name, members in want.items():
        g = getattr(topo, f"{name}_group")
        if len(members) == 1:
            assert g is None, f"{name} group should be None for degree 1"
            continue
        x = paddle.to_tensor([float(r)])
        dist.all_reduce(x, group=g)
        parts = []
        dist.all_gather(parts, paddle.to_tensor([float(r)]), group=g)
        got = [int(p.item()) for p in parts]
        assert float(x.item()) == float(sum(members)) and got == members, (name, members, float(x.item()), got)
        checked[name] = got
    assert topo.data_rank == r // mp and topo.data_world == W // mp, topo.describe()
    report(case="groups", layout=LAYOUT, rank=r, groups=checked, topo=topo.describe())


def run_net(net, ids, labels):
    net.clear_gradients()
    loss = F.cross_entropy(net(paddle.to_tensor(ids)), paddle.to_tensor(labels))
    loss.backward()
    return loss


def check_training(topo, full):
    rng = np.random.RandomState(5)
    ids = rng.randint(0, V, (B, T)).astype("int64")
    labels = rng.randint(0, CLASSES, (B,)).astype("int64")
    with mp_group_scope(None):
        ref = Net()
    state.load_full_state_dict(ref, full)
    run_net(ref, ids, labels)
    g_ref = {k: p.grad.numpy() for k, p in ref.named_parameters()}
    norm_ref = float(sum((g.astype(np.float64) ** 2).sum() for g in g_ref.values()))

    net = Net()
    state.load_full_state_dict(net, full, topo)
    n = B // topo.data_world
    sl = slice(topo.data_rank * n, (topo.data_rank + 1) * n)
    run_net(net, ids[sl], labels[sl])
    res = dict(case="train", layout=LAYOUT, rank=topo.rank)
    if topo.dp_degree > 1:                                   # what the training loop does for dp
        with paddle.no_grad():
            for p in net.parameters():
                dist.all_reduce(p.grad, group=topo.dp_group)
                p.grad.scale_(1.0 / topo.dp_degree)
        res["grad"], res["grad_scaled"], _ = dict_diff(g_ref, state.full_grads(net, topo))
        res["norm_sq_rel"] = abs(float(state.global_grad_norm_sq(net.parameters(), topo)) - norm_ref) / norm_ref
        report(**res)
        assert res["grad_scaled"] <= TOL and res["norm_sq_rel"] < 1e-5, res
        return

    # Sharding stage 1 through fleet: step() reduces each gradient to its owner (lr 0: no update).
    from paddle.distributed import fleet
    opt = fleet.distributed_optimizer(paddle.optimizer.SGD(learning_rate=0.0, parameters=net.parameters()))
    opt.step()
    owned = opt._inner_opt._rank2params[topo.sharding_rank]  # DygraphShardingOptimizer's partition (test-only)
    mine = float(state.global_grad_norm_sq(owned, topo, owned_shard=True))
    naive = float(state.global_grad_norm_sq(net.parameters(), topo))
    res["norm_sq_rel"] = abs(mine - norm_ref) / norm_ref
    res["norm_sq_rel_naive"] = abs(naive - norm_ref) / norm_ref  # all params, no sharding reduction
    # fleet's own clip under TP x sharding uses the true global norm: an SGD step with clipping
    # matches the single-process one.
    clip = 0.5 * norm_ref ** 0.5                             # forces a real clip
    run_net(net, ids[sl], labels[sl])
    opt = fleet.distributed_optimizer(paddle.optimizer.SGD(
        learning_rate=1.0, parameters=net.parameters(), grad_clip=nn.ClipGradByGlobalNorm(clip)))
    opt.step()
    factor = min(1.0, clip / norm_ref ** 0.5)
    want = {k: full[k] - factor * g_ref[k] for k in full}
    res["sgd_step"], res["sgd_step_scaled"], _ = dict_diff(want, state.full_state_dict(net, topo))
    report(**res)
    assert res["norm_sq_rel"] < 1e-5 and res["sgd_step_scaled"] <= TOL, res


def main():
    mp, sd, stage = {"mp2dp2": (2, 1, ""), "mp2sh2": (2, 2, "stage1")}[LAYOUT]
    topo = init_topology(tensor_parallel_degree=mp, sharding_parallel_degree=sd, sharding=stage)
    check_groups(topo)
    check_training(topo, full_weights())
    report(case="done", layout=LAYOUT, rank=topo.rank)


if __name__ == "__main__":
    main()
