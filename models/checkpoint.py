"""Finding a checkpoint (folder or Hub id), and loading it into a Decoder without a second copy.

The model is built on the meta device, given uninitialised storage on the target device and
dtype, and each parameter is filled from the checkpoint in turn. Only safetensors are read unless
the caller allows pickle files, and those only with weights_only=True.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .config import ModelConfig
from .decoder import Decoder
from .errors import CheckpointError, CheckpointNotFound, PickleRefused
from .hub import resolve_checkpoint
from .pages import advise_huge_pages
from .quantize import is_quantized, quantize_rows
from .safetensors_io import TensorSource
from .tokenizer import Tokenizer

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# "int8": weight-only int8 (models/quantize.py), computing in what "auto" picks
DTYPES = ("auto", *_DTYPE_NAMES, "int8")
# Float rows read at a time while quantizing a tensor (the most float32 ever held beside the
# int8 weights while loading)
_QUANTIZE_CHUNK_BYTES = 4 << 20

Progress = Callable[[float, str], None]


@dataclass
class LoadedModel:
    model: Decoder
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path
    name: str
    device: torch.device
    dtype: torch.dtype              # the compute dtype: activations, KV cache, float weights
    load_seconds: float = 0.0
    quantization: str | None = None     # "int8": weight-only int8 linear layers and embedding
    extra: dict = field(default_factory=dict)


def _weight_files(path: Path, allow_pickle: bool) -> TensorSource:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index}: corrupt shard index") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{path}: missing shard {missing[0]} (listed in {index.name})")
        return TensorSource.from_safetensors(files)
    single = sorted(path.glob("*.safetensors"))
    if single:
        return TensorSource.from_safetensors(single)
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise PickleRefused(
                f"{path}: only pickle weights ({pickles[0].name}) found; pickle files can run code "
                "when loaded, so they are refused unless you allow them (--allow-pickle)")
        return TensorSource.from_pickle(pickles)
    raise CheckpointError(f"{path}: no weights found (expected model.safetensors)")


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CheckpointError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} asked for, but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise CheckpointError(f"device {device!r} asked for, but this machine has {count} CUDA "
                              f"device{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
    if dev.type not in ("cpu", "cuda"):
        raise CheckpointError(f"unsupported device {device!r} (auto, cpu, cuda, cuda:N)")
    return dev


def pick_dtype(dtype: str | torch.dtype, device: torch.device, cfg: ModelConfig) -> torch.dtype:
    """The compute dtype; for "int8" (int8 weights) the one "auto" picks."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("auto", "int8"):
        if device.type == "cpu":
            return torch.float32
        return _DTYPE_NAMES.get(str(cfg.torch_dtype), torch.bfloat16)
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"unknown dtype {dtype!r} ({', '.join(DTYPES)})")
    return _DTYPE_NAMES[dtype]


