"""Every decoder layer of a short pass in one C call (csrc/decode_layers.c), on a CPU.

A decode step of the 160M model is 12 layers of about 40 small torch ops around 5 kernel calls;
at 1500 cached positions the ops cost 2.4 ms a step on a Zen 3 core (12% of an int8 step, 22% on
two cores, where they do not get faster). Where every kernel of a pass is one of the project's own
(the linear layers' kernels chosen for that pass length by inference/tuning.py are "rows" or "q8",
and the own attention kernel runs it), the pass goes through `decode_layers` instead of the
blocks: the same kernels, called from C with the elementwise work (LayerNorm, qk-norm, RoPE, the
KV cache writes, the activation, the residuals) in between. Passes it does not take (a prefill
chunk, a layer on oneDNN or torch's kernels, a batch, a bfloat16 cache) run the blocks as
before. The embedding and the head stay in Python (one call each per pass).

Results are the blocks' to float rounding (LayerNorm's moments and the activations round
differently from torch's; RoPE and the kernels are the same arithmetic); the library's self-check
runs four small models covering every shape the decoder has (qk-norms, parallel residual, gated
and plain MLPs, the four activations, GQA, a float16 cache, masks, a ring) through both.
"""
from __future__ import annotations

import ctypes
import logging
import time

import torch

from .attention import CPU_MAX_POSITIONS, CpuDecodeAttention
from .linear import KernelLinear
from .tuning import choice_at

log = logging.getLogger(__name__)

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu2": 3}
QK_NORMS = {None: 0, "per_head": 1, "shared": 2}
IMPLS = ("rows", "q8")      # the linear implementations whose kernels it calls
CACHE_DTYPES = (torch.float32, torch.float16)

_p = ctypes.c_void_p


class _Linear(ctypes.Structure):
    _fields_ = [("fn", _p), ("w", _p), ("scale", _p), ("bias", _p), ("n", ctypes.c_long),
                ("k", ctypes.c_long)]


class _Layer(ctypes.Structure):
    _fields_ = [(name, _p) for name in ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "qn_w", "qn_b", "kn_w", "kn_b")] + \
               [(name, _Linear) for name in ("qkv", "o", "up", "down")]


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_long) for name in
                ("layers", "hidden", "inter", "heads", "kv_heads", "head_dim", "rotary_dim")] + \
               [(name, ctypes.c_int) for name in ("parallel", "gated", "act", "qk_norm")] + \
               [("eps", ctypes.c_float), ("attention", _p), ("layer", ctypes.POINTER(_Layer))]


class LayersKernel:
    """The compiled decode_layers, its scratch size, and kernels that do nothing with the linear
    and attention kernels' signatures (what a pass costs besides its kernels: measure_glue)."""

    def __init__(self, lib: ctypes.CDLL, path):
        from .cpu_kernels import AttentionKernel, LinearKernel, typed_attention, typed_linear

        self.path = path
        self.noop_linear = LinearKernel(typed_linear(lib.noop_linear), CPU_MAX_POSITIONS, path)
        noop = typed_attention(lib.noop_attention)
        self.noop_attention = AttentionKernel(noop, noop, path)
        self.fn = lib.decode_layers
        self.fn.argtypes = [_p, _p, ctypes.c_long, _p, _p, _p, _p, ctypes.c_int, ctypes.c_long,
                            ctypes.c_long, _p, ctypes.c_long, _p, _p, ctypes.c_int]
        self.fn.restype = ctypes.c_int
        self.work = lib.decode_layers_work
        self.work.argtypes = [_p, ctypes.c_long]
        self.work.restype = ctypes.c_long


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


