"""Paged attention plugged into ``transformers`` models through ``AttentionInterface``.

The runner calls the model on one packed sequence ``[1, T]`` holding every
scheduled token of the step, with ``use_cache=False`` and a ``paged=PagedStep``
keyword argument. For every layer, :func:`paged_attention_forward`:

1. writes the step's new K/V into the cache at the plan's slots;
2. attends, in the split form that is fast on CPU (docs/executor.md, 'Attention backends'):
   * all decodes with the C++ paged decode kernel (``executor_svc.cpu_kernels``) when the
     runner has it: each decode's query against its KV blocks where they lie; else
   * all decodes (one query token each) in ONE batched attention (two matmuls,
     fp32 softmax) over gathered, padded KV with a key-padding mask and GQA
     packed into the query;
   * decodes whose block tables start with the same blocks (a prefix shared
     through the scheduler's prefix cache) in CASCADE form: each group's queries
     attend to the shared prefix gathered ONCE, each decode to its own suffix in
     the batched attention above, and the two partial results are merged exactly
     through their softmax maxima and sums (log-sum-exp), as FlashInfer's cascade
     attention does (docs/executor.md, 'Shared prefixes: cascade attention');
   * each prefill chunk in its own SDPA with a LOWER-RIGHT causal mask (the
     chunk's queries sit at the end of its keys); SDPA's ``is_causal`` is
     top-left aligned, so it is only used when the chunk has no context.

With ``flash_attn`` importable on CUDA, :func:`flash_prefill_decode` replaces
step 2 by one ``flash_attn_varlen_func`` call over the gathered keys (its
``causal=True`` is bottom-right aligned).

Called without ``paged`` the function falls back to stock SDPA with the mask it
is given, which is ``None`` here (transformers builds no mask for an unknown
implementation): right for one unpadded sequence only. For references with
``generate``, switch the model to "sdpa" (``model.set_attn_implementation``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from executor_svc.cpu_kernels import CpuKernels
from executor_svc.kv_cache import KVCache

ATTN_IMPL_NAME = "slai_paged"

try:  # pragma: no cover - flash-attn is a GPU-only extra, never installed in CI
    from flash_attn import flash_attn_varlen_func

    HAS_FLASH_ATTN = True
except ImportError:  # pragma: no cover
    flash_attn_varlen_func = None
    HAS_FLASH_ATTN = False


def select_backend(device: torch.device, dtype: torch.dtype, prefer: str | None = None) -> str:
    """"flash-attn" when importable, on CUDA, in fp16/bf16; else "sdpa" (or the forced ``prefer``)."""
    flash_ok = HAS_FLASH_ATTN and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if prefer not in (None, "sdpa", "flash-attn"):
        raise ValueError(f"unknown attention backend {prefer!r}; use 'sdpa' or 'flash-attn'")
    if prefer == "sdpa":
        return "sdpa"
    if prefer == "flash-attn" and not flash_ok:
        raise RuntimeError("attention backend 'flash-attn' needs the flash_attn package, CUDA and fp16/bf16")
    return "flash-attn" if flash_ok else "sdpa"


@dataclass(slots=True)
class PrefillChunk:
    """One request's prefill chunk inside the packed sequence."""

    q_start: int  # first row of this chunk in the packed [T] sequence
    q_len: int  # tokens computed now
    context_len: int  # KV tokens before this chunk (0 for a fresh prompt)
    read_slots: torch.Tensor | None  # [context_len + q_len] slots; None when context_len == 0
    # lower-right causal mask [q_len, context_len + q_len], built by the first layer and
    # reused by the others (0.2-0.5 ms per layer for 256 queries)
    mask: torch.Tensor | None = None


@dataclass(slots=True)
class PrefixGroup:
    """Decodes in packed rows ``[start, end)`` whose first ``len(slots)`` KV tokens are the same blocks."""

    start: int
    end: int
    slots: torch.Tensor  # [prefix_len] slots of the shared prefix (whole blocks)
    # the prefix's first slot when its blocks are consecutive: read in place (a view), no gather
    first_slot: int | None = None


