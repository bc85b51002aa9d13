"""The PaddleMIX-style command line: the seed README's training command runs as a subprocess; errors exit 2."""
import json
import os
import subprocess
import sys

import pytest

from evaclip_paddle.data.demo import generate
from evaclip_paddle.train.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    generate(str(d), image_size=32, per_combo=1, eval_per_class=1, seen_eval_per_class=0, seed=0)
    return str(d)


def test_seed_readme_command_line_runs(demo_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join("examples", "evaclip", "run_pretrain_dist.py"),
           "--model", "EVA02-CLIP-tiny", "--dataloader_num_workers=1", "--per_device_train_batch_size", "8",
           "--per_device_eval_batch_size", "8", "--optimizer", "lamb", "--learning_rate", "5e-4",
           "--visual_lr", "2e-4", "--text_lr", "2e-5", "--weight_decay", "0.05", "--visual_wd", "0.05",
           "--text_wd", "0.05", "--layer_decay", "1.0", "--visual_ld", "0.75", "--text_ld", "0.75",
           "--adam_beta1", "0.9", "--adam_beta2", "0.999", "--adam_epsilon", "1e-8", "--max_grad_norm", "5.0",
           "--num_train_epochs", "200", "--warmup_steps", "2", "--tensor_parallel_degree", "1",
           "--sharding_parallel_degree", "1", "--bf16", "False", "--output_dir", str(out), "--logging_steps", "1",
           "--do_train", "--disable_tqdm", "True", "--save_steps", "2", "--local_loss", "True",
           "--gather_with_grad", "True", "--pretrained_text_model", "EVA02-CLIP-tiny",
           "--classification_eval", os.path.join(demo_dir, "eval"),
           "--train_data", os.path.join(demo_dir, "train.json"), "--max_steps", "3"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["global_step"] == 3 and summary["eval"]["num_classes"] >= 20
    assert sorted(os.listdir(out / "checkpoint-3")) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                                         "rng_state.pkl", "trainer_state.json"]
    records = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert {"lr/visual", "lr/text", "lr/other", "logit_scale", "samples_per_sec", "skipped_samples"} <= set(records[0])
    assert records[0]["lr/visual"] == pytest.approx(2e-4 * 0.5)          # warmup step 1 of 2, top layer
    assert os.path.isdir(out / "runs")                                       # VisualDL logs


@pytest.mark.parametrize("argv,needle", [
    (["--no_such_flag", "1"], "--no_such_flag"),
    (["--bf16", "True", "--fp16", "True"], "--bf16"),
    (["--sharding_parallel_degree", "8", "--sharding", "stage2", "--max_steps", "1"], "--sharding_parallel_degree"),
])
def test_errors_exit_2_and_name_the_flag(argv, needle, demo_dir, tmp_path, capsys):
    code = main(argv + ["--model", "EVA02-CLIP-tiny", "--train_data", demo_dir, "--output_dir", str(tmp_path),
                        "--report_to", "none"])
    assert code == 2 and needle in capsys.readouterr().err


def test_eval_only_mode(demo_dir, tmp_path, capsys):
    code = main(["--model", "EVA02-CLIP-tiny", "--do_eval", "--classification_eval", os.path.join(demo_dir, "eval"),
                 "--output_dir", str(tmp_path), "--disable_tqdm", "True"])
    assert code == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["eval"]["num_classes"] >= 20