class NativeLayers:
    """A Decoder.run_layers hook (see models.decoder.Decoder.forward): the model's blocks for a
    pass of t <= 16 positions of one sequence with a cache (float32 or float16), t one of
    `lengths`; None for every other pass."""

    def __init__(self, kernel: LayersKernel, model, attention: CpuDecodeAttention,
                 lengths=range(1, CPU_MAX_POSITIONS + 1)):
        """lengths: the pass lengths to take (where the kernels let it)."""
        self.kernel, self.model, self.attention = kernel, model, attention
        self.cfg = model.cfg
        self._structs: dict[tuple, tuple[_Model, object]] = {}
        self._by_length: list[tuple[_Model, object] | None] = [None] * (CPU_MAX_POSITIONS + 1)
        for t in lengths:
            if 1 <= t <= CPU_MAX_POSITIONS:
                self._by_length[t] = self._struct_for(t)
        own = attention.kernel     # by the cache's dtype: float32, float16
        self._attention = {False: _address(own.fn), True: _address(own.fn16)}
        # scratch for the longest pass, once (kernels that do nothing leave zeros: measure_glue)
        some = next((e for e in self._by_length if e is not None), None)
        self._work = torch.zeros(0 if some is None else kernel.work(ctypes.byref(some[0]), CPU_MAX_POSITIONS))

    @property
    def lengths(self) -> list[int]:
        """The pass lengths it takes."""
        return [t for t in range(1, CPU_MAX_POSITIONS + 1) if self._by_length[t] is not None]

    def _struct_for(self, t: int):
        """The C model for passes of t positions (its linear kernels are those the layers'
        tables name for t), or None where a kernel is not one of the own."""
        if not self.attention.own[t]:
            return None
        impls = []
        for block in self.model.blocks:
            for layer in (block.attn.qkv, block.attn.o, block.mlp.up, block.mlp.down):
                if not isinstance(layer, KernelLinear) or layer.packed_weight is not None:
                    return None
                impl = layer.impl_for(t)
                if impl.name not in IMPLS or impl.kernel is None \
                        or layer.weight.dtype not in (torch.float32, torch.int8):
                    return None
                impls.append(impl.kernel)
        key = tuple(id(k) for k in impls)
        if key not in self._structs:
            self._structs[key] = self._build(impls)
        return self._structs[key]

    def _build(self, kernels) -> tuple[_Model, object]:
        cfg = self.cfg
        layers = (_Layer * cfg.num_layers)()
        it = iter(kernels)
        for i, block in enumerate(self.model.blocks):
            lay = layers[i]
            lay.ln1_w, lay.ln1_b = _ptr(block.ln1.weight), _ptr(block.ln1.bias)
            if block.ln2 is not None:
                lay.ln2_w, lay.ln2_b = _ptr(block.ln2.weight), _ptr(block.ln2.bias)
            att = block.attn
            if att.q_norm is not None:
                lay.qn_w, lay.qn_b = _ptr(att.q_norm.weight), _ptr(getattr(att.q_norm, "bias", None))
                lay.kn_w, lay.kn_b = _ptr(att.k_norm.weight), _ptr(getattr(att.k_norm, "bias", None))
            for name, layer in (("qkv", att.qkv), ("o", att.o), ("up", block.mlp.up), ("down", block.mlp.down)):
                kernel = next(it)
                setattr(lay, name, _Linear(_address(kernel.fn), _ptr(layer.weight), _ptr(layer.scale),
                                           _ptr(layer.bias), layer.out_features, layer.in_features))
        model = _Model(layers=cfg.num_layers, hidden=cfg.hidden_size, inter=cfg.intermediate_size,
                       heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       rotary_dim=cfg.rotary_dim, parallel=int(cfg.parallel_residual),
                       gated=int(cfg.mlp_gated), act=ACTIVATIONS[cfg.activation],
                       qk_norm=QK_NORMS[cfg.qk_norm], eps=cfg.norm_eps, attention=None,
                       layer=layers)
        return model, layers        # the array must live as long as the struct

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, attn):
        b, t, _ = x.shape
        if (cache is None or b != 1 or t > CPU_MAX_POSITIONS or attn.is_causal
                or x.dtype != torch.float32 or cache.k.dtype not in CACHE_DTYPES
                or cache.k.shape[1] != 1):
            return None
        entry = self._by_length[t]
        if entry is None:
            return None
        model = entry[0]
        half = cache.k.dtype == torch.float16
        model.attention = self._attention[half]
        x = x.contiguous().clone()
        cos, sin = cos.contiguous(), sin.contiguous()
        slots = attn.slots.contiguous()
        mask = None if attn.mask is None else attn.mask.contiguous().view(torch.uint8)
        k, v = cache.k, cache.v
        rc = self.kernel.fn(ctypes.byref(model), x.data_ptr(), t, cos.data_ptr(), sin.data_ptr(),
                            k.data_ptr(), v.data_ptr(), int(half), k.stride(0), k.stride(2),
                            slots.data_ptr(), attn.kv_len, _ptr(mask), self._work.data_ptr(),
                            torch.get_num_threads())
        if rc:
            raise RuntimeError(f"decode_layers refused a pass of {t} positions (code {rc})")
        return x


def measure_glue(model, kernel: LayersKernel, points, *, repeats: int = 3,
                 kv_dtype: torch.dtype | None = None, tick=None) -> dict:
    """{"blocks": {t: us}, "native": {t: us}}: a pass of t positions after a few cached ones, the
    whole model (embedding, blocks, head) with kernels that do nothing, through the blocks and
    through decode_layers: what each way costs besides its kernels. The model's layers must be
    unpacked (inference/tuning.py measures before it packs); their tables and the attention
    kernel are put back afterwards."""
    from .linear import _rows_impl

    layers = [m for m in model.modules() if isinstance(m, KernelLinear)]
    saved = [(layer, layer.table) for layer in layers], model.attention, model.run_layers
    noop = _rows_impl(kernel.noop_linear)
    held = 32
    cache = model.new_cache(held + max(points), dtype=kv_dtype, zeroed=False)
    us: dict[str, dict[int, float]] = {"blocks": {}, "native": {}}
    try:
        for layer in layers:
            layer.table = ((None, noop),)
        model.attention = CpuDecodeAttention(kernel.noop_attention)
        hooks = {"blocks": None, "native": NativeLayers(kernel, model, model.attention)}
        for t in points:
            ids = torch.zeros(1, t, dtype=torch.long)
            for _ in range(repeats):
                for name, hook in hooks.items():
                    model.run_layers = hook
                    cache.length = held     # what the kernels would read is never read
                    t0 = time.perf_counter()
                    model(ids, cache, last_only=True)
                    spent = (time.perf_counter() - t0) * 1e6
                    us[name][t] = min(us[name].get(t, float("inf")), spent)
            if tick is not None:
                tick(f"layers' glue, {t} position{'s' if t > 1 else ''}")
    finally:
        for layer, table in saved[0]:
            layer.table = table
        model.attention, model.run_layers = saved[1], saved[2]
    return us


