"""One decoder for StableLM, Persimmon and StarCoder2; the families differ only by ModelConfig.

Shapes: B batch, T new tokens, S keys attended, H query heads, K kv heads, D head_dim.
Weights are stored the way the math wants them (q, k and v fused into one projection in the order
[q heads | k heads | v heads]); checkpoint.py maps the Hub's tensor names onto them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .pages import advise_huge_pages
from .quantize import Int8Embedding, Int8Linear


class LayerNorm(nn.Module):
    """nn.LayerNorm with an optional bias (a checkpoint without norm biases means zero bias)."""

    def __init__(self, dim: int, eps: float, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class PerHeadLayerNorm(nn.Module):
    """StableLM's qk-layernorm: one bias-free LayerNorm(D) per head; weight [heads, D]."""

    def __init__(self, heads: int, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, heads, D]
        return F.layer_norm(x, x.shape[-1:], None, None, self.eps) * self.weight


def _linear(n_in: int, n_out: int, bias: bool, int8: bool) -> nn.Module:
    return Int8Linear(n_in, n_out, bias) if int8 else nn.Linear(n_in, n_out, bias=bias)


def _activation(name: str):
    if name == "silu":
        return F.silu
    if name == "relu2":
        return lambda x: torch.square(F.relu(x))
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, int8: bool = False):
        super().__init__()
        self.cfg = cfg
        h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = _linear(cfg.hidden_size, (h + 2 * k) * d, cfg.qkv_bias, int8)
        self.o = _linear(h * d, cfg.hidden_size, cfg.o_bias, int8)
        if cfg.qk_norm == "per_head":
            self.q_norm = PerHeadLayerNorm(h, d, cfg.norm_eps)
            self.k_norm = PerHeadLayerNorm(k, d, cfg.norm_eps)
        elif cfg.qk_norm == "shared":
            self.q_norm = LayerNorm(d, cfg.norm_eps)
            self.k_norm = LayerNorm(d, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, layer: int, cache: "KVCache | None", attn: "AttentionInputs"):
        cfg = self.cfg
        b, t, _ = x.shape
        h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        heads = self.qkv(x).view(b, t, h + 2 * k, d)     # [q heads | k heads | v heads]
        v = heads[:, :, h + k:]
        if self.q_norm is not None:
            q, key = self.q_norm(heads[:, :, :h]), self.k_norm(heads[:, :, h:h + k])
            q, key = _rope(q, cos, sin, cfg.rotary_dim), _rope(key, cos, sin, cfg.rotary_dim)
        else:   # the same rotation for every head: q and k heads in one go (fewer ops a step)
            qk = _rope(heads[:, :, :h + k], cos, sin, cfg.rotary_dim)
            q, key = qk[:, :, :h], qk[:, :, h:]
        q, key, v = q.transpose(1, 2), key.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        out = attn.kernel(q, key, v, layer, cache, attn)
        return self.o(out.transpose(1, 2).reshape(b, t, h * d))


def sdpa_attention(q, key, value, layer: int, cache: "KVCache | None", attn: "AttentionInputs"):
    """The default attention kernel: store this step's keys/values, attend with torch SDPA.

    q [B, H, T, D], key/value [B, K, T, D], all after RoPE -> [B, H, T, D]. Other kernels
    (inference/attention.py) take the same arguments and must store the keys/values themselves.
    """
    if cache is not None:
        key, value = cache.write(layer, key, value, attn)
    return attend(q, key, value, attn.mask, attn.is_causal)


def attend(q, key, value, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """torch SDPA for q [B, H, T, D] over key/value [B, K, S, D] -> [B, H, T, D]; mask [T, S]
    (True = attend) or None.

    Grouped-query attention (K < H) without the causal flag folds the H / K query heads that share
    a kv head into the query positions ([B, K, G*T, D], the mask repeated per group): the same
    math, each kv head read once, and the mask goes to SDPA's fused kernels (`enable_gqa` with a
    mask falls back to the slow math kernel on CUDA). A cache kept in another dtype than the
    queries' (Decoder.new_cache) is read in theirs."""
    if key.dtype != q.dtype:
        key, value = key.to(q.dtype), value.to(q.dtype)
    heads, kv_heads = q.shape[1], key.shape[1]
    if heads == kv_heads:
        return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, is_causal=is_causal)
    if is_causal:
        return F.scaled_dot_product_attention(q, key, value, is_causal=True, enable_gqa=True)
    b, _, t, d = q.shape
    group = heads // kv_heads
    folded = q.reshape(b, kv_heads, group * t, d)      # row g*T + t: query head k*G + g at position t
    if mask is not None:
        mask = mask.repeat(group, 1)
    # reshape: fused CUDA kernels may return the output in another memory layout
    return F.scaled_dot_product_attention(folded, key, value, attn_mask=mask).reshape(b, heads, t, d)


