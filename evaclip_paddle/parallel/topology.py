"""Process-wide parallel topology: degrees and groups from the PaddleNLP-named flags.

Layers read the model-parallel group from here at construction, so one model definition serves
every layout: with no group (or one rank) they are plain layers. `init_topology` must therefore run
before the model is built.

Rank layout is fleet's (order dp, pp, sharding, mp; mp innermost):
    rank = (dp_rank * sharding_degree + sharding_rank) * mp_degree + mp_rank
so the data rank (which slice of the global batch a rank reads) is rank // mp_degree, and the ranks
of one tensor-parallel group read the same data.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

_MP_GROUP = None


def set_mp_group(group) -> None:
    global _MP_GROUP
    _MP_GROUP = group if group is not None and int(group.nranks) > 1 else None


def get_mp_group():
    return _MP_GROUP


def mp_world_size() -> int:
    g = _MP_GROUP
    return 1 if g is None else int(g.nranks)


def mp_rank() -> int:
    g = _MP_GROUP
    return 0 if g is None else int(g.rank)


@contextmanager
def mp_group_scope(group):
    """Temporarily sets the model-parallel group (e.g. to build an unsharded reference model)."""
    old = _MP_GROUP
    set_mp_group(group)
    try:
        yield
    finally:
        set_mp_group(old)


class TopologyError(ValueError):
    """The parallel flags do not fit the job or the model; the message names the flag."""


@dataclass
class Topology:
    world: int = 1
    rank: int = 0
    dp_degree: int = 1
    dp_rank: int = 0
    mp_degree: int = 1
    mp_rank: int = 0
    sharding_degree: int = 1
    sharding_rank: int = 0
    sharding_stage: str = ""        # "", "stage1" or "stage2"
    dp_group: Any = None            # groups are None where the degree is 1
    mp_group: Any = None
    sharding_group: Any = None
    data_group: Any = None          # all ranks with this mp_rank: dp x sharding ranks, distinct data
    hcg: Any = None                 # fleet's HybridCommunicateGroup (None in a single process)

    @property
    def data_world(self) -> int:
        return self.dp_degree * self.sharding_degree

    @property
    def data_rank(self) -> int:
        return self.dp_rank * self.sharding_degree + self.sharding_rank

    @property
    def is_single(self) -> bool:
        return self.world == 1

    def seed_for(self, base: int) -> int:
        """Seed for the global RNG: equal across the ranks of one tensor-parallel group (they must
        draw the same patch-dropout / drop-path masks), distinct across data ranks."""
        return int(base) + self.data_rank

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world}: dp {self.dp_rank}/{self.dp_degree}, mp {self.mp_rank}/"
                f"{self.mp_degree}, sharding {self.sharding_rank}/{self.sharding_degree}"
                f"{' ' + self.sharding_stage if self.sharding_stage else ''}, data {self.data_rank}/{self.data_world}")


_TOPOLOGY: Optional[Topology] = None


def get_topology() -> Topology:
    """The topology set by init_topology (a single-process one before that)."""
    return _TOPOLOGY if _TOPOLOGY is not None else Topology()


def parse_sharding(sharding: str) -> str:
    """'' / 'stage1' / 'stage2' from the PaddleNLP-style flag (which may carry extra words like 'offload')."""
    words = [w for w in str(sharding or "").replace(",", " ").split() if w]
    stages = [w for w in words if w.startswith("stage")]
    bad = [w for w in words if w not in ("stage1", "stage2")]
    if bad or len(stages) > 1:
        raise TopologyError(f"--sharding '{sharding}': expected one of 'stage1', 'stage2' (or empty)"
                            f"{'; not supported: ' + ', '.join(bad) if bad else ''}")
    return stages[0] if stages else ""


def resolve_degrees(world: int, tensor_parallel_degree: int = 1, sharding_parallel_degree: int = 1,
                    sharding: str = "") -> tuple:
    """(dp, mp, sharding_degree, stage) for a job of `world` ranks; raises TopologyError on misfits."""
    stage = parse_sharding(sharding)
    mp = int(tensor_parallel_degree) if tensor_parallel_degree and int(tensor_parallel_degree) > 0 else 1
    hint = ("; start one process per rank with `python -m paddle.distributed.launch --nproc_per_node N ...`"
            if world == 1 else "")
    if world % mp:
        raise TopologyError(f"--tensor_parallel_degree {mp} does not divide the number of processes {world}{hint}")
    sd = int(sharding_parallel_degree) if sharding_parallel_degree is not None else 1
    if sd <= 0:                      # PaddleNLP's -1: shard over every data-parallel rank
        sd = world // mp if stage else 1
    if sd > 1 and not stage:
        raise TopologyError(f"--sharding_parallel_degree {sd} needs --sharding stage1 or stage2")
    if world % (mp * sd):
        raise TopologyError(f"--tensor_parallel_degree {mp} x --sharding_parallel_degree {sd} = {mp * sd} "
                            f"does not divide the number of processes {world}{hint}")
    return world // (mp * sd), mp, sd, stage if sd > 1 else ""


def check_model_fits(cfg, mp: int) -> None:
    """Every sharded dimension of `cfg` (a CLIPConfig) must divide by the tensor-parallel degree."""
    if mp <= 1:
        return
    v, t = cfg.vision_cfg, cfg.text_cfg
    dims = [("vision_cfg heads (width/head_width)", v.heads), ("vision_cfg MLP hidden (width*mlp_ratio)", v.mlp_hidden),
            ("text_cfg.heads", t.heads), ("text_cfg MLP hidden (width*mlp_ratio)", t.mlp_hidden),
            ("text_cfg.vocab_size", t.vocab_size)]
    bad = [f"{name} = {n}" for name, n in dims if n % mp]
    if bad:
        raise TopologyError(f"model '{cfg.name}' cannot be split by --tensor_parallel_degree {mp}: "
                            + "; ".join(bad) + " (not divisible)")


# ---- gloo sub-groups -------------------------------------------------------------------------
# Paddle 3.3.1 rendezvouses every gloo group on the job's one TCPStore under keys that do not name
# the group, so two disjoint groups (mp=2 x dp=2 on 4 ranks) collide, and a later group can read an
# earlier group's stale addresses (intermittent "connection refused"). Every gloo group created here
# gets a fresh store: its rank 0 opens one on a free port and publishes the address through the job
# store. NCCL groups are untouched.

_SUBGROUP_STORES = []


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def _gloo_subgroup_stores():
    import paddle.distributed.collective as coll
    from paddle.base import core

    orig = coll._new_process_group_impl

    def patched(backend, store, rank, world_size, group_name, pg_options, group_id=0, *args, **kwargs):
        if backend == "gloo" and group_id != 0 and world_size > 1:
            key = f"evaclip_paddle/gloo_store/{group_id}"
            if rank == 0:
                host = os.environ.get("PADDLE_CURRENT_ENDPOINT", "127.0.0.1:0").rsplit(":", 1)[0]
                port = _free_port(host)
                store.set(key, f"{host}:{port}")
                sub = core.TCPStore(host, port, True, world_size, 300)
            else:
                store.wait(key)
                host, port = store.get(key).decode().rsplit(":", 1)
                sub = core.TCPStore(host, int(port), False, world_size, 300)
            _SUBGROUP_STORES.append(sub)      # the group needs its store alive
            store = sub
        return orig(backend, store, rank, world_size, group_name, pg_options, group_id, *args, **kwargs)

    coll._new_process_group_impl = patched
    try:
        yield
    finally:
        coll._new_process_group_impl = orig


def new_group(ranks):
    """paddle.distributed.new_group that also works for disjoint gloo sub-groups. Every rank must
    call it for every group, in the same order."""
    import paddle.distributed as dist
    with _gloo_subgroup_stores():
        return dist.new_group(sorted(ranks))


def _world_from_env() -> int:
    return int(os.environ.get("PADDLE_TRAINERS_NUM", os.environ.get("PADDLE_GLOBAL_SIZE", "1")))


def init_topology(tensor_parallel_degree: int = 1, sharding_parallel_degree: int = 1, sharding: str = "",
                  model_cfg=None) -> Topology:
    """Initialises the job's communication (fleet, collective mode, pp=1) and returns its Topology.

    Call once per process, before building the model: it sets the model-parallel group that the
    layers read. With `model_cfg` the model's sharded sizes are checked against the mp degree.
    """
    global _TOPOLOGY
    import paddle

    world = _world_from_env()
    dp, mp, sd, stage = resolve_degrees(world, tensor_parallel_degree, sharding_parallel_degree, sharding)
    if model_cfg is not None:
        check_model_fits(model_cfg, mp)
    if world == 1:
        set_mp_group(None)
        _TOPOLOGY = Topology(sharding_stage="")
        return _TOPOLOGY

    from paddle.distributed import fleet

    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": dp, "mp_degree": mp, "pp_degree": 1, "sharding_degree": sd}
    with _gloo_subgroup_stores():
        fleet.init(is_collective=True, strategy=strategy)
    hcg = fleet.get_hybrid_communicate_group()
    topo = Topology(world=world, rank=paddle.distributed.get_rank(),
                    dp_degree=dp, dp_rank=hcg.get_data_parallel_rank(),
                    mp_degree=mp, mp_rank=hcg.get_model_parallel_rank(),
                    sharding_degree=sd, sharding_rank=hcg.get_sharding_parallel_rank(), sharding_stage=stage,
                    hcg=hcg)
    if dp > 1:
        topo.dp_group = hcg.get_data_parallel_group()
    if mp > 1:
        topo.mp_group = hcg.get_model_parallel_group()
    if sd > 1:
        topo.sharding_group = hcg.get_sharding_parallel_group()
    topo.data_group = _data_group(topo)
    if topo.rank != topo.data_rank * mp + topo.mp_rank:
        raise RuntimeError(f"unexpected fleet rank layout: {topo.describe()}")
    set_mp_group(topo.mp_group)
    _TOPOLOGY = topo
    return topo


def _data_group(topo: Topology):
    """Group of the ranks that hold distinct data (same mp rank), ordered by data rank."""
    if topo.data_world == 1:
        return None
    if topo.mp_degree == 1:
        import paddle.distributed as dist
        return dist.collective._get_default_group()
    if topo.sharding_degree == 1:
        return topo.dp_group
    if topo.dp_degree == 1:
        return topo.sharding_group
    mine = None
    for m in range(topo.mp_degree):
        g = new_group(list(range(m, topo.world, topo.mp_degree)))
        if m == topo.mp_rank:
            mine = g
    return mine
