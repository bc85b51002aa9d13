"""Worker: the training loop (run_training) under several parallel layouts in one launch.

2 ranks: sharding stage1 x2 and stage2 x2 (init_topology, as the CLI does), dp=2, mp=2 (+recompute),
and mp=2 resuming the single-process checkpoint of the driver. 4 ranks: mp=2 x dp=2 (init_topology),
mp=2 x sharding=2 (stage1 and stage2) and dp=2 x sharding=2 stage2. Reports per-step losses and grad norms read from train_log.jsonl; the driver
compares them with its single-process run.
"""
import dataclasses
import json
import os

import numpy as np

from _util import report

import paddle.distributed as dist  # noqa: E402

from evaclip_paddle.parallel import topology as T  # noqa: E402
from evaclip_paddle.parallel import zero  # noqa: E402
from evaclip_paddle.train.args import TrainingArguments  # noqa: E402
from evaclip_paddle.train.hooks import default_hooks  # noqa: E402
from evaclip_paddle.train.loop import run_training  # noqa: E402

TMP = os.environ["EVACLIP_TEST_DIR"]
zero._OVERLAP_BUCKET_NUMEL = 40_000    # several stage-2 buckets besides the tiny model's token embedding
ONLY = [c for c in os.environ.get("EVACLIP_LAYOUTS", "").split(",") if c]   # empty: every case
GLOBAL_BATCH = 8


def make_args(out, data_world, **kw):
    base = dict(model="EVA02-CLIP-tiny", train_data=os.path.join(TMP, "demo"), output_dir=os.path.join(TMP, out),
                per_device_train_batch_size=GLOBAL_BATCH // data_world, max_steps=5, optimizer="lamb",
                learning_rate=5e-4, weight_decay=0.05, visual_ld=0.75, text_ld=0.75, warmup_steps=2,
                max_grad_norm=1.0, adam_epsilon=1e-6, local_loss=True, gather_with_grad=True, save_steps=3, logging_steps=1,
                report_to="none", disable_tqdm=True, seed=11)
    base.update(kw)
    return TrainingArguments(**base).validate()


def log_of(out):
    rows = [json.loads(line) for line in open(os.path.join(TMP, out, "train_log.jsonl"))]
    return {"loss": [r["loss"] for r in rows if "loss" in r], "grad_norm": [r["grad_norm"] for r in rows if "loss" in r]}


def train(name, topo, **kw):
    if ONLY and name not in ONLY:
        return
    T.set_mp_group(topo.mp_group)       # layers read it when the model is built
    hooks, seen = default_hooks(topo), {}
    wrap, sync = hooks.wrap_optimizer, hooks.sync_grads

    def keep(opt):
        seen["opt"] = wrap(opt)
        return seen["opt"]

    def sync_and_count(params):         # gradients this rank holds once they are reduced
        sync(params)
        seen.setdefault("grads", seen["opt"].grad_numel())
    hooks.wrap_optimizer, hooks.sync_grads = keep, sync_and_count
    summary = run_training(make_args(name, topo.data_world, **kw), topology=topo, hooks=hooks)
    dist.barrier()
    T.set_mp_group(None)
    row = dict(case=name, rank=topo.rank, steps=[s for s, _ in summary["losses"]], state_numel=seen["opt"].state_numel(),
               grad_numel=seen["grads"], peak_grad_numel=getattr(seen["opt"], "peak_grad_numel", None),
               largest=max(int(np.prod(p.shape)) for _, p in seen["opt"].named))
    if topo.rank == 0:
        row.update(log_of(name))
    report(**row)


def main():
    world = int(os.environ["PADDLE_TRAINERS_NUM"])
    if world == 2:
        topo = T.init_topology(1, 2, "stage1")
        train("sh2", topo)
        train("sh2_stage2", dataclasses.replace(topo, sharding_stage="stage2"))
        g = topo.sharding_group
        r = topo.rank
        train("dp2", T.Topology(world=2, rank=r, dp_degree=2, dp_rank=r, dp_group=g, data_group=g))
        mp = T.Topology(world=2, rank=r, mp_degree=2, mp_rank=r, mp_group=g)
        train("mp2", mp, recompute=True)
        train("mp2_from_mp1", mp, recompute=True, resume_from_checkpoint=os.path.join(TMP, "ref", "checkpoint-3"))
    else:
        topo = T.init_topology(2, 1, "")
        train("mp2dp2", topo, recompute=True)
        sh = T.Topology(world=4, rank=topo.rank, mp_degree=2, mp_rank=topo.mp_rank, sharding_degree=2,
                        sharding_rank=topo.dp_rank, sharding_stage="stage1", mp_group=topo.mp_group,
                        sharding_group=topo.dp_group, data_group=topo.data_group)
        train("mp2sh2", sh)
        train("mp2sh2_stage2", dataclasses.replace(sh, sharding_stage="stage2"), recompute=True)
        # mp=1: sharding pairs {0,1} {2,3} (the mp groups above), dp pairs {0,2} {1,3}, data over all 4
        train("dp2sh2_stage2", T.Topology(world=4, rank=topo.rank, dp_degree=2, dp_rank=topo.rank // 2,
                                          dp_group=topo.dp_group, sharding_degree=2, sharding_rank=topo.rank % 2,
                                          sharding_stage="stage2", sharding_group=topo.mp_group,
                                          data_group=dist.collective._get_default_group()))
    report(case="done", rank=dist.get_rank())


if __name__ == "__main__":
    main()
