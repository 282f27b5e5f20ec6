"""Swap transformers' RMSNorm modules, the packed MLP's activation and the decoder layers' step
for the C++ kernels (``executor_svc.cpu_kernels``; docs/executor.md, "C++ kernels").

transformers' RMSNorm is six torch ops (upcast, square, mean, rsqrt, multiply, downcast, times
the weight), each a pass over the activations; SiLU(gate) * up is two more, the rotary embedding
about ten per layer. The kernels do each in one pass and round where the modules round, so
outputs match up to the order of one fp32 sum.

A decoder layer of the plain Llama shape (Llama, Mistral, Qwen2, SmolLM2: RMSNorm, fused q/k/v,
rotary embedding, attention, o_proj, residual, RMSNorm, gated MLP, residual) also gets a step
forward (:func:`_fast_forward`) for the runner's paged calls: one kernel per norm (the second
fused with the residual add), the rotary embedding in place on the fused q/k/v product, and the
paged attention called directly, without transformers' per-layer view, transpose and dispatch
work. Any other call (``generate``, say) runs the layer's own forward.
"""

from __future__ import annotations

import inspect
import logging
import sys
import types
from dataclasses import dataclass

import torch
from torch import nn

from executor_svc import attention
from executor_svc.cpu_kernels import CpuKernels
from executor_svc.packed_linears import FusedGateUpMLP, FusedSlice

log = logging.getLogger(__name__)

# the body of the RMSNorm this kernel computes (Llama, Mistral, Qwen2, SmolLM2); a norm with
# another formula (Gemma's 1 + weight, say) keeps its own module
_RMS_NORM_BODY = "self.weight * hidden_states.to(input_dtype)"
_SILU = ("SiLU", "SiLUActivation")  # torch's and transformers' (ACT2FN["silu"])


class KernelRMSNorm(nn.Module):
    """transformers' RMSNorm in one C++ pass."""

    def __init__(self, norm: nn.Module, kernels: CpuKernels) -> None:
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon
        self.kernels = kernels

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _is_plain_rms_norm(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and _RMS_NORM_BODY in _source(type(module).forward))


def _source(obj) -> str:
    try:
        return inspect.getsource(inspect.unwrap(obj))
    except (OSError, TypeError):
        return ""


@dataclass(slots=True)
class _FastLayer:
    """What :func:`_fast_forward` needs of one decoder layer, resolved once."""

    kernels: CpuKernels
    norm1: KernelRMSNorm
    norm2: KernelRMSNorm
    qkv: nn.Module  # the fused q/k/v product
    q_end: int
    k_end: int
    heads: int
    kv_heads: int
    head_dim: int


# the lines of transformers' Llama-shaped layer, attention and rotary embedding the fast forward
# reproduces; a model whose code differs keeps its own layers
_LAYER_LINES = ("residual = hidden_states\n", "hidden_states = self.input_layernorm(hidden_states)",
                "hidden_states = residual + hidden_states", "self.post_attention_layernorm(hidden_states)",
                "hidden_states = self.mlp(hidden_states)")
_ATTENTION_LINES = ("apply_rotary_pos_emb(query_states, key_states, cos, sin)", "self.o_proj(attn_output)")


