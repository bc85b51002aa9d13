"""Paddle Inference predictors for exported EVA-CLIP encoders.

CPU: oneDNN with a fixed thread count; bf16 through oneDNN (AMX / AVX512-bf16) when the CPU has it.
GPU: native GPU with fp32/fp16/bf16 mixed precision, or a TensorRT-converted program (PIR-TRT).
A model exported with the fused-norm custom op gets its op library registered in this process
before the predictor is created (Paddle Inference cannot run the op otherwise).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np

EXPORT_META = "export.json"
_PRECISIONS = ("fp32", "bf16", "fp16")
_registered_libs: Dict[str, List[str]] = {}
_register_lock = threading.Lock()


class ExportError(ValueError):
    """An export folder is missing files or is inconsistent; the message names the file and key."""


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set:
    try:
        with open(cpuinfo, "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_supported(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when oneDNN can run bf16 GEMMs natively (AMX or AVX512-bf16); without them it emulates slowly."""
    return bool(cpu_flags(cpuinfo) & {"amx_bf16", "avx512_bf16"})


def register_op_library(so_path: str) -> List[str]:
    """Registers a custom-op shared library in this process (once per path); returns the op names."""
    real = os.path.realpath(so_path)
    with _register_lock:
        if real in _registered_libs:
            return _registered_libs[real]
        if not os.path.isfile(real):
            raise FileNotFoundError(f"custom op library not found: {so_path}")
        from paddle.utils.cpp_extension import load_op_meta_info_and_register_op
        ops = list(load_op_meta_info_and_register_op(real) or [])
        _registered_libs[real] = ops
        return ops


def _set_kernel_threads(n: int):
    """Makes the fused_ln kernels of every op library in this process use n threads. They run on
    libgomp, which Paddle Inference's thread setting does not reach, and `import paddle` sets
    OMP_NUM_THREADS=1 where it was unset: without this a CPU-kernel program ran its attention,
    norms and epilogues on one thread next to n-thread GEMMs (EVA02-B-16 b32, 2 threads: 7.30 vs
    8.14 images/s; more cores lose more)."""
    import ctypes

    with _register_lock:
        paths = list(_registered_libs)
    mod = sys.modules.get("evaclip_paddle.ops.fused_norm")
    if mod is not None:
        paths.append(mod.loaded_op_library())  # (asking op_library_path() could load one)
    for path in dict.fromkeys(p for p in paths if p):
        try:
            ctypes.CDLL(path).fused_ln_set_num_threads(int(n))
        except (OSError, AttributeError):  # not a fused_ln build (a user's own op library)
            pass


def _package_op_library(load: bool) -> Optional[str]:
    """The fused-norm op library of evaclip_paddle.ops; with load=False only if that module is
    already imported (asking it may load the op, and an op name must not be registered twice)."""
    if not load and "evaclip_paddle.ops.fused_norm" not in sys.modules:
        return None
    try:
        from ..ops import fused_norm
        return fused_norm.op_library_path() if fused_norm.fused_ops_available() else None
    except Exception:  # the ops package is optional
        return None


def _find_op_library(meta_ops: dict, export_dir: str, explicit: Optional[str]) -> str:
    """Where to load the custom ops an export needs from: what this process already loaded, an
    explicit path, EVACLIP_OP_LIBRARY, the package's build, then the copy in the export folder.
    Stops at the first hit, so at most one library with these op names enters the process."""
    tried = []
    sources = (("already loaded", lambda: _package_op_library(load=False)),
               ("op_library argument", lambda: explicit),
               ("EVACLIP_OP_LIBRARY", lambda: os.environ.get("EVACLIP_OP_LIBRARY")),
               ("evaclip_paddle.ops.fused_norm", lambda: _package_op_library(load=True)),
               ("export folder", lambda: os.path.join(export_dir, meta_ops["library"]) if meta_ops.get("library")
                else None))
    for src, get in sources:
        path = get()
        if path:
            if os.path.isfile(path):
                return path
            tried.append(f"{src}: {path}")
    raise ExportError(
        f"{os.path.join(export_dir, EXPORT_META)}: the model uses custom op(s) {meta_ops.get('names')} but no op "
        f"library was found (tried {', '.join(tried) or 'nothing'}); build external_ops (pip install "
        f"--no-build-isolation external_ops/) or pass op_library= / set EVACLIP_OP_LIBRARY")


def _np_dtype(name: str):
    return {"float32": np.float32, "int64": np.int64, "int32": np.int32}[name]