def static_sdpa_attention(q, key, value, layer: int, cache: "KVCache", attn: "AttentionInputs"):
    """The kernel of Decoder.decode_static: store the step's keys/values at `attn.slots` (a device
    tensor) and attend over the cache's whole capacity under `attn.mask`; no shape depends on
    the position, so the step can be captured (CUDA graphs) or compiled once."""
    k, v = cache.k[layer], cache.v[layer]
    k.index_copy_(2, attn.slots, key.to(k.dtype))
    v.index_copy_(2, attn.slots, value.to(v.dtype))
    return attend(q, k, v, attn.mask, False)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """NeoX rotate-half RoPE on the first rotary_dim dims; x [B, T, heads, D], cos/sin [T, rd]."""
    if rotary_dim == 0:
        return x
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = rotary_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, int8: bool = False):
        super().__init__()
        self.gated = cfg.mlp_gated
        self.act = _activation(cfg.activation)
        # gated: up holds [gate; up] fused, as in the math down(act(gate(x)) * up(x))
        self.up = _linear(cfg.hidden_size, cfg.intermediate_size * (2 if cfg.mlp_gated else 1),
                          cfg.mlp_bias, int8)
        self.down = _linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, int8)

    def forward(self, x):
        if self.gated:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(self.act(gate) * up)
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, int8: bool = False):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.ln1 = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.ln2 = None if cfg.parallel_residual else LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, int8)
        self.mlp = MLP(cfg, int8)

    def forward(self, x, cos, sin, layer, cache, attn):
        h = self.ln1(x)
        if self.parallel:
            return x + self.attn(h, cos, sin, layer, cache, attn) + self.mlp(h)
        x = x + self.attn(h, cos, sin, layer, cache, attn)
        return x + self.mlp(self.ln2(x))


class AttentionInputs:
    """What every layer's attention needs for one forward step, computed once per step.

    Keys are addressed by cache slot; `slots` [T] are where this step's keys go, and `mask`
    [T, S] (True = attend) is None when plain causal attention (or none, for T == 1) is exact.
    """

    __slots__ = ("slots", "kv_len", "mask", "is_causal", "kernel")

    def __init__(self, slots, kv_len, mask, is_causal):
        self.slots, self.kv_len, self.mask, self.is_causal = slots, kv_len, mask, is_causal
        self.kernel = sdpa_attention  # the Decoder sets its own (Decoder.attention)


