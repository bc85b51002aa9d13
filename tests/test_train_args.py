"""Training flags: the PaddleMIX command line parses, booleans both ways, errors name the flag."""
import pytest

from evaclip_paddle.train.args import ArgsError, TrainingArguments, parse_args
from evaclip_paddle.train.loop import check_precision

# The PaddleMIX README's flags (data/eval paths replaced), in its spelling.
PADDLEMIX = ("--dataloader_num_workers=2 --per_device_train_batch_size 16 --per_device_eval_batch_size 8 "
             "--model EVA02-CLIP-B-16 --optimizer lamb --warmup_steps 2000 --learning_rate 5e-4 --visual_lr 2e-4 "
             "--text_lr 2e-5 --weight_decay 0.05 --visual_wd 0.05 --text_wd 0.05 --layer_decay 1.0 --visual_ld 0.75 "
             "--text_ld 0.75 --adam_beta1 0.9 --adam_beta2 0.999 --adam_epsilon 1e-8 --max_grad_norm 5.0 "
             "--num_train_epochs 200 --tensor_parallel_degree 1 --sharding_parallel_degree 8 --sharding stage2 "
             "--bf16 False --output_dir ./output --logging_steps 1 --do_train --disable_tqdm True --save_steps 50000 "
             "--local_loss true --gather_with_grad true --pretrained_text_model EVA02-CLIP-B-16").split()


def test_paddlemix_command_line_parses(tmp_path):
    data = tmp_path / "train.json"
    data.write_text("[]")
    a = parse_args(PADDLEMIX + ["--train_data", str(data), "--classification_eval", str(tmp_path)])
    assert (a.per_device_train_batch_size, a.dataloader_num_workers, a.optimizer) == (16, 2, "lamb")
    assert (a.learning_rate, a.visual_lr, a.text_lr, a.visual_ld, a.text_ld) == (5e-4, 2e-4, 2e-5, 0.75, 0.75)
    assert a.do_train is True and a.disable_tqdm is True and a.bf16 is False
    assert a.local_loss is True and a.gather_with_grad is True
    assert (a.sharding_parallel_degree, a.sharding_stages, a.num_train_epochs) == (8, ["stage2"], 200.0)
    assert a.should_train()


@pytest.mark.parametrize("argv,value", [(["--local_loss"], True), (["--local_loss", "True"], True),
                                        (["--local_loss", "false"], False), (["--local_loss=1"], True),
                                        (["--local_loss", "no"], False), ([], False)])
def test_boolean_flag_forms(argv, value):
    assert parse_args(argv + ["--do_train", "False", "--do_eval", "False"], validate=False).local_loss is value


@pytest.mark.parametrize("argv,flag", [
    (["--learning_rat", "1e-3"], "--learning_rat"),            # unknown flag, with a suggestion
    (["--bf16", "True", "--fp16", "True"], "--bf16"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--sharding", "stage3"], "--sharding"),
    (["--sharding_parallel_degree", "2"], "--sharding"),
    (["--visual_ld", "1.5"], "--visual_ld"),
    (["--warmup_steps", "-1"], "--warmup_steps"),
    (["--max_steps", "0", "--num_train_epochs", "0"], "--max_steps"),
    (["--local_loss", "maybe"], "--local_loss"),
    (["--per_device_train_batch_size", "two"], "--per_device_train_batch_size"),
    (["--report_to", "wandb"], "--report_to"),
    (["--resume_from_checkpoint", "/nonexistent/ckpt"], "--resume_from_checkpoint"),
])
def test_bad_flags_name_the_flag(argv, flag, tmp_path):
    data = tmp_path / "t.json"
    data.write_text("[]")
    with pytest.raises(ArgsError) as e:
        parse_args(argv + ["--train_data", str(data)])
    assert flag in str(e.value)


def test_unknown_flag_suggests_the_known_one():
    with pytest.raises(ArgsError, match="did you mean --learning_rate"):
        parse_args(["--learning_rat", "1e-3"])


def test_training_needs_train_data():
    with pytest.raises(ArgsError, match="--train_data"):
        parse_args(["--do_train"])


def test_bf16_on_a_device_without_kernels_fails_at_start():
    args = TrainingArguments(bf16=True)
    try:
        check_precision(args, "cpu")        # a GPU build with bf16 kernels passes; CPU Paddle 3.3.1 has none
    except ArgsError as e:
        assert "--bf16" in str(e) and "bfloat16" in str(e)
    else:
        import paddle
        assert paddle.is_compiled_with_cuda(), "CPU Paddle has no bf16 matmul: --bf16 must be refused"


def test_pretrained_flag_paddlemix_boolean_means_model_dir():
    assert TrainingArguments(model="/w/EVA02", pretrained="True").load_pretrained_path() == "/w/EVA02"
    assert TrainingArguments(pretrained="False").load_pretrained_path() is None
    assert TrainingArguments(pretrained="/w/conv").load_pretrained_path() == "/w/conv"