@dataclass(slots=True)
class CascadeBatch:
    """All of a step's :class:`PrefixGroup` s as one padded batch (built once per step, by the first layer).

    NOTE: one set of ops for every group instead of one per group: with 2 OpenMP threads on a
    busy 2-core machine each small op can wait milliseconds for the other thread, so the op
    count per layer matters as much as the bytes (docs/executor.md, 'Shared prefixes').
    """

    num_groups: int
    members: int  # the largest group; smaller groups are padded with copies of row 0
    prefix_len: int  # the longest prefix; shorter ones are padded with slot 0 and masked
    rows: int  # the groups lie within decode rows [0, rows)
    q_rows: torch.Tensor  # [G * members] decode row of each (group, member) place
    back: torch.Tensor  # [rows] place of each decode row in the flat (group, member) order
    slots: torch.Tensor  # [G * prefix_len] prefix slots, group after group
    key_bias: torch.Tensor | None  # [G, 1, prefix_len] fp32 0 / -inf; None when no prefix is padded
    outside: torch.Tensor | None  # [1, rows, 1, 1] True for rows of no group; None when there are none
    first_slot: int | None  # one group whose prefix is consecutive blocks: read in place

    @staticmethod
    def build(groups: list[PrefixGroup], device: torch.device) -> CascadeBatch:
        members = max(g.end - g.start for g in groups)
        prefix_len = max(g.slots.shape[0] for g in groups)
        rows = max(g.end for g in groups)
        q_rows = [0] * (len(groups) * members)
        back = [0] * rows
        outside = [True] * rows
        slots, bias = [], []
        for i, g in enumerate(groups):
            for j, r in enumerate(range(g.start, g.end)):
                q_rows[i * members + j] = r
                back[r] = i * members + j
                outside[r] = False
            pad = prefix_len - g.slots.shape[0]
            slots.append(torch.nn.functional.pad(g.slots, (0, pad)))
            bias.append([0.0] * g.slots.shape[0] + [float("-inf")] * pad)
        padded = any(g.slots.shape[0] != prefix_len for g in groups)
        return CascadeBatch(
            num_groups=len(groups), members=members, prefix_len=prefix_len, rows=rows,
            q_rows=torch.tensor(q_rows, device=device), back=torch.tensor(back, device=device),
            slots=torch.cat(slots),
            key_bias=torch.tensor(bias, device=device)[:, None, :] if padded else None,
            outside=torch.tensor(outside, device=device)[None, :, None, None] if any(outside) else None,
            first_slot=groups[0].first_slot if len(groups) == 1 else None,
        )