class KVCache:
    """Preallocated keys and values of one sequence, all layers: [layers, B, K, capacity, D].

    Linear caches hold position p at slot p. Sliding-window models use a ring: slot p % capacity,
    with `positions[slot]` recording which position a slot holds (-1: empty), so memory stays at
    `capacity` entries however long the sequence gets (capacity >= window). `length` is the number
    of tokens processed so far, i.e. the position the next token gets.
    """

    def __init__(self, cfg: ModelConfig, capacity: int, *, device=None, dtype=torch.float32, batch: int = 1,
                 zeroed: bool = True):
        """zeroed=False leaves the entries past what was written uninitialised (no time spent
        writing zeros over the whole capacity): right wherever only written entries are read,
        as in `forward`; decode_static attends over the whole capacity and needs zeros."""
        self.cfg = cfg
        self.zeroed = zeroed
        self.window = cfg.sliding_window
        if self.window is not None and capacity < self.window:
            capacity = self.window  # a ring shorter than the window would lose needed keys
        self.capacity = int(capacity)
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, self.capacity, cfg.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        for t in (self.k, self.v):
            advise_huge_pages(t)    # read whole at every step, like the weights (pages.py)
            if zeroed:
                t.zero_()
        self.positions = torch.full((self.capacity,), -1, dtype=torch.long, device=device)
        self.length = 0
        # Rings: the first position whose keys are still held. Kept explicitly because cutting
        # a ring back (truncate) frees slots without bringing back what they overwrote.
        self._oldest = 0

    @property
    def ring(self) -> bool:
        return self.window is not None

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def oldest_position(self) -> int:
        """The first position whose keys are still held."""
        return self._oldest

    @property
    def max_step(self) -> int:
        """Most tokens one forward step may add without overwriting keys it still needs."""
        if not self.ring:
            return max(0, self.capacity - self.length)
        return self.capacity - self.window + 1

    def advance_static(self) -> None:
        """Account for one token written by Decoder.decode_static at position `length`."""
        self.length += 1
        if self.ring:
            self._oldest = max(self._oldest, self.length - self.capacity)

    def can_truncate(self, n: int) -> bool:
        """Whether keeping positions < n and continuing from n is exact with what is held."""
        if n < 0 or n > self.length:
            return False
        if not self.ring:
            return True
        needed = max(0, n - self.window + 1)  # the query at n attends keys from n - W + 1
        return needed >= self.oldest_position

    def truncate(self, n: int) -> None:
        if not self.can_truncate(n):
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        if self.ring:
            self.positions[self.positions >= n] = -1
        self.length = n

    def reset(self) -> None:
        self.positions.fill_(-1)
        self.length = 0
        self._oldest = 0

    def ensure_capacity(self, n: int) -> None:
        """Grow (geometrically) so that n positions fit; rings never need more than they have."""
        if self.ring or n <= self.capacity:
            return
        new_cap = max(n, int(self.capacity * 1.5) + 16)
        for name in ("k", "v"):
            old = getattr(self, name)
            shape = old.shape[:3] + (new_cap, old.shape[4])
            new = old.new_zeros(shape) if self.zeroed else old.new_empty(shape)
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)
        self.positions = torch.cat(
            [self.positions, self.positions.new_full((new_cap - self.capacity,), -1)])
        self.capacity = new_cap

    def copy_prefix_from(self, other: "KVCache", n: int) -> None:
        """Make this cache hold `other`'s first n positions (other must be able to truncate to n)."""
        if not other.can_truncate(n):
            raise ValueError(f"the source cache no longer holds what position {n} needs")
        if self.ring:
            if self.capacity != other.capacity:
                raise ValueError("ring caches must have the same capacity to copy")
            self.k.copy_(other.k)
            self.v.copy_(other.v)
            self.positions.copy_(other.positions)
            self.length, self._oldest = other.length, other._oldest
            self.truncate(n)
            return
        self.ensure_capacity(n)
        self.k[:, :, :, :n] = other.k[:, :, :, :n]
        self.v[:, :, :, :n] = other.v[:, :, :, :n]
        self.length = n

    def plan(self, t: int) -> AttentionInputs:
        """Slots and mask for appending t tokens at positions length .. length + t - 1."""
        start, device = self.length, self.k.device
        if not self.ring:
            end = start + t
            if end > self.capacity:
                raise ValueError(f"KV cache holds {self.capacity} positions, {end} needed")
            slots = torch.arange(start, end, device=device)
            if t == 1 or start == 0:  # plain causal attention is exact here
                return AttentionInputs(slots, end, None, t > 1)
            q_pos = slots[:, None]
            k_pos = torch.arange(end, device=device)[None, :]
            return AttentionInputs(slots, end, k_pos <= q_pos, False)
        if t > self.max_step:
            raise ValueError(f"a ring of {self.capacity} slots takes at most {self.max_step} tokens a step")
        q_pos = torch.arange(start, start + t, device=device)
        slots = q_pos % self.capacity
        self.positions[slots] = q_pos
        self._oldest = max(self._oldest, start + t - self.capacity)
        kv_len = min(self.capacity, start + t)
        k_pos = self.positions[:kv_len][None, :]
        mask = (k_pos >= 0) & (k_pos <= q_pos[:, None]) & (k_pos > q_pos[:, None] - self.window)
        return AttentionInputs(slots, kv_len, mask, False)

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, attn: AttentionInputs):
        """Store this step's keys/values [B, K, T, D]; return the keys/values to attend over."""
        k, v = self.k[layer], self.v[layer]
        if not self.ring:
            start = attn.kv_len - key.shape[2]
            k[:, :, start: attn.kv_len] = key
            v[:, :, start: attn.kv_len] = value
        else:
            k.index_copy_(2, attn.slots, key.to(k.dtype))
            v.index_copy_(2, attn.slots, value.to(v.dtype))
        return k[:, :, : attn.kv_len], v[:, :, : attn.kv_len]


