"""Single-process parts of evaclip_paddle.parallel: flag validation, shard shapes, norms, no-op collectives."""
import numpy as np
import paddle
import pytest

from evaclip_paddle.factory import get_model_config
from evaclip_paddle.model.clip import EVACLIP
from evaclip_paddle.model.norm import LayerNorm, RMSNorm
from evaclip_paddle.parallel import collectives as C
from evaclip_paddle.parallel import state, topology
from evaclip_paddle.parallel.norm import ShardedNorm
from evaclip_paddle.parallel.topology import TopologyError, check_model_fits, init_topology, resolve_degrees


class FakeGroup:
    """Stands in for an mp group at construction time only (layers just read nranks/rank)."""

    def __init__(self, nranks, rank):
        self.nranks, self.rank = nranks, rank


@pytest.mark.parametrize("world,mp,sd,stage,want", [
    (8, 2, 2, "stage1", (2, 2, 2, "stage1")),
    (8, 2, -1, "stage1", (1, 2, 4, "stage1")),      # -1: shard over every data rank
    (4, 1, 1, "", (4, 1, 1, "")),
    (4, -1, 1, "", (4, 1, 1, "")),                  # PaddleNLP's default -1 means no TP
    (2, 2, 1, "stage1", (1, 2, 1, "")),             # nothing left to shard over
    (4, 1, 2, "stage2", (2, 1, 2, "stage2")),
    (4, 2, 2, "stage2 offload", None),
])
def test_resolve_degrees(world, mp, sd, stage, want):
    if want is None:
        with pytest.raises(TopologyError, match="--sharding"):
            resolve_degrees(world, mp, sd, stage)
    else:
        assert resolve_degrees(world, mp, sd, stage) == want


@pytest.mark.parametrize("world,mp,sd,stage,match", [
    (8, 3, 1, "", "--tensor_parallel_degree 3 does not divide"),
    (8, 2, 3, "stage1", "= 6 does not divide the number of processes 8"),
    (8, 1, 2, "", "needs --sharding stage1 or stage2"),
    (8, 1, 2, "stage3", "expected one of"),
    (8, 1, 2, "stage1 stage2", "expected one of"),
    (1, 2, 1, "", "paddle.distributed.launch"),
])
def test_resolve_degrees_errors(world, mp, sd, stage, match):
    with pytest.raises(TopologyError, match=match):
        resolve_degrees(world, mp, sd, stage)


def test_check_model_fits():
    check_model_fits(get_model_config("EVA02-CLIP-tiny"), 2)
    with pytest.raises(TopologyError, match=r"vision_cfg heads.*= 4.*text_cfg.heads = 4"):
        check_model_fits(get_model_config("EVA02-CLIP-tiny"), 3)
    with pytest.raises(TopologyError, match="EVA02-CLIP-B-16.*text_cfg.heads = 8"):
        check_model_fits(get_model_config("EVA02-CLIP-B-16"), 16)


def test_single_process_topology():
    topo = init_topology()
    assert topo.is_single and topo.data_world == 1 and topo.mp_group is None
    assert topology.get_mp_group() is None and topo.seed_for(5) == 5
    with pytest.raises(TopologyError, match="tensor_parallel_degree 2"):
        init_topology(tensor_parallel_degree=2)


def test_collectives_are_identity_without_groups():
    x = paddle.randn([3, 4])
    for op in (C.copy_to_mp, C.reduce_from_mp, C.sum_partial, C.gather_from_mp, C.scatter_to_mp,
               C.all_gather_with_grad, C.all_gather_nograd):
        assert op(x) is x


def test_split_merge_match_tp_layer_shapes():
    """Shards cut from a full state dict have exactly the shapes the mp=2 layers allocate."""
    cfg = get_model_config("EVA02-CLIP-tiny")
    paddle.seed(0)
    full_model = EVACLIP(cfg)
    full = {k: v.numpy() for k, v in full_model.state_dict().items()}
    shards = []
    for r in range(2):
        with topology.mp_group_scope(FakeGroup(2, r)):
            tp = EVACLIP(cfg)
        axes = state.distributed_axes(tp)
        assert "visual.blocks.0.attn.q_proj.weight" in axes and "text.token_embedding.weight" in axes
        assert "visual.blocks.0.attn.inner_attn_ln.weight" in axes and "visual.blocks.0.mlp.ffn_ln.bias" in axes
        assert "visual.blocks.0.attn.proj.bias" not in axes and "visual.head.weight" not in axes
        part = state.split_state_dict(full, axes, r, 2)
        local = tp.state_dict()
        assert set(part) == set(local)
        for k in local:
            assert list(part[k].shape) == list(local[k].shape), k
        shards.append(part)
    merged = state.merge_state_dicts(shards, axes)
    assert all(np.array_equal(merged[k], full[k]) for k in full)
    assert topology.get_mp_group() is None


@pytest.mark.parametrize("rms", [False, True])
def test_sharded_norm_single_shard_equals_norm(rms):
    x = paddle.randn([2, 5, 12]) * 3 + 1
    ref = RMSNorm(12, 1e-6) if rms else LayerNorm(12, 1e-6)
    sn = ShardedNorm(12, 1e-6, rms)
    w = paddle.rand([12]) + 0.5
    ref.weight.set_value(w)
    sn.weight.set_value(w)
    if not rms:
        b = paddle.randn([12])
        ref.bias.set_value(b)
        sn.bias.set_value(b)
    np.testing.assert_allclose(sn(x).numpy(), ref(x).numpy(), atol=2e-6)


def test_global_grad_norm_single_process():
    lin = paddle.nn.Linear(4, 3)
    lin(paddle.randn([2, 4])).sum().backward()
    want = sum(float((p.grad ** 2).sum()) for p in lin.parameters())
    assert abs(float(state.global_grad_norm_sq(lin.parameters())) - want) < 1e-5