class EncoderPredictor:
    """One exported encoder (one input, one output) on paddle.inference.

    threads: CPU threads (None: perf.default_threads(), the user's OMP_NUM_THREADS or all usable CPUs).
    precision: 'fp32', 'bf16' (CPU: oneDNN bf16 when supported, else fp32 with a warning; GPU: mixed
    bf16) or 'fp16' (GPU only; fp32 on CPU with a warning). `precision_used` says what runs.
    tensorrt: on GPU, run a TensorRT-converted copy of the program (built once next to the model).
    tune_malloc: on CPU, keep freed memory in this process's heap (perf.tune_malloc, process-wide).
    Paddle Inference frees each large activation to the OS and page-faults it back in on the next
    op: about 2.3M minor faults per EVA02-B-16 batch of 32, and 4.7 vs 7.1 images/s on this
    project's 2-core test machine.
    """

    def __init__(self, model_file: str, params_file: str, device: str = "cpu", threads: Optional[int] = None,
                 precision: str = "fp32", onednn: bool = True, tensorrt: bool = False, gpu_id: int = 0,
                 gpu_mem_mb: int = 512, trt_shapes: Optional[dict] = None, onednn_cache: int = 0,
                 input_dtype: str = "float32", verbose: bool = False, tune_malloc: bool = True):
        from paddle import inference as pi

        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got '{precision}'")
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got '{device}'")
        for f in (model_file, params_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"exported model file not found: {f}")
        self.device, self.input_dtype = device, _np_dtype(input_dtype)
        self.program = "portable"  # EVACLIPPredictor sets "cpu_kernels" for that variant
        if device == "gpu" and tensorrt:
            model_file, params_file = _tensorrt_program(model_file, params_file, precision, trt_shapes,
                                                        input_dtype)
        cfg = pi.Config(model_file, params_file)
        if not verbose:
            cfg.disable_glog_info()
        self.precision_used = "fp32"
        if device == "gpu":
            import paddle
            if not paddle.is_compiled_with_cuda():
                raise RuntimeError("device='gpu' but this paddle build has no CUDA (install paddlepaddle-gpu)")
            prec = {"fp32": pi.PrecisionType.Float32, "fp16": pi.PrecisionType.Half,
                    "bf16": pi.PrecisionType.Bfloat16}[precision]
            if tensorrt:  # precision is baked into the converted program
                cfg.enable_use_gpu(gpu_mem_mb, gpu_id)
            else:
                cfg.enable_use_gpu(gpu_mem_mb, gpu_id, prec)
            self.precision_used = precision
        else:
            cfg.disable_gpu()
            if tune_malloc:
                from ..perf import tune_malloc as _tune
                _tune()
            from ..perf import default_threads
            n = threads or default_threads()
            cfg.set_cpu_math_library_num_threads(int(n))
            _set_kernel_threads(int(n))
            self.threads = int(n)
            if onednn:
                cfg.enable_mkldnn()
                if onednn_cache:  # bounds oneDNN's primitive cache when many batch sizes are seen
                    cfg.set_mkldnn_cache_capacity(int(onednn_cache))
            else:
                cfg.disable_mkldnn()
            if precision == "bf16":
                if not onednn:
                    warnings.warn("bf16 on CPU needs oneDNN; running fp32")
                elif not cpu_bf16_supported():
                    warnings.warn("this CPU has neither amx_bf16 nor avx512_bf16; running fp32 "
                                  "(oneDNN would emulate bf16 slowly)")
                else:
                    cfg.enable_mkldnn_bfloat16()
                    self.precision_used = "bf16"
            elif precision == "fp16":
                warnings.warn("fp16 inference is GPU-only in Paddle Inference; running fp32 on CPU")
        self._config = cfg
        self._pred = pi.create_predictor(cfg)
        names = self._pred.get_input_names()
        if len(names) != 1:
            raise ExportError(f"{model_file}: expected one input, found {names}")
        self.input_name = names[0]
        self.output_name = self._pred.get_output_names()[0]
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        with self._lock:  # a paddle predictor is not re-entrant
            h = self._pred.get_input_handle(self.input_name)
            h.reshape(list(x.shape))
            h.copy_from_cpu(x)
            self._pred.run()
            return self._pred.get_output_handle(self.output_name).copy_to_cpu()


