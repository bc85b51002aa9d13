"""Checkpoints: kill-and-resume reproduces the uninterrupted losses, atomic writes, rotation, non-finite abort."""
import json
import math
import os

import numpy as np
import pytest

import evaclip_paddle as ec
from evaclip_paddle.data.demo import generate
from evaclip_paddle.loss import ClipLoss
from evaclip_paddle.train import checkpoint as ckpt
from evaclip_paddle.train.args import TrainingArguments
from evaclip_paddle.train.loop import LossScaler, NonFiniteError, load_initial_weights, run_training


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    generate(str(d), image_size=32, per_combo=1, eval_per_class=1, seen_eval_per_class=0, seed=3)  # 30 pairs
    return str(d)


def _args(demo_dir, out, **kw):
    base = dict(model="EVA02-CLIP-tiny", train_data=demo_dir, output_dir=str(out), per_device_train_batch_size=8,
                max_steps=7, optimizer="lamb", learning_rate=2e-3, weight_decay=0.05, visual_ld=0.75, text_ld=0.75,
                warmup_steps=2, force_patch_dropout=0.3, local_loss=True, gather_with_grad=True, save_steps=2,
                save_total_limit=2, logging_steps=1, report_to="none", disable_tqdm=True, seed=11)
    base.update(kw)
    return TrainingArguments(**base).validate()


class Killed(Exception):
    pass


def test_kill_and_resume_gives_the_same_losses(demo_dir, tmp_path):
    # 30 pairs / batch 8 = 3 steps per epoch: the run crosses epochs, the resume point is mid-epoch.
    full = run_training(_args(demo_dir, tmp_path / "full"))
    assert [s for s, _ in full["losses"]] == list(range(1, 8))
    assert sorted(os.listdir(tmp_path / "full")).count("checkpoint-7") == 1
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "full"))] == [6, 7]      # rotation keeps 2

    def kill_at_5(step, info):
        if step == 5:
            raise Killed()
    with pytest.raises(Killed):
        run_training(_args(demo_dir, tmp_path / "run"), callbacks=[kill_at_5])
    # debris of a crash in the middle of a save must be ignored by `latest`
    os.makedirs(tmp_path / "run" / ".tmp-checkpoint-6")
    os.makedirs(tmp_path / "run" / "checkpoint-9")
    assert ckpt.latest_checkpoint(str(tmp_path / "run")).endswith("checkpoint-4")

    resumed = run_training(_args(demo_dir, tmp_path / "run", resume_from_checkpoint="latest"))
    assert [s for s, _ in resumed["losses"]] == [5, 6, 7]
    want = dict(full["losses"])
    for step, loss in resumed["losses"]:
        assert abs(loss - want[step]) <= 1e-6, (step, loss, want[step])
    # the resumed run's log continues the interrupted one without duplicates
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "train_log.jsonl")]
    assert steps == list(range(1, 8))
    # final weights (and every checkpoint) load with create_model(pretrained=...)
    m = ec.create_model(pretrained=str(tmp_path / "run"))
    ref = ec.create_model(pretrained=str(tmp_path / "full" / "checkpoint-7"))
    np.testing.assert_allclose(m.visual.head.weight.numpy(), ref.visual.head.weight.numpy(), atol=1e-6)


def test_existing_checkpoints_need_resume_or_overwrite(demo_dir, tmp_path):
    run_training(_args(demo_dir, tmp_path, max_steps=2, recompute=True))      # recompute: same loop, less memory
    from evaclip_paddle.train.args import ArgsError
    with pytest.raises(ArgsError, match="--resume_from_checkpoint latest"):
        run_training(_args(demo_dir, tmp_path, max_steps=2))
    # --pretrained DIR with --skip_list: the listed prefixes keep their fresh initialisation
    trained = ec.create_model(pretrained=str(tmp_path))
    fresh = ec.create_model("EVA02-CLIP-tiny", seed=123)
    info = load_initial_weights(fresh, str(tmp_path), skip_list="text.,logit_scale")
    assert info["loaded"] > 0 and info["skipped_by_skip_list"] > 0
    np.testing.assert_array_equal(fresh.visual.head.weight.numpy(), trained.visual.head.weight.numpy())
    assert not np.array_equal(fresh.text.text_projection.numpy(), trained.text.text_projection.numpy())


def test_fp16_loss_scaler_halves_on_overflow_and_grows_back():
    s = LossScaler(enabled=True, init_scale=1024.0, growth_interval=2)
    s.update(found_nonfinite=True)
    assert s.scale == 512.0
    s.update(False)
    s.update(False)
    assert s.scale == 1024.0
    s2 = LossScaler(enabled=True)
    s2.set_state_dict(s.state_dict())
    assert s2.state_dict() == s.state_dict()


def test_consecutive_nonfinite_steps_abort_with_a_checkpoint(demo_dir, tmp_path):
    base, calls = ClipLoss(), []

    def poisoned(img, txt, scale, valid=None):
        calls.append(1)
        loss = base(img, txt, scale)
        return loss * float("nan") if len(calls) > 2 else loss
    with pytest.raises(NonFiniteError) as e:
        run_training(_args(demo_dir, tmp_path, max_nonfinite_steps=3, save_steps=100), loss_fn=poisoned)
    assert "--max_nonfinite_steps 3" in str(e.value) and "checkpoint-5" in str(e.value)
    state = json.load(open(tmp_path / "checkpoint-5" / "trainer_state.json"))
    assert state["counters"]["nonfinite_steps"] == 3 and state["global_step"] == 5
    logs = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert math.isnan(logs[-1]["loss"]) and logs[-1]["nonfinite_steps"] == 3
    opt = ckpt.load_checkpoint(str(tmp_path / "checkpoint-5"))["optimizer_state"]
    assert opt["t"] == 2                      # the skipped steps never updated the weights