@dataclass(slots=True)
class PagedStep:
    """Per-step attention inputs, shared by all layers (built once by the runner)."""

    kv: KVCache
    backend: str  # "sdpa" | "flash-attn"
    write_slots: torch.Tensor  # [T] slot of every packed token
    prefills: list[PrefillChunk] = field(default_factory=list)
    num_decodes: int = 0  # decodes occupy packed rows [0, num_decodes)
    # [B, L_max] gather slots (padded with slot 0): a grouped decode's keys after its group's prefix,
    # every other decode's whole context
    decode_slots: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L_max] True = attend; None if all lengths equal
    decode_groups: list[PrefixGroup] = field(default_factory=list)  # cascade groups, disjoint row ranges
    decode_bias: torch.Tensor | None = None  # [B, 1, L_max] fp32 0 / -inf form of decode_mask (first layer)
    cascade: CascadeBatch | None = None  # decode_groups as one batch (first layer)
    # the C++ kernels (executor_svc.cpu_kernels), when the runner has them: the KV write, and
    # instead of everything above, decode attention over int32 block tables [B, max_blocks] and
    # key counts [B], reading the blocks in place
    kernels: CpuKernels | None = None
    decode_tables: torch.Tensor | None = None
    decode_lengths: torch.Tensor | None = None
    # NOTE: gathers go into these reused flat buffers (a runner workspace). Fresh
    # 10+ MB outputs per layer cost page faults: a 32 x 512
    # decode gather took 10 ms fresh vs 2.5 ms into a reused buffer on CPU.
    k_buf: torch.Tensor | None = None
    v_buf: torch.Tensor | None = None
    # flash-attn only: packed key slots and cumulative lengths over all sequences
    flash_k_slots: torch.Tensor | None = None
    flash_cu_q: torch.Tensor | None = None
    flash_cu_k: torch.Tensor | None = None
    flash_max_q: int = 0
    flash_max_k: int = 0


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D] after RoPE
    key: torch.Tensor,  # [1, KV, T, D]
    value: torch.Tensor,  # [1, KV, T, D]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry point; returns ``([1, T, H, D], None)``."""
    step: PagedStep | None = kwargs.get("paged")
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    layer = module.layer_idx
    q, k_new, v_new = query[0], key[0], value[0]  # [H, T, D], [KV, T, D], [KV, T, D]
    if step.kernels is not None:
        step.kernels.kv_write(step.kv.k[layer], step.kv.v[layer], step.write_slots, k_new, v_new)
    else:
        step.kv.write(layer, step.write_slots, k_new, v_new)
    if step.backend == "flash-attn":
        out = flash_prefill_decode(step, layer, q.transpose(0, 1).contiguous(), scaling)
    else:
        out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)  # [T, H, D]
        k_cache, v_cache = step.kv.k[layer], step.kv.v[layer]  # [KV, slots, D]
        if step.num_decodes and step.decode_tables is not None:
            nd = step.num_decodes
            step.kernels.paged_decode(q[:, :nd].transpose(0, 1), k_cache, v_cache, step.decode_tables,
                                      step.decode_lengths, step.kv.block_size, scaling, out[:nd])
        elif step.num_decodes:
            out[: step.num_decodes] = _decode_attention(step, q, k_cache, v_cache, scaling)
        for chunk in step.prefills:
            out[chunk.q_start : chunk.q_start + chunk.q_len] = _prefill_sdpa(
                step, chunk, q, k_new, v_new, k_cache, v_cache, scaling
            )
    return out.unsqueeze(0), None


def _decode_attention(step: PagedStep, q: torch.Tensor, k_cache, v_cache, scaling) -> torch.Tensor:
    num_heads, head_dim = q.shape[0], q.shape[2]
    num_kv = k_cache.shape[0]
    batch, max_len = step.decode_slots.shape
    n_rep = num_heads // num_kv
    # GQA packed into the query: query head h = kv * n_rep + r uses KV head kv, so
    # [H, B, D] -> [KV, B, n_rep, D] attends against [KV, B, L, D] without repeat_kv.
    qd = q[:, :batch].reshape(num_kv, n_rep, batch, head_dim).transpose(1, 2)
    flat = step.decode_slots.reshape(-1)
    # [KV, B*L, D] -> [KV, B, L, D]: a view of the gather, every (L, D) plane contiguous
    kd = _gather(k_cache, flat, step.k_buf).view(num_kv, batch, max_len, head_dim)
    vd = _gather(v_cache, flat, step.v_buf).view(num_kv, batch, max_len, head_dim)
    # NOTE: two batched matmuls with an fp32 softmax, not SDPA: torch's CPU flash
    # kernel gains nothing from bf16 here (4.5 ms per layer for 64 decodes x 336 keys,
    # same as fp32), while bf16 matmuls take 2.0 ms; in fp32 both are equal. K and V
    # keep the gather's [KV, B] batch order: a transposed batch made matmul copy
    # them first (docs/executor.md, 'Where a step's time goes').
    scores = torch.matmul(qd, kd.transpose(-1, -2)).float().mul_(scaling)  # [KV, B, n_rep, L]
    if step.decode_mask is not None:
        if step.decode_bias is None:  # built once per step, shared by every layer
            bias = torch.zeros(batch, max_len, dtype=torch.float32, device=q.device)
            step.decode_bias = bias.masked_fill_(~step.decode_mask.view(batch, max_len), float("-inf"))[:, None, :]
        scores.add_(step.decode_bias)  # [B, 1, L] broadcast over KV and n_rep
    if step.decode_groups:
        out = _cascade(step, q, scores, vd, k_cache, v_cache, scaling)
    else:
        probs = torch.softmax(scores, dim=-1).to(vd.dtype)
        out = torch.matmul(probs, vd)  # [KV, B, n_rep, D]
    return out.permute(1, 0, 2, 3).reshape(batch, num_heads, head_dim)