def _tensorrt_program(model_file, params_file, precision, shapes, input_dtype):
    """Converts a program with paddle.tensorrt (GPU builds with TensorRT only) and caches it beside it.

    shapes: {'min': [...], 'opt': [...], 'max': [...]} input shapes (dynamic batch)."""
    try:
        from paddle.tensorrt.export import Input, PrecisionMode, TensorRTConfig, convert
    except ImportError as e:
        raise RuntimeError("tensorrt=True needs a paddlepaddle-gpu build with TensorRT "
                           f"(paddle.tensorrt is not importable: {e})") from None
    if not shapes:
        raise ValueError("tensorrt=True needs trt_shapes={'min':..., 'opt':..., 'max':...}")
    tag = f"trt_{precision}_b{shapes['min'][0]}-{shapes['max'][0]}"
    prefix = os.path.join(os.path.dirname(model_file), tag, "model")
    if not os.path.isfile(prefix + ".json"):
        inp = Input(min_input_shape=tuple(shapes["min"]), optim_input_shape=tuple(shapes["opt"]),
                    max_input_shape=tuple(shapes["max"]), input_data_type=input_dtype)
        tcfg = TensorRTConfig(inputs=[inp], precision_mode={"fp32": PrecisionMode.FP32, "fp16": PrecisionMode.FP16,
                                                            "bf16": PrecisionMode.BF16}[precision])
        tcfg.save_model_dir = prefix
        convert(os.path.splitext(model_file)[0], tcfg)
    return prefix + ".json", prefix + ".pdiparams"


