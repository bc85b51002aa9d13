"""One rank per "node" (two launchers on loopback): the job-wide topology and its collectives."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import report  # noqa: E402

import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402

from evaclip_paddle.parallel import collectives as C  # noqa: E402
from evaclip_paddle.parallel.topology import init_topology  # noqa: E402

paddle.set_device("cpu")


def main():
    topo = init_topology()                                   # dp over both nodes
    r = topo.rank
    assert topo.world == 2 and topo.dp_degree == 2 and topo.data_world == 2 and topo.data_rank == r, topo.describe()
    x = paddle.to_tensor([float(r + 1)] * 3)
    dist.all_reduce(x, group=topo.data_group)
    g = C.all_gather_nograd(paddle.to_tensor([[float(r)] * 2]), topo.data_group)
    b = paddle.to_tensor([float(r) + 10])
    dist.broadcast(b, src=0)
    got = dict(all_reduce=x.numpy().tolist(), all_gather=g.numpy().tolist(), broadcast=b.numpy().tolist())
    report(case="two_nodes", rank=r, node=os.environ.get("PADDLE_NNODES"), **got)
    assert got == dict(all_reduce=[3.0] * 3, all_gather=[[0.0, 0.0], [1.0, 1.0]], broadcast=[10.0]), got


if __name__ == "__main__":
    main()
