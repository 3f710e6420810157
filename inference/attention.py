"""Which attention kernel the decoder runs: torch SDPA, the project's own CPU kernel for decode
steps, flash-attn 2 on CUDA.

torch SDPA (models.decoder.sdpa_attention) runs wherever nothing better does. On a CPU in
float32, "cpu" (chosen by auto when a C compiler builds it, inference/cpu_kernels.py) runs steps
of up to 16 positions (decode steps, draft verifications) with csrc/decode_attention.c, which
reads the cached keys and values once at close to the core's memory bandwidth (torch's SDPA
reaches about half of it for one query); prefill chunks stay on SDPA. flash-attn 2 is used
on CUDA when it is installed and the dtype is float16/bfloat16: its `flash_attn_with_kvcache`
appends this step's keys/values to the cache and attends in one kernel, with
`window_size=(W - 1, 0)` for sliding-window models (StarCoder2), reading only the window.
RoPE is applied by the decoder before the kernel is called (its fused rotary needs
rotary_dim % 16 == 0, which StableLM-3B's 20 rotary dims do not meet, and one path for all
families keeps them exact against each other).

A sliding-window ring (models.decoder.KVCache, slot = position % capacity) is handed to the
kernel as a paged cache: with capacity a multiple of 256, physical page j holds logical pages
j, j + n, j + 2n, ... so a block table of `arange(pages) % n` addresses the ring as if it were a
linear cache, and the window keeps the kernel away from pages that have been reused.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch

from stablelm_lsp.models.decoder import attend, sdpa_attention

from .errors import AttentionUnavailable

log = logging.getLogger(__name__)

KERNELS = ("auto", "sdpa", "flash", "cpu")
FLASH_MIN_VERSION = (2, 6)  # paged KV caches (block_table) and sliding windows in flash_attn_with_kvcache
CPU_MAX_POSITIONS = 16  # longer steps (prefill chunks) go to SDPA
FLASH_PAGE = 256        # flash-attn's paged caches need pages of a multiple of 256 positions
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionChoice:
    name: str           # "sdpa" | "flash" | "cpu"
    reason: str         # why, for the log: what ruled flash out, or that it was chosen/requested
    kernel: object = field(default=None, repr=False, compare=False)   # cpu: the compiled kernel


def flash_problems(device: torch.device, dtype: torch.dtype, head_dim: int, *,
                   installed: bool | str, capability: tuple[int, int] | None) -> list[str]:
    """What stops flash-attn from running this model here (empty: nothing). installed: True,
    False (absent), or why the installed package cannot be used (flash_package_problem)."""
    problems = []
    if device.type != "cuda":
        problems.append(f"flash-attn needs a CUDA device (this is {device.type})")
    elif capability is not None and capability < (8, 0):
        problems.append(f"flash-attn needs an Ampere or newer GPU (compute capability "
                        f"{capability[0]}.{capability[1]})")
    if dtype not in _FLASH_DTYPES:
        problems.append(f"flash-attn needs float16 or bfloat16 (the model runs in "
                        f"{str(dtype).removeprefix('torch.')})")
    if head_dim > 256 or head_dim % 8:
        problems.append(f"flash-attn needs a head size that is a multiple of 8 up to 256 ({head_dim})")
    if installed is False:
        problems.append("the flash_attn package is not installed (pip install 'stablelm-lsp[gpu]')")
    elif isinstance(installed, str):
        problems.append(installed)
    return problems


def choose(requested: str, problems: list[str]) -> AttentionChoice:
    """requested: auto | sdpa | flash. Asking for flash where it cannot run is an error."""
    if requested not in KERNELS:
        raise AttentionUnavailable(f"unknown attention kernel {requested!r} (choose from {', '.join(KERNELS)})")
    if requested == "sdpa":
        return AttentionChoice("sdpa", "requested")
    if not problems:
        return AttentionChoice("flash", "requested" if requested == "flash" else "CUDA, half precision, flash_attn installed")
    if requested == "flash":
        raise AttentionUnavailable("cannot use flash attention: " + "; ".join(problems))
    return AttentionChoice("sdpa", problems[0])


def flash_installed() -> bool:
    return flash_package_problem() is None


def flash_package_problem() -> bool | str | None:
    """None when flash_attn is installed and usable; False when it is absent; else why not
    (too old for paged caches, or its CUDA extension does not load: built without kernels or
    against another torch / CUDA)."""
    try:
        import flash_attn
        from flash_attn import flash_attn_func, flash_attn_with_kvcache  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "flash_attn":
            return False
        return f"flash_attn does not load ({exc})"
    except (ImportError, OSError) as exc:
        return f"flash_attn does not load ({exc})"
    version = getattr(flash_attn, "__version__", "0")
    if _version_tuple(version) < FLASH_MIN_VERSION:
        return (f"flash_attn {version} is too old (paged KV caches need "
                f"{'.'.join(map(str, FLASH_MIN_VERSION))} or newer)")
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def flash_self_check(device: torch.device, dtype: torch.dtype, config) -> str | None:
    """Runs flash-attn once on a small paged cache of this model's head shapes and compares it
    with SDPA: None when it agrees, else what went wrong (an install whose kernels were built for
    another GPU fails here, at load, instead of in every request)."""
    heads, kv_heads, dim = config.num_heads, config.num_kv_heads, config.head_dim
    try:
        kernel = FlashAttention(config)
        g = torch.Generator(device=device).manual_seed(0)
        held, step = 40, 3
        k_cache = torch.randn(1, kv_heads, FLASH_PAGE, dim, device=device, dtype=dtype, generator=g)
        v_cache = torch.randn_like(k_cache).normal_(generator=g)
        q = torch.randn(1, heads, step, dim, device=device, dtype=dtype, generator=g)
        window = (config.sliding_window - 1, 0) if config.sliding_window else (-1, -1)
        out = kernel._with_kvcache(
            q.transpose(1, 2), k_cache.transpose(1, 2).contiguous(),
            v_cache.transpose(1, 2).contiguous(), k=k_cache[:, :, held:held + step].transpose(1, 2),
            v=v_cache[:, :, held:held + step].transpose(1, 2),
            cache_seqlens=torch.full((1,), held, dtype=torch.int32, device=device),
            causal=True, window_size=window).transpose(1, 2)
        q_pos = torch.arange(held, held + step, device=device)[:, None]
        k_pos = torch.arange(held + step, device=device)[None, :]
        mask = k_pos <= q_pos
        if config.sliding_window:
            mask &= k_pos > q_pos - config.sliding_window
        want = attend(q, k_cache[:, :, :held + step], v_cache[:, :, :held + step], mask, False)
        error = (out.float() - want.float()).abs().max().item()
    except Exception as exc:    # a kernel image for another GPU, a broken install
        return f"flash-attn failed its self-check ({type(exc).__name__}: {exc})"
    if not error < 2e-2:
        return f"flash-attn failed its self-check (differs from SDPA by {error:.3g})"
    return None


def cpu_problems(device: torch.device, dtype: torch.dtype):
    """(kernel, []) when the own CPU attention kernel can run here, else (None, [why not])."""
    from .cpu_kernels import kernel_for

    return kernel_for("decode_attention", "the own attention kernel", device, dtype)


def select_attention(requested: str, device: torch.device, dtype: torch.dtype, config) -> AttentionChoice:
    if requested in ("auto", "cpu") and (device.type == "cpu" or requested == "cpu"):
        kernel, problems = cpu_problems(device, dtype)
        if kernel is not None:
            return AttentionChoice("cpu", "requested" if requested == "cpu" else
                                   "CPU, float32, own kernel built", kernel)
        if requested == "cpu":
            raise AttentionUnavailable("cannot use the own CPU attention kernel: " + "; ".join(problems))
        return AttentionChoice("sdpa", problems[0])
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    package = flash_package_problem()
    problems = flash_problems(device, dtype, config.head_dim,
                              installed=True if package is None else package, capability=capability)
    choice = choose(requested, problems)
    if choice.name == "flash":
        failure = flash_self_check(device, dtype, config)
        if failure is not None:
            if requested == "flash":
                raise AttentionUnavailable(f"cannot use flash attention: {failure}")
            log.info("attention: %s; using SDPA", failure)
            return AttentionChoice("sdpa", failure)
    return choice


class CpuDecodeAttention:
    """A Decoder.attention kernel (see models.decoder.sdpa_attention for the contract): the own
    kernel for steps of up to CPU_MAX_POSITIONS positions of one sequence where `own[t]` says so
    (inference/tuning.py measures it; by default every such step), SDPA otherwise."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.own = [False] + [True] * CPU_MAX_POSITIONS     # by step length t

    def __call__(self, q, key, value, layer: int, cache, attn):
        if cache is not None:
            key, value = cache.write(layer, key, value, attn)
        batch, heads, t, dim = q.shape
        kv_heads, s = key.shape[1], key.shape[2]
        if (batch != 1 or t > CPU_MAX_POSITIONS or not self.own[t] or attn.is_causal
                or q.dtype != torch.float32 or key.dtype not in self.kernel.DTYPES
                or key.stride(3) != 1 or key.stride(2) != dim
                or value.stride() != key.stride()):
            return attend(q, key, value, attn.mask, attn.is_causal)
        return self.run_own(q, key, value, attn.mask)

    def run_own(self, q, key, value, mask):
        """The own kernel: q [1, H, T, D], key/value [1, K, S, D] views of a cache (rows
        contiguous), mask [T, S] bool or None -> [1, H, T, D]."""
        heads, t, dim = q.shape[1:]
        q = q.contiguous()
        out = torch.empty_like(q)
        mask = None if mask is None else mask.contiguous().view(torch.uint8)
        self.kernel(q, key, value, mask, out, heads, key.shape[1], t, key.shape[2], dim,
                    key.stride(1), dim ** -0.5)
        return out

    def set_table(self, table) -> None:
        """table: ((longest step, "cpu" | "sdpa"), ...), the last one's length None."""
        for t in range(1, CPU_MAX_POSITIONS + 1):
            name = next(n for bound, n in table if bound is None or t <= bound)
            self.own[t] = name == "cpu"


