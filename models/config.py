"""One config for all three decoder families, read from a checkpoint's config.json.

The families differ only in the fields below; `decoder.py` has one implementation that branches
on them. Field sources per family are in shared/notes/models.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsupportedModel

SUPPORTED_MODEL_TYPES = ("stablelm", "persimmon", "starcoder2")

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu2": "relu2", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    rope_theta: float
    rotary_dim: int                 # rotate the first rotary_dim dims of each head (NeoX style)
    norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    mlp_gated: bool                 # down(act(gate(x)) * up(x)) instead of down(act(up(x)))
    activation: str                 # silu | relu2 | gelu_tanh | gelu
    qk_norm: str | None             # None | "per_head" (StableLM) | "shared" (Persimmon)
    parallel_residual: bool
    fused_qkv: bool                 # Persimmon's per-head interleaved query_key_value
    sliding_window: int | None      # query q sees key k iff q - W < k <= q
    tie_word_embeddings: bool       # a hint: the loader ties whenever lm_head.weight is absent
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None         # the checkpoint's dtype name, e.g. "bfloat16"

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes per cached token at 1 byte per element (multiply by the element size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable JSON config ({exc})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: config.json must hold a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"{source}: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        try:
            return _PARSERS[model_type](raw)
        except KeyError as exc:
            raise CheckpointError(f"{source}: missing field {exc.args[0]!r} for {model_type}") from None
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: invalid value ({exc})") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _rope(raw: dict[str, Any], default_partial: float) -> tuple[float, float]:
    """(theta, partial_rotary_factor) from either the old top-level fields or rope_parameters."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UnsupportedModel(f"rope type {rope_type!r} is not supported (only the default RoPE)")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", default_partial))
    return float(theta), float(partial)


def _eos(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)


def _common(raw: dict[str, Any], *, partial_default: float, eps_key: str) -> dict[str, Any]:
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    head_dim = int(raw.get("head_dim") or hidden // heads)
    theta, partial = _rope(raw, partial_default)
    act = raw.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise UnsupportedModel(f"hidden_act {act!r} is not supported")
    bos = raw.get("bos_token_id")
    vocab = int(raw["vocab_size"])
    return dict(
        model_type=raw["model_type"], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]), num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=head_dim,
        max_positions=int(raw.get("max_position_embeddings", 4096)), rope_theta=theta,
        rotary_dim=int(head_dim * partial), norm_eps=float(raw.get(eps_key, 1e-5)),
        activation=_ACTIVATIONS[act], tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=int(bos) if isinstance(bos, int) and 0 <= bos < vocab else None,
        eos_token_ids=tuple(e for e in _eos(raw) if 0 <= e < vocab),
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
    )


def _stablelm(raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        **_common(raw, partial_default=0.25, eps_key="layer_norm_eps"),
        qkv_bias=bool(raw.get("use_qkv_bias", False)), o_bias=False, mlp_bias=False, mlp_gated=True,
        qk_norm="per_head" if raw.get("qk_layernorm") else None,
        parallel_residual=bool(raw.get("use_parallel_residual", False)), fused_qkv=False,
        sliding_window=None,
    )


def _persimmon(raw: dict[str, Any]) -> ModelConfig:
    common = _common(raw, partial_default=0.5, eps_key="layer_norm_eps")
    common["num_kv_heads"] = common["num_heads"]  # Persimmon is multi-head only
    return ModelConfig(
        **common, qkv_bias=True, o_bias=True, mlp_bias=True, mlp_gated=False,
        qk_norm="shared" if raw.get("qk_layernorm", True) else None, parallel_residual=False,
        fused_qkv=True, sliding_window=None,
    )


def _starcoder2(raw: dict[str, Any]) -> ModelConfig:
    bias = bool(raw.get("use_bias", True))
    window = raw.get("sliding_window")
    return ModelConfig(
        **_common(raw, partial_default=1.0, eps_key="norm_epsilon"),
        qkv_bias=bias, o_bias=bias, mlp_bias=bias, mlp_gated=False, qk_norm=None,
        parallel_residual=False, fused_qkv=False,
        sliding_window=int(window) if window else None,
    )


_PARSERS = {"stablelm": _stablelm, "persimmon": _persimmon, "starcoder2": _starcoder2}