def install(model, table) -> NativeLayers | None:
    """Make `model` run its blocks through decode_layers for the pass lengths `table` (((longest
    pass, "native" | "blocks"), ...), inference/tuning.py's Plan.layers: after the kernels are
    chosen) says, or remove the hook (an empty table); returns it, or None where it takes no
    pass."""
    from .cpu_kernels import load_decode_layers

    model.run_layers = None
    lengths = [t for t in range(1, CPU_MAX_POSITIONS + 1) if table and choice_at(table, t) == "native"]
    if not lengths or not isinstance(model.attention, CpuDecodeAttention):
        return None
    kernel = load_decode_layers()
    if isinstance(kernel, str):
        return None
    native = NativeLayers(kernel, model, model.attention, lengths)
    if native.lengths:
        model.run_layers = native
        log.debug("decode_layers: passes of %s positions", native.lengths)
        return native
    return None


# -- the library's self-check -------------------------------------------------------------------

def _check_config(**changes):
    from stablelm_lsp.models.config import ModelConfig

    base = dict(model_type="stablelm", vocab_size=50, hidden_size=40, intermediate_size=56,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=10, max_positions=64,
                rope_theta=10000.0, rotary_dim=4, norm_eps=1e-5, qkv_bias=True, o_bias=False,
                mlp_bias=False, mlp_gated=True, activation="silu", qk_norm="per_head",
                parallel_residual=False, fused_qkv=False, sliding_window=None,
                tie_word_embeddings=False, bos_token_id=0, eos_token_ids=(0,), torch_dtype="float32")
    return ModelConfig(**{**base, **changes})


CHECK_CONFIGS = (
    dict(),
    dict(num_kv_heads=4, qk_norm="shared", parallel_residual=True, mlp_gated=False,
         activation="gelu_tanh", o_bias=True, mlp_bias=True, rotary_dim=10, head_dim=10),
    dict(qk_norm=None, activation="relu2", mlp_gated=False, num_kv_heads=1),
    dict(qk_norm=None, activation="gelu", parallel_residual=True, sliding_window=6),
)


def check(kernel: LayersKernel) -> str | None:
    """Small models of every shape the decoder has, through the blocks (torch's ops around the
    own kernels) and through decode_layers: outputs and written caches within float rounding,
    float32 and float16 caches, one and several positions (under a mask, and on a ring)."""
    from stablelm_lsp.models.decoder import Decoder

    from .cpu_kernels import kernel_for
    from .linear import TORCH, _rows_impl, install as install_linear

    cpu = torch.device("cpu")
    rows, why = kernel_for("rows_linear", "the own linear kernel", cpu, torch.float32)
    att, why2 = kernel_for("decode_attention", "the own attention kernel", cpu, torch.float32)
    if rows is None or att is None:
        return "decode_layers calls the own linear and attention kernels: " + "; ".join(why + why2)
    g = torch.Generator().manual_seed(0)
    for changes in CHECK_CONFIGS:
        cfg = _check_config(**changes)
        model = Decoder(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():   # norms' weights about 1, the rest small
                norm = "norm" in name or name.split(".")[-2].startswith("ln")
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (norm and name.endswith("weight")))
        table = ((CPU_MAX_POSITIONS, _rows_impl(rows)), (None, TORCH))
        for layer in install_linear(model):
            layer.table = table
        model.attention = CpuDecodeAttention(att)
        native = NativeLayers(kernel, model, model.attention)
        ids = torch.randint(1, cfg.vocab_size, (1, 12), generator=g)
        for dtype in CACHE_DTYPES:
            for t in (1, 3):
                results = []
                for hook in (None, native):
                    cache = model.new_cache(16, dtype=dtype)
                    model.run_layers = None
                    model(ids[:, :8], cache)
                    model.run_layers = hook
                    logits = model(ids[:, 8:8 + t], cache)
                    results.append((logits, cache.k.float(), cache.v.float()))
                model.run_layers = None
                for want, got in zip(results[0], results[1]):
                    if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
                        return (f"the compiled decode_layers disagrees with the decoder's blocks "
                                f"({changes or 'base'}, {t} positions, {dtype} cache)")
    return None