def weight_plan(cfg: ModelConfig, tied: bool) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Our parameter name -> the checkpoint tensors (with their expected shapes) that fill it, in
    order: a parameter made of several tensors (fused q/k/v, gate/up, per-head norms) is their
    concatenation along dim 0."""
    h, kv, d, hid = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    inter = cfg.intermediate_size
    persimmon, starcoder = cfg.model_type == "persimmon", cfg.model_type == "starcoder2"
    plan: dict[str, list[tuple[str, tuple[int, ...]]]] = {
        "embed.weight": [("model.embed_tokens.weight", (cfg.vocab_size, hid))],
    }
    final = "model.final_layernorm" if persimmon else "model.norm"
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        a, m = src + "self_attn.", src + "mlp."

        def add(name: str, *parts: tuple[str, tuple[int, ...]]) -> None:
            plan[dst + name] = list(parts)

        for ours, theirs in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
            if ours == "ln2" and cfg.parallel_residual:
                continue
            add(ours + ".weight", (src + theirs + ".weight", (hid,)))
            add(ours + ".bias", (src + theirs + ".bias", (hid,)))
        if persimmon:
            add("attn.qkv.weight", (a + "query_key_value.weight", (3 * h * d, hid)))
            add("attn.qkv.bias", (a + "query_key_value.bias", (3 * h * d,)))
            add("attn.o.weight", (a + "dense.weight", (hid, h * d)))
            add("attn.o.bias", (a + "dense.bias", (hid,)))
        else:
            shapes = {"q": (h * d, hid), "k": (kv * d, hid), "v": (kv * d, hid)}
            add("attn.qkv.weight", *((f"{a}{p}_proj.weight", s) for p, s in shapes.items()))
            if cfg.qkv_bias:
                add("attn.qkv.bias", *((f"{a}{p}_proj.bias", (s[0],)) for p, s in shapes.items()))
            add("attn.o.weight", (a + "o_proj.weight", (hid, h * d)))
            if cfg.o_bias:
                add("attn.o.bias", (a + "o_proj.bias", (hid,)))
        if cfg.qk_norm == "per_head":
            add("attn.q_norm.weight", *((f"{a}q_layernorm.norms.{j}.weight", (d,)) for j in range(h)))
            add("attn.k_norm.weight", *((f"{a}k_layernorm.norms.{j}.weight", (d,)) for j in range(kv)))
        elif cfg.qk_norm == "shared":
            for n in ("q", "k"):
                add(f"attn.{n}_norm.weight", (f"{a}{n}_layernorm.weight", (d,)))
                add(f"attn.{n}_norm.bias", (f"{a}{n}_layernorm.bias", (d,)))
        if cfg.model_type == "stablelm":
            add("mlp.up.weight", (m + "gate_proj.weight", (inter, hid)), (m + "up_proj.weight", (inter, hid)))
            add("mlp.down.weight", (m + "down_proj.weight", (hid, inter)))
        else:
            up, down = ("c_fc", "c_proj") if starcoder else ("dense_h_to_4h", "dense_4h_to_h")
            add("mlp.up.weight", (f"{m}{up}.weight", (inter, hid)))
            add("mlp.down.weight", (f"{m}{down}.weight", (hid, inter)))
            if cfg.mlp_bias:
                add("mlp.up.bias", (f"{m}{up}.bias", (inter,)))
                add("mlp.down.bias", (f"{m}{down}.bias", (hid,)))
    plan["norm.weight"] = [(final + ".weight", (hid,))]
    plan["norm.bias"] = [(final + ".bias", (hid,))]
    if not tied:
        plan["lm_head.weight"] = [("lm_head.weight", (cfg.vocab_size, hid))]
    return plan


def _is_norm_bias(param: str) -> bool:
    """LayerNorm biases may be absent (StableLM 2 12B, use_norm_bias false): they are zero."""
    return param.endswith(".bias") and (".ln" in param or param == "norm.bias" or "_norm." in param)


def _fill(model: Decoder, cfg: ModelConfig, source: TensorSource, progress: Progress | None) -> None:
    params = dict(model.named_parameters())
    plan = weight_plan(cfg, model.tied)
    for n, (name, parts) in enumerate(plan.items()):
        dst = params[name]
        if all(key not in source for key, _ in parts) and _is_norm_bias(name):
            dst.data.zero_()
            continue
        scale = params[name.removesuffix("weight") + "scale"] if dst.dtype == torch.int8 else None
        # parts are stacked along dim 0: each fills whole rows of dst (a per-head norm one row)
        row, row_numel = 0, dst[0].numel() if dst.dim() else 1
        for key, shape in parts:
            if key not in source:
                raise CheckpointError(f"missing tensor {key} (expected shape {list(shape)})")
            found = source.shape(key)
            if tuple(found) != shape:
                raise CheckpointError(
                    f"tensor {key} has shape {list(found)}, expected {list(shape)} from config.json")
            count = math.prod(shape) // row_numel
            rows = dst.data[row: row + count] if dst.dim() else dst.data
            if scale is None:
                source.read_into(key, rows)
            else:
                _read_quantized(source, key, rows, scale.data[row: row + count])
            row += count
        if cfg.fused_qkv and ".qkv." in name:
            _deinterleave_qkv(dst.data, cfg)
            if scale is not None:
                _deinterleave_qkv(scale.data, cfg)
        if progress is not None and n % 8 == 0:
            progress(n / len(plan), f"loading weights ({n}/{len(plan)})")


def _read_quantized(source: TensorSource, key: str, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Tensor `key` [N, K] quantized row by row into q [N, K] int8 and scale [N], a few MiB of
    float rows at a time: the float tensor is never held whole."""
    n, k = q.shape
    step = max(1, _QUANTIZE_CHUNK_BYTES // (4 * k))
    buf = torch.empty(min(step, n), k, dtype=torch.float32)
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows = buf[: stop - start]
        source.read_rows(key, start, stop, rows)
        # quantized where the model lives (.to is no copy on the CPU)
        quantize_rows(rows.to(q.device), q[start:stop], scale[start:stop])


def _deinterleave_qkv(t: torch.Tensor, cfg: ModelConfig) -> None:
    """Persimmon stores rows as (head, q|k|v, D); the decoder wants (q|k|v, head, D)."""
    h, d = cfg.num_heads, cfg.head_dim
    rest = t.shape[1:]
    t.copy_(t.view(h, 3, d, *rest).transpose(0, 1).reshape(t.shape))


def load_model(path_or_id: str | os.PathLike, device: str | torch.device = "auto",
               dtype: str | torch.dtype = "auto", allow_pickle: bool = False,
               progress: Progress | None = None, offline: bool | None = None) -> LoadedModel:
    """Load a checkpoint folder or Hub id into our Decoder, with its tokenizer."""
    t0 = time.perf_counter()
    path = resolve_checkpoint(path_or_id, offline=offline)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointNotFound(f"{path}: no config.json (not a Hugging Face checkpoint folder)")
    cfg = ModelConfig.from_file(config_file)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev, cfg)
    int8 = dtype == "int8"
    tokenizer = Tokenizer.from_folder(path, cfg)
    source = _weight_files(path, allow_pickle)
    try:
        tied = "lm_head.weight" not in source
        with torch.device("meta"):
            model = Decoder(cfg, tie_word_embeddings=tied, int8=int8)
        model = model.to(dtype=dt)
        for module in model.modules():
            if is_quantized(module):     # scales stay float32 whatever the compute dtype
                module.scale.data = module.scale.data.float()
                if hasattr(module, "dtype"):
                    module.dtype = dt
        model = model.to_empty(device=dev)
        for tensor in (*model.parameters(), *model.buffers()):  # before they are written
            advise_huge_pages(tensor)
        if int8 and tied:
            model.share_int8_head()
        _fill(model, cfg, source, progress)
    finally:
        source.close()
    model.eval().requires_grad_(False)
    if progress is not None:
        progress(1.0, "weights loaded")
    name = os.fspath(path_or_id) if not Path(os.fspath(path_or_id)).expanduser().exists() else path.name
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, path=path, name=name,
                       device=dev, dtype=dt, load_seconds=time.perf_counter() - t0,
                       quantization="int8" if int8 else None)
