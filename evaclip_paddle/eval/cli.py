"""`evaclip-eval` / examples/evaclip/run_zero_shot_eval.py: zero-shot classification and retrieval.

Flags follow PaddleMIX's run_zero_shot_eval.py (--model --pretrained --pretrained_text_model
--classification_eval --per_device_eval_batch_size --dataloader_num_workers --fp16/--bf16 --output_dir
--disable_tqdm) plus CLIP-Benchmark's (--task --dataset --templates --classnames --recall_k). Results are
one JSON per run in CLIP-Benchmark's shape ({dataset, model, pretrained, task, metrics, language}).
Several ranks: python -m paddle.distributed.launch --nproc_per_node N run_zero_shot_eval.py ...
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import List, Optional

TASKS = ("zeroshot_classification", "zeroshot_retrieval")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="zoo model name (evaclip-list) or a config .json path; optional when --pretrained is a "
                         "directory with config.json")
    ap.add_argument("--pretrained", default=None,
                    help="weights: a directory written by the converter/trainer, or a checkpoint file of any layout "
                         "the converter reads (none: random weights, for smoke tests)")
    ap.add_argument("--pretrained_text_model", default=None,
                    help="separate weights for the text tower (keys 'text.*', or the tower's own keys)")
    ap.add_argument("--task", choices=TASKS, default="zeroshot_classification")
    ap.add_argument("--dataset", default=None,
                    help="dataset name: picks class names/templates in the JSON files and names the result "
                         "(default: imagenet1k, or the annotation file's name for retrieval)")
    ap.add_argument("--classification_eval", "--dataset_root", dest="classification_eval", default=None,
                    help="classification data: an ImageFolder directory (class folders; ImageNet: sorted wnids) "
                         "or an image list file ('path label' lines, or paths with --labels)")
    ap.add_argument("--labels", default=None, help="labels file (one 0-based class index a line) for an image list")
    ap.add_argument("--retrieval_eval", default=None,
                    help="retrieval annotations: COCO-Karpathy / Flickr30k JSON list of {image, caption: [...]}")
    ap.add_argument("--image_root", default=None, help="folder the image paths are relative to (default: the "
                                                       "list/annotation file's folder)")
    ap.add_argument("--split", default="test", help="split to use in Karpathy's dataset_*.json format")
    ap.add_argument("--classnames", default=None, help="CLIP-Benchmark-style classnames JSON (or .txt, one a line)")
    ap.add_argument("--templates", default=None, help="CLIP-Benchmark-style templates JSON")
    ap.add_argument("--recall_k", type=int, nargs="+", default=[1, 5, 10], help="retrieval k values (1 5 10)")
    ap.add_argument("--per_device_eval_batch_size", type=int, default=32, help="images per forward (32)")
    ap.add_argument("--text_batch_size", type=int, default=256, help="texts per forward (256)")
    ap.add_argument("--dataloader_num_workers", type=int, default=2, help="image decoding processes (2)")
    prec = ap.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="half precision (GPU only)")
    prec.add_argument("--bf16", action="store_true",
                      help="bfloat16 (GPU only; Paddle's CPU dygraph has no bf16 matmul)")
    ap.add_argument("--output_dir", default="./output/zeroshot_eval", help="(./output/zeroshot_eval)")
    ap.add_argument("--output", default="{dataset}_{pretrained}_{model}_{language}_{task}.json",
                    help="result file name inside --output_dir (CLIP-Benchmark's template)")
    ap.add_argument("--classifier_cache", default=None,
                    help="folder for cached classifiers (default: <output_dir>/classifier_cache)")
    ap.add_argument("--no_classifier_cache", action="store_true")
    ap.add_argument("--disable_tqdm", action="store_true")
    ap.add_argument("--device", default=None, help="cpu or gpu (default: gpu when Paddle has CUDA)")
    ap.add_argument("--num_threads", type=int, default=None, help="CPU math threads (default: OMP_NUM_THREADS, else cores / local processes)")
    ap.add_argument("--seed", type=int, default=0, help="seed for random weights when --pretrained is absent")
    return ap


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", s).strip("_") or "none"


def _load_text_tower(model, path: str) -> None:
    from ..checkpoint_io import CheckpointError, find_weights, load_state_dict_into, read_state_dict

    weights = find_weights(path)
    sd = read_state_dict(weights)
    text = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")} or sd
    missing, unexpected = load_state_dict_into(model.text, text, source=weights)
    if len(missing) == len(model.text.state_dict()):
        raise CheckpointError(f"{weights}: no text-tower keys found (expected 'text.*' or the tower's own keys)")
    if missing or unexpected:
        logging.getLogger("evaclip_paddle.eval").warning(
            "%s: text tower has %d missing keys %s, %d unexpected keys %s", weights, len(missing), missing[:3],
            len(unexpected), unexpected[:3])


def _paddlemix_layout(path: str):
    """PaddleMIX's eval folder: labels.txt (a class name a line), optional templates.txt ("{}" templates),
    images/ as an ImageFolder. Returns (image dir, names, templates) or None for any other layout."""
    from .data import load_classnames

    labels, images = os.path.join(path, "labels.txt"), os.path.join(path, "images")
    if not (os.path.isfile(labels) and os.path.isdir(images)):
        return None
    templates = None
    tpath = os.path.join(path, "templates.txt")
    if os.path.isfile(tpath):
        with open(tpath, "r", encoding="utf-8") as f:
            templates = [t.strip().replace("{}", "{c}") for t in f if t.strip()]
    return images, load_classnames(labels), templates


def run(args) -> Optional[dict]:
    """Runs one evaluation; returns the result dict (written by rank 0, returned on every rank)."""
    import paddle

    from ..factory import create_model, get_tokenizer
    from . import dist
    from .data import load_classnames, load_templates
    from .zeroshot import evaluate_zeroshot_classification, evaluate_zeroshot_retrieval

    log = logging.getLogger("evaclip_paddle.eval")
    device = args.device or ("gpu" if paddle.is_compiled_with_cuda() else "cpu")
    paddle.set_device(device)
    if device == "cpu":
        from ..perf import configure_cpu
        from ..train.loop import configure_cpu_threads
        configure_cpu(configure_cpu_threads(args.num_threads or 0))   # threads, oneDNN, copies, malloc
    elif args.num_threads:
        paddle.base.core.set_num_threads(int(args.num_threads))
    world = dist.maybe_init_parallel_env()
    _, rank = dist.world_and_rank()

    amp = "bfloat16" if args.bf16 else "float16" if args.fp16 else None
    precision = "fp32"
    if amp and device == "cpu":
        log.warning("--%s ignored on CPU (Paddle's CPU dygraph has no %s matmul): running fp32",
                    "bf16" if args.bf16 else "fp16", amp)
    elif amp:
        precision = "bf16" if args.bf16 else "fp16"
    if args.task == "zeroshot_classification" and not args.classification_eval:
        raise SystemExit("--task zeroshot_classification needs --classification_eval (ImageFolder dir or image list)")
    if args.task == "zeroshot_retrieval" and not args.retrieval_eval:
        raise SystemExit("--task zeroshot_retrieval needs --retrieval_eval (caption JSON)")
    if not args.model and not args.pretrained:
        raise SystemExit("give --model (zoo name or config .json), or --pretrained DIR with a config.json")
    if not args.pretrained:
        log.warning("no --pretrained given: evaluating random weights (seed %d)", args.seed)
    model = create_model(args.model, pretrained=args.pretrained, precision=precision, seed=args.seed)
    if args.pretrained_text_model:
        _load_text_tower(model, args.pretrained_text_model)
    model.eval()
    tokenizer = get_tokenizer(None, context_length=model.cfg.text_cfg.context_length)
    model_name = args.model or model.cfg.name
    progress = not args.disable_tqdm
    skipped: List[dict] = []
    if args.task == "zeroshot_classification":
        dataset = args.dataset or "imagenet1k"
        data_path, classnames, templates = args.classification_eval, None, None
        mix = _paddlemix_layout(data_path) if os.path.isdir(data_path) else None
        if mix:
            data_path, classnames, templates = mix
        classnames = load_classnames(args.classnames, dataset) if args.classnames else classnames
        templates = load_templates(args.templates, dataset) if args.templates else templates
        cache = None if args.no_classifier_cache else (args.classifier_cache or os.path.join(args.output_dir,
                                                                                             "classifier_cache"))
        metrics = evaluate_zeroshot_classification(
            model, tokenizer, data_path, classnames, templates, dataset_name=dataset,
            labels_file=args.labels, image_root=args.image_root, batch_size=args.per_device_eval_batch_size,
            text_batch_size=args.text_batch_size, num_workers=args.dataloader_num_workers, progress=progress,
            cache_dir=cache, amp_dtype=None, skipped=skipped)
    else:
        base = os.path.splitext(os.path.basename(args.retrieval_eval))[0].lower()
        dataset = args.dataset or ("flickr30k" if "flickr" in base else "mscoco_captions" if "coco" in base else base)
        metrics = evaluate_zeroshot_retrieval(
            model, tokenizer, args.retrieval_eval, image_root=args.image_root, recall_k=args.recall_k,
            split=args.split, batch_size=args.per_device_eval_batch_size, text_batch_size=args.text_batch_size,
            num_workers=args.dataloader_num_workers, progress=progress, skipped=skipped)
    counts = {k: metrics.pop(k) for k in ("num_images", "num_texts", "skipped_images") if k in metrics}
    pretrained = args.pretrained or "none"
    result = {"dataset": dataset, "model": model_name, "pretrained": pretrained, "task": args.task,
              "metrics": metrics, "language": "en", **counts, "skipped_files": skipped, "world_size": world}
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        name = args.output.format(dataset=_slug(dataset), pretrained=_slug(os.path.basename(pretrained.rstrip("/"))),
                                  model=_slug(os.path.basename(model_name)), language="en", task=args.task)
        path = os.path.join(args.output_dir, name)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, path)
        result["output_file"] = path
        print(json.dumps({"task": args.task, "dataset": dataset, **metrics, **counts}), flush=True)
        print(f"results written to {path}", flush=True)
    return result


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