def ring_capacity(window: int, step: int, kernel: str) -> int:
    """Ring size taking `step` tokens per forward: window + step - 1, rounded up to whole
    flash-attn pages when that kernel reads it as a paged cache."""
    capacity = window + step - 1
    if kernel == "flash":
        capacity = -(-capacity // FLASH_PAGE) * FLASH_PAGE
    return capacity


class FlashAttention:
    """A Decoder.attention kernel (see models.decoder.sdpa_attention for the contract)."""

    def __init__(self, config):
        from flash_attn import flash_attn_func, flash_attn_with_kvcache

        self._func, self._with_kvcache = flash_attn_func, flash_attn_with_kvcache
        self.window = (config.sliding_window - 1, 0) if config.sliding_window else (-1, -1)
        # logical pages a sequence can span: block tables are built for this many
        self.max_pages = -(-config.max_positions // FLASH_PAGE) + 1
        self._block_tables: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, q, key, value, layer: int, cache, attn):
        # flash-attn's layout is [B, T, heads, D]; ours [B, heads, T, D]
        q, key, value = q.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if cache is None:
            out = self._func(q, key, value, causal=True, window_size=self.window)
            return out.transpose(1, 2)
        k_cache, v_cache, block_table = self._cache_views(cache, layer)
        # positions held before this step, per sequence (an int would be sized by the cache's
        # first dimension, which is the page count for a paged cache)
        held = torch.full((q.shape[0],), cache.length, dtype=torch.int32, device=q.device)
        out = self._with_kvcache(q, k_cache, v_cache, k=key, v=value, cache_seqlens=held,
                                 block_table=block_table, causal=True, window_size=self.window)
        return out.transpose(1, 2)

    def _cache_views(self, cache, layer: int):
        """The layer's cache as flash-attn reads it; no copies (only the strides change)."""
        k, v = cache.k[layer], cache.v[layer]             # [B, K, capacity, D]
        if not cache.ring:
            return k.transpose(1, 2), v.transpose(1, 2), None   # [B, capacity, K, D]
        batch, heads, capacity, dim = k.shape
        if batch != 1 or capacity % FLASH_PAGE:
            raise ValueError(f"flash attention reads rings of one sequence with a capacity that is a "
                             f"multiple of {FLASH_PAGE} (got batch {batch}, capacity {capacity})")
        pages = capacity // FLASH_PAGE

        def paged(t):  # [1, K, capacity, D] -> [pages, FLASH_PAGE, K, D]
            return t[0].view(heads, pages, FLASH_PAGE, dim).permute(1, 2, 0, 3)

        return paged(k), paged(v), self._block_table(pages, k.device)

    def _block_table(self, pages: int, device: torch.device) -> torch.Tensor:
        """[1, max_pages] int32: logical page j lives in physical page j % pages."""
        table = self._block_tables.get((pages, device))
        if table is None:
            table = (torch.arange(self.max_pages, device=device) % pages).to(torch.int32)[None]
            self._block_tables[(pages, device)] = table
        return table


def install(model, config, choice: AttentionChoice) -> None:
    """Make the decoder run the chosen kernel."""
    if choice.name == "flash":
        model.attention = FlashAttention(config)
    elif choice.name == "cpu":
        model.attention = CpuDecodeAttention(choice.kernel)
    else:
        model.attention = sdpa_attention
    # Only news on a GPU (on a CPU the choice is logged at debug level).
    on_gpu = next(model.parameters()).device.type == "cuda"
    (log.info if on_gpu else log.debug)("attention kernel: %s (%s)", choice.name, choice.reason)