def _cascade(step: PagedStep, q: torch.Tensor, scores: torch.Tensor, vd: torch.Tensor,
             k_cache, v_cache, scaling) -> torch.Tensor:
    """Softmax attention over [group prefix ++ own suffix] from two partial passes; ``[KV, B, n_rep, D]``.

    ``scores`` are every decode's masked fp32 scores over its own keys (suffix), ``vd``
    the matching values. Each pass keeps its row maximum ``m`` and its sum ``l`` of
    ``exp(s - m)`` with an UNNORMALISED output ``sum exp(s - m) v``; rescaling both to
    the common maximum and dividing once by the merged sum gives exactly
    ``softmax([s_prefix, s_suffix]) @ [v_prefix; v_suffix]`` (up to rounding).
    Every decode has at least one suffix key (its own new token), so ``m`` is finite.
    """
    num_kv, n_rep, head_dim = scores.shape[0], scores.shape[2], vd.shape[-1]
    m = scores.amax(dim=-1, keepdim=True)  # [KV, B, n_rep, 1]
    e = scores.sub_(m).exp_()
    denom = e.sum(dim=-1, keepdim=True)
    out = torch.matmul(e.to(vd.dtype), vd).float()  # [KV, B, n_rep, D], unnormalised
    if step.cascade is None:
        step.cascade = CascadeBatch.build(step.decode_groups, q.device)
    cb = step.cascade
    groups, n, plen, rows = cb.num_groups, cb.members, cb.prefix_len, cb.rows
    # every group's queries against ONE copy of its prefix, all groups in one batch:
    # [H, G*n, D] -> [KV, n_rep, G, n, D] -> [KV, G, n_rep * n, D]
    qg = q.index_select(1, cb.q_rows).view(num_kv, n_rep, groups, n, head_dim).transpose(1, 2)
    qg = qg.reshape(num_kv, groups, n_rep * n, head_dim)
    if cb.first_slot is not None:  # consecutive blocks: a strided view of the cache, nothing copied
        kp = k_cache.narrow(1, cb.first_slot, plen).unsqueeze(1)  # [KV, 1, P, D]
        vp = v_cache.narrow(1, cb.first_slot, plen).unsqueeze(1)
    else:
        kp = k_cache.index_select(1, cb.slots).view(num_kv, groups, plen, head_dim)
        vp = v_cache.index_select(1, cb.slots).view(num_kv, groups, plen, head_dim)
    sp = torch.matmul(qg, kp.transpose(-1, -2)).float().mul_(scaling)  # [KV, G, n_rep * n, P]
    if cb.key_bias is not None:
        sp.add_(cb.key_bias)  # [G, 1, P]: padded prefix keys out
    mp = sp.amax(dim=-1, keepdim=True)
    ep = sp.sub_(mp).exp_()
    part = torch.cat([torch.matmul(ep.to(vp.dtype), vp).float(), mp, ep.sum(dim=-1, keepdim=True)], dim=-1)
    # back to the suffix's row order: [KV, G, n_rep, n, D+2] -> [KV, G*n, n_rep, D+2] -> [KV, rows, n_rep, D+2]
    part = part.view(num_kv, groups, n_rep, n, head_dim + 2).transpose(2, 3).reshape(num_kv, groups * n, n_rep, -1)
    part = part.index_select(1, cb.back)
    op, mp, lp = part[..., :head_dim], part[..., head_dim : head_dim + 1], part[..., head_dim + 1 :]
    if cb.outside is not None:  # rows of no group: prefix weight exp(-inf) = 0
        mp = mp.masked_fill(cb.outside, float("-inf"))
    # one merge: rescale both parts to the common maximum, add, divide once
    ms = m[:, :rows]
    mx = torch.maximum(ms, mp)
    a_s, a_p = (ms - mx).exp_(), (mp - mx).exp_()
    out[:, :rows].mul_(a_s).add_(op * a_p)
    denom[:, :rows].mul_(a_s).add_(lp * a_p)
    return out.div_(denom).to(vd.dtype)