def _rope_matches(modeling, kernels: CpuKernels, dtype: torch.dtype) -> bool:
    """Whether the modeling module's ``apply_rotary_pos_emb`` computes what ``kernels.rope`` does (tried
    on random inputs: its source may sit behind transformers' hub-kernel wrappers)."""
    rope = getattr(modeling, "apply_rotary_pos_emb", None)
    if rope is None:
        return False
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8, generator=g).to(dtype), torch.randn(1, 1, 5, 8, generator=g).to(dtype)
    cos, sin = torch.randn(1, 5, 8, generator=g).to(dtype), torch.randn(1, 5, 8, generator=g).to(dtype)
    try:
        want_q, want_k = rope(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - another signature: not the function this kernel replaces
        return False
    got_q, got_k = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous()
    kernels.rope(got_q, cos[0], sin[0])
    kernels.rope(got_k, cos[0], sin[0])
    tol = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5  # one bf16 unit: the same formula, rounded alike
    return all(torch.allclose(got.transpose(0, 1).float(), want[0].float(), rtol=tol, atol=tol)
               for got, want in ((got_q, want_q), (got_k, want_k)))


def _fast_layer(layer: nn.Module, kernels: CpuKernels, rope_ok: dict) -> _FastLayer | None:
    """The layer's :class:`_FastLayer` where it has the plain Llama shape, else None; ``rope_ok`` caches
    :func:`_rope_matches` per modeling module (every layer of a model shares it)."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    n1, n2 = getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)
    if not (isinstance(n1, KernelRMSNorm) and isinstance(n2, KernelRMSNorm) and isinstance(mlp, FusedGateUpMLP)
            and mlp.silu_and_mul is not None and attn is not None):
        return None
    q, k, v = (getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj"))
    if not (all(isinstance(p, FusedSlice) for p in (q, k, v)) and q.shared is k.shared is v.shared
            and q.start == 0 and q.end == k.start and k.end == v.start and v.end == q.shared.linear.out_features):
        return None
    layer_src = _source(type(layer).forward)
    if (hasattr(attn, "q_norm") or hasattr(attn, "k_norm") or layer_src.count("hidden_states = residual + hidden_states") != 2
            or not all(line in layer_src for line in _LAYER_LINES)
            or not all(line in _source(type(attn).forward) for line in _ATTENTION_LINES)):
        return None
    modeling = sys.modules.get(type(attn).__module__)
    if modeling not in rope_ok:
        rope_ok[modeling] = _rope_matches(modeling, kernels, n1.weight.dtype)
    if not rope_ok[modeling]:
        return None
    d = attn.head_dim
    return _FastLayer(kernels=kernels, norm1=n1, norm2=n2, qkv=q.shared.linear, q_end=q.end, k_end=k.end,
                      heads=q.end // d, kv_heads=(k.end - k.start) // d, head_dim=d)


def _fast_forward(layer: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The layer's step for the runner's paged calls (``paged=`` and rotary ``position_embeddings``)."""
    step = kwargs.get("paged")
    pe = kwargs.get("position_embeddings")
    if step is None or pe is None or args or hidden_states.shape[0] != 1 or not hidden_states.is_contiguous():
        return type(layer).forward(layer, hidden_states, *args, **kwargs)
    f: _FastLayer = layer._slai_fast
    x = hidden_states[0]  # [T, hidden]: the residual stream, updated in place
    tokens, heads, kv, d = x.shape[0], f.heads, f.kv_heads, f.head_dim
    qkv = f.qkv(f.kernels.rms_norm(x, f.norm1.weight, f.norm1.variance_epsilon))
    q = qkv[:, : f.q_end].view(tokens, heads, d)
    k = qkv[:, f.q_end : f.k_end].view(tokens, kv, d)
    v = qkv[:, f.k_end :].view(tokens, kv, d)
    cos, sin = pe[0][0], pe[1][0]
    f.kernels.rope(q, cos, sin)
    f.kernels.rope(k, cos, sin)
    attn = layer.self_attn
    out, _ = attention.paged_attention_forward(attn, q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None], None, scaling=attn.scaling, paged=step)
    o = attn.o_proj(out.view(tokens, heads * d))
    h = f.kernels.add_rms_norm(x, o, f.norm2.weight, f.norm2.variance_epsilon)
    x.add_(layer.mlp(h))
    return hidden_states


def use_kernels(model: nn.Module, kernels: CpuKernels) -> int:
    """Replace ``model``'s plain RMSNorms, give its packed SiLU MLPs the fused activation and its
    Llama-shaped decoder layers the fast step forward; returns how many modules changed."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_plain_rms_norm(child):
                setattr(parent, name, KernelRMSNorm(child, kernels))
                count += 1
            elif isinstance(child, FusedGateUpMLP) and type(child.act_fn).__name__ in _SILU:
                child.silu_and_mul = kernels.silu_and_mul
                count += 1
    rope_ok: dict = {}
    for layer in getattr(getattr(model, "model", None), "layers", None) or []:
        fast = _fast_layer(layer, kernels, rope_ok)
        if fast is not None:
            layer._slai_fast = fast
            layer.forward = types.MethodType(_fast_forward, layer)
            count += 1
    log.info("%d modules use the C++ kernels", count)
    return count