def read_export_meta(export_dir: str) -> dict:
    path = os.path.join(export_dir, EXPORT_META)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is '{export_dir}' a folder written by evaclip-export?")
    try:
        with open(path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "towers" not in meta:
        raise ExportError(f"{path}: missing key 'towers'")
    return meta


KERNELS = ("auto", "native", "cpu")
KERNELS_HELP = ("program for a tower exported with CPU kernels: 'auto' runs it for fp32 on CPU when its op "
                "library loads, 'cpu' insists on it, 'native' runs the portable program")


class EVACLIPPredictor:
    """An export folder (evaclip-export) as image/text embedders.

    Towers are loaded on first use. Embeddings are L2-normalised unless normalize=False.
    kernels: which program runs a tower that has a CPU-kernel variant (export cpu_kernels):
    'auto' runs it for fp32 on CPU when its op library can be found, else the portable program;
    'cpu' insists on it (an error where it cannot run); 'native' always runs the portable program.
    `tower(name).program` says which one runs.
    """

    def __init__(self, export_dir: str, device: str = "cpu", threads: Optional[int] = None,
                 precision: Optional[str] = None, onednn: bool = True, tensorrt: bool = False,
                 op_library: Optional[str] = None, max_batch: int = 64, kernels: str = "auto",
                 **predictor_kwargs):
        from .preprocess import read_spec, transform_from_spec

        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got '{kernels}'")
        self.export_dir = export_dir
        self.meta = read_export_meta(export_dir)
        self.precision = precision or self.meta.get("precision", "fp32")
        self.spec = read_spec(export_dir)
        self.max_batch = int(max_batch)
        self.kernels, self.op_library = kernels, op_library
        self._kw = dict(device=device, threads=threads, precision=self.precision, onednn=onednn,
                        tensorrt=tensorrt, **predictor_kwargs)
        self._towers: Dict[str, EncoderPredictor] = {}
        self._init_lock = threading.Lock()
        self.transform = transform_from_spec(self.spec["image"]) if "image" in self.spec else None
        self._tokenizer = None

    @property
    def towers(self) -> List[str]:
        return sorted(self.meta["towers"])

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    def _runs_fp32_on_cpu(self) -> bool:
        kw = self._kw
        if kw["device"] != "cpu":
            return False
        return self.precision != "bf16" or not (kw["onednn"] and cpu_bf16_supported())

    def _register_ops(self, names: Sequence[str]):
        ops = dict(self.meta.get("custom_ops") or {}, names=list(names))
        register_op_library(_find_op_library(ops, self.export_dir, self.op_library))

    def _cpu_variant(self, name: str, t: dict) -> Optional[dict]:
        """The tower's CPU-kernel program entry when it is to run (its op library registered), else
        None; with kernels='cpu', an error where it cannot run."""
        where = os.path.join(self.export_dir, EXPORT_META)
        variant = t.get("cpu_kernels")
        if self.kernels == "native":
            return None
        if not (variant and self._runs_fp32_on_cpu()):
            if self.kernels == "cpu":
                why = (f"this export has no CPU-kernel '{name}' program (export with cpu_kernels)" if not variant
                       else "it runs fp32 on CPU only (device='cpu', and precision fp32 or no bf16 on this CPU)")
                raise ExportError(f"{where}: kernels='cpu' cannot be used: {why}")
            return None
        try:
            self._register_ops(variant.get("custom_ops") or [])
        except (ExportError, OSError, RuntimeError) as e:
            if self.kernels == "cpu":
                raise
            warnings.warn(f"{where}: running the portable '{name}' program, the CPU-kernel one cannot load ({e})")
            return None
        return variant

    def _create(self, prog: dict, t: dict, **overrides) -> EncoderPredictor:
        kw = dict(self._kw, **overrides)
        if kw.get("tensorrt"):
            shape = list(t["input"]["shape"])
            kw["trt_shapes"] = {"min": [1] + shape[1:], "opt": [min(8, self.max_batch)] + shape[1:],
                                "max": [self.max_batch] + shape[1:]}
        return EncoderPredictor(os.path.join(self.export_dir, prog["model_file"]),
                                os.path.join(self.export_dir, prog["params_file"]), input_dtype=t["input"]["dtype"],
                                **kw)

    def tower(self, name: str) -> EncoderPredictor:
        with self._init_lock:
            if name in self._towers:
                return self._towers[name]
            t = self.meta["towers"].get(name)
            if t is None:
                raise ExportError(f"{os.path.join(self.export_dir, EXPORT_META)}: this export has no "
                                  f"'{name}' tower (it has: {', '.join(self.towers)})")
            variant, pred = self._cpu_variant(name, t), None
            if variant is not None:
                if self.precision != "fp32":
                    warnings.warn(f"{self.precision} does not run on this CPU (bf16 needs amx_bf16 or avx512_bf16 "
                                  "and oneDNN; fp16 is GPU-only): running fp32")
                try:  # all-fp32 custom ops: oneDNN would only add its start-up
                    pred = self._create(variant, t, precision="fp32", onednn=bool(variant.get("onednn", False)))
                    pred.program = "cpu_kernels"
                except Exception as e:  # e.g. an op library built before one of the program's ops existed
                    if self.kernels == "cpu":
                        raise
                    warnings.warn(f"{os.path.join(self.export_dir, variant['model_file'])}: the CPU-kernel program "
                                  f"did not load ({type(e).__name__}: {str(e)[:300]}); running the portable one")
            if pred is None:
                # Exports from before per-tower op lists name their ops at the top level only.
                ops = t["custom_ops"] if "custom_ops" in t else (self.meta.get("custom_ops") or {}).get("names")
                if ops:
                    self._register_ops(ops)
                pred = self._create(t, t)
            self._towers[name] = pred
            return pred

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from ..data.tokenizer import CLIPTokenizer
            t = self.spec.get("text")
            if t is None:
                raise ExportError(f"{self.export_dir}: preprocess.json has no 'text' section")
            vocab = os.path.join(self.export_dir, t["vocab_file"]) if t.get("vocab_file") else None
            self._tokenizer = CLIPTokenizer(bpe_path=vocab, context_length=int(t["context_length"]))
        return self._tokenizer

    def _run(self, tower: str, x: np.ndarray, normalize: bool) -> np.ndarray:
        pred = self.tower(tower)
        outs = [pred(x[i:i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        out = np.concatenate(outs, 0).astype(np.float32) if outs else np.zeros((0, self.embed_dim), np.float32)
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        return out

    def encode_image(self, pixels: np.ndarray, normalize: bool = True) -> np.ndarray:
        """pixels: preprocessed float32 [N, 3, H, W]."""
        return self._run("image", pixels, normalize)

    def encode_text(self, ids: np.ndarray, normalize: bool = True) -> np.ndarray:
        """ids: int64 [N, context_length] token ids."""
        return self._run("text", ids, normalize)

    def preprocess(self, images: Sequence) -> np.ndarray:
        if self.transform is None:
            raise ExportError(f"{self.export_dir}: preprocess.json has no 'image' section")
        return np.stack([self.transform(im) for im in images]) if len(images) else np.zeros(
            (0, 3) + tuple(self.spec["image"]["size"]), np.float32)

    def embed_images(self, images: Sequence, normalize: bool = True) -> np.ndarray:
        """PIL images -> embeddings."""
        return self.encode_image(self.preprocess(images), normalize)

    def embed_texts(self, texts: Sequence[str], normalize: bool = True) -> np.ndarray:
        return self.encode_text(self.tokenizer(list(texts)), normalize)