def _gather(cache: torch.Tensor, slots: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    """``cache[:, slots]`` (``[KV, len(slots), D]``), into ``buf`` when there is one."""
    if buf is None:
        return cache.index_select(1, slots)
    # a contiguous [KV, n, D] view of the flat buffer's front
    out = buf[: cache.shape[0] * slots.shape[0] * cache.shape[2]].view(cache.shape[0], slots.shape[0], cache.shape[2])
    return torch.index_select(cache, 1, slots, out=out)


def _prefill_sdpa(step: PagedStep, chunk: PrefillChunk, q, k_new, v_new, k_cache, v_cache, scaling) -> torch.Tensor:
    s, n = chunk.q_start, chunk.q_len
    qc = q[:, s : s + n].unsqueeze(0)  # [1, H, n, D]
    if chunk.context_len == 0:
        # fresh prompt: keys are exactly this chunk's new keys, Lq == Lk, so the
        # top-left causal mask of is_causal is also the right one
        kc = k_new[:, s : s + n].unsqueeze(0)
        vc = v_new[:, s : s + n].unsqueeze(0)
        o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scaling, enable_gqa=True)
    else:
        total = chunk.context_len + n
        kc = _gather(k_cache, chunk.read_slots, step.k_buf).unsqueeze(0)  # [1, KV, total, D]
        vc = _gather(v_cache, chunk.read_slots, step.v_buf).unsqueeze(0)
        # lower-right causal: query i (absolute position context+i) sees keys <= context+i
        if chunk.mask is None:
            chunk.mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(diagonal=chunk.context_len)
        o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=chunk.mask, scale=scaling, enable_gqa=True)
    return o[0].transpose(0, 1)  # [n, H, D]


def flash_prefill_decode(step: PagedStep, layer: int, q: torch.Tensor, scaling) -> torch.Tensor:  # pragma: no cover
    """All sequences in one ``flash_attn_varlen_func`` call (CUDA + flash-attn only).

    NOTE: flash-attn 2's ``block_table`` argument needs pages of a multiple of
    256 tokens; the scheduler's blocks are 16 tokens, so keys are gathered per
    sequence into a packed buffer instead. ``causal=True`` is bottom-right
    aligned in flash-attn >= 2.1, which is what chunked prefill needs.
    """
    # [KV, total_k, D] -> [total_k, KV, D], the packed layout flash-attn takes
    k = step.kv.k[layer].index_select(1, step.flash_k_slots).transpose(0, 1).contiguous()
    v = step.kv.v[layer].index_select(1, step.flash_k_slots).transpose(0, 1).contiguous()
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=step.flash_cu_q, cu_seqlens_k=step.flash_cu_k,
        max_seqlen_q=step.flash_max_q, max_seqlen_k=step.flash_max_k, softmax_scale=scaling, causal=True,
    )


def register() -> str:
    """Register the paged function with transformers (idempotent); returns its name."""
    AttentionInterface.register(ATTN_IMPL_NAME, paged_attention_forward)
    return ATTN_IMPL_NAME