class Decoder(nn.Module):
    """Token ids in, logits out; with a KVCache, positions continue at cache.length.

    int8: weight-only int8 linear layers and embedding table (models/quantize.py); norms, biases,
    activations and the KV cache stay in the float dtype the model is converted to."""

    def __init__(self, cfg: ModelConfig, tie_word_embeddings: bool | None = None, int8: bool = False):
        super().__init__()
        self.cfg = cfg
        self.int8 = int8
        self.embed = Int8Embedding(cfg.vocab_size, cfg.hidden_size) if int8 else \
            nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, int8) for _ in range(cfg.num_layers))
        self.norm = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        tie = cfg.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
        # True when lm_head is a module that reads the embedding table itself (an int8 head, or
        # a layer inference/ installed on it): the head is still tied
        self.head_shares_embedding = False
        if not tie:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, int8)
        elif int8:
            self.share_int8_head()
        else:
            self.lm_head = None
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        # The attention kernel every layer calls (see sdpa_attention); inference/attention.py
        # may install another one (flash-attn on CUDA).
        self.attention = sdpa_attention
        # Another way to run every block of a pass, installed by inference/ (native_layers.py):
        # run_layers(x, cos, sin, cache, attn) -> x after the last block, or None for a pass it
        # does not take (the blocks then run one by one).
        self.run_layers = None

    def share_int8_head(self) -> None:
        """A tied int8 head: a layer on the embedding's own int8 rows and scales (again after
        `to_empty`, which gives each module its own storage)."""
        self.lm_head = Int8Linear.sharing(self.embed.weight, self.embed.scale)
        self.head_shares_embedding = True

    @property
    def tied(self) -> bool:
        return self.lm_head is None or self.head_shares_embedding

    def rope_tables(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [n, rotary_dim] in float32, grown on demand (computed as transformers does)."""
        cached = self._rope_cache
        if cached is None or cached[0].shape[0] < n or cached[0].device != torch.device(device):
            size = max(n, self.cfg.max_positions)
            rd = self.cfg.rotary_dim
            inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.int64).float() / rd))
            freqs = torch.arange(size, dtype=torch.float32)[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope_cache = cached = (emb.cos().to(device), emb.sin().to(device))
        return cached

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: activations, and the KV cache unless new_cache is given another
        (the norms are never quantized)."""
        return self.norm.weight.dtype

    def new_cache(self, capacity: int, batch: int = 1, dtype: torch.dtype | None = None,
                  zeroed: bool = True) -> KVCache:
        """An empty cache in `dtype` (None: the compute dtype). Another dtype is read in the
        compute dtype by attention (a float16 cache on a CPU: half the bytes read per step).
        zeroed: see KVCache (decode_static needs it)."""
        p = self.norm.weight
        return KVCache(self.cfg, capacity, device=p.device, dtype=dtype or p.dtype, batch=batch,
                       zeroed=zeroed)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> float32 logits [B, T, V] ([B, 1, V] with last_only).

        A ring cache takes long inputs in several steps (each at most cache.max_step tokens).
        """
        if cache is not None and cache.ring and input_ids.shape[1] > cache.max_step:
            logits = []
            for chunk in input_ids.split(cache.max_step, dim=1):
                logits.append(self.forward(chunk, cache, last_only))
            return logits[-1] if last_only else torch.cat(logits, dim=1)
        b, t = input_ids.shape
        start = cache.length if cache is not None else 0
        x = self.embed(input_ids)
        cos, sin = self.rope_tables(start + t, x.device)
        cos, sin = cos[start: start + t].to(x.dtype), sin[start: start + t].to(x.dtype)
        attn = cache.plan(t) if cache is not None else self._plan_uncached(t, x.device)
        attn.kernel = self.attention
        out = None if self.run_layers is None else self.run_layers(x, cos, sin, cache, attn)
        if out is not None:
            x = out
        else:
            for i, block in enumerate(self.blocks):
                x = block(x, cos, sin, i, cache, attn)
        if cache is not None:
            cache.length = start + t
        if last_only:
            x = x[:, -1:]
        return self.head(self.norm(x)).float()

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states -> logits (in the model's dtype): the tied embedding or lm_head."""
        return F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)

    @torch.inference_mode()
    def decode_static(self, input_ids: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.decode_static_body(input_ids, position, cache)

    def decode_static_body(self, input_ids: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step whose shapes and control flow do not depend on the position.

        input_ids [B, 1], position [1] (long, on the model's device: the cache's length) ->
        float32 logits [B, 1, V]. Writes this token's keys/values and, for a ring, its slot's
        position; the caller advances `cache.length` (and a ring's oldest position) afterwards:
        see KVCache.advance_static. Attends over the whole capacity under a mask, so it does
        more work than `forward` when the cache is far from full, in exchange for one graph.
        """
        x = self.embed(input_ids)
        cos, sin = self.rope_tables(self.cfg.max_positions, x.device)
        cos, sin = cos.index_select(0, position).to(x.dtype), sin.index_select(0, position).to(x.dtype)
        # The capacity is read from the tensors' shapes, never from a Python attribute: compiled
        # with dynamic shapes, one graph serves every capacity (captured.py).
        capacity = cache.k.shape[3]
        if cache.ring:
            slots = position % capacity
            cache.positions.index_copy_(0, slots, position)
            k_pos = cache.positions
            mask = (k_pos >= 0) & (k_pos <= position) & (k_pos > position - cache.window)
        else:
            slots = position
            mask = torch.arange(capacity, device=x.device) <= position
        attn = AttentionInputs(slots, capacity, mask[None, :], False)
        attn.kernel = static_sdpa_attention
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, i, cache, attn)
        return self.head(self.norm(x)).float()

    def _plan_uncached(self, t: int, device) -> AttentionInputs:
        w = self.cfg.sliding_window
        if w is None or w >= t:
            return AttentionInputs(None, t, None, t > 1)
        pos = torch.arange(t, device=device)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - w)
        return AttentionInputs(None, t, mask, False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

