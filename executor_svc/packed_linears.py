"""The model's linear layers with weights prepacked once for oneDNN (CPU, bf16), q/k/v and gate/up fused.

torch runs a bf16 ``F.linear`` on CPU through oneDNN, which reorders the weight into its
blocked (AMX / AVX-512 BF16) layout on EVERY call: for the small row counts of decode
steps that reorder costs as much as the product. :func:`pack_linears` does it once at
load time (``torch.ops.mkldnn._reorder_linear_weight``, the op torch's own compiler uses
for frozen CPU linears) and calls ``torch.ops.mkldnn._linear_pointwise`` per step; it also
fuses the attention's q/k/v projections and the MLP's gate/up projections into one
product each, so a layer runs 4 products instead of 7 (docs/executor.md, 'Prepacked
linears').

Where: CPU with oneDNN built in; bf16 wherever oneDNN's bf16 kernels run natively, fp32 only
where :func:`fp32_packing_pays` measures the packed product faster than ``F.linear`` (MKL).
MKL's fp32 GEMM is tuned per CPU: on an Intel Xeon it was as fast or faster for one-row
products, on an AMD EPYC the packed one was 1.3-1.7x faster at 1 and 32 rows
(docs/executor.md, 'Prepacked linears').
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

log = logging.getLogger(__name__)

PACKED_DTYPES = (torch.bfloat16, torch.float32)
FP32_PROBE_ROWS = (1, 32)  # a one-decode step and a busy decode step


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True where :func:`pack_linears` can apply: a CPU model in bf16 or fp32 and torch built with oneDNN
    (for bf16, with oneDNN's bf16 kernels usable).

    oneDNN's bf16 path needs AVX-512 (with or without native bf16 units); on an AVX2-only
    CPU torch itself emulates bf16 and this returns False for bf16.
    """
    if device.type != "cpu" or dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without these private ops
        return False


def _best_ms(fn, repeats: int) -> float:
    fn()  # warm-up (first-call setup, caches)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def fp32_packing_pays(weight: torch.Tensor, rows: tuple[int, ...] = FP32_PROBE_ROWS, repeats: int = 3) -> bool:
    """Whether oneDNN's prepacked product beats ``F.linear`` for the fp32 ``weight`` on this CPU, at every
    row count in ``rows`` (best of ``repeats`` each, with the threads torch runs with now).

    Measured, not assumed from the CPU's vendor: ``F.linear`` in fp32 is MKL's GEMM, whose speed depends
    on how MKL dispatches on the CPU; the runner probes its model's largest product (the LM head) once at load.
    """
    w = weight.detach().contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
    g = torch.Generator().manual_seed(0)
    timings = []
    with torch.inference_mode():
        for n in rows:
            x = torch.randn(n, w.shape[1], generator=g)
            plain_ms = _best_ms(lambda x=x: torch.nn.functional.linear(x, w), repeats)
            packed_ms = _best_ms(lambda x=x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                                 repeats)
            timings.append((n, plain_ms, packed_ms))
    pays = all(p < f for _, f, p in timings)
    log.info("fp32 %s x %s product, F.linear vs prepacked (ms): %s -> %s", w.shape[0], w.shape[1],
             ", ".join(f"{n} rows {f:.2f} / {p:.2f}" for n, f, p in timings), "pack" if pays else "keep F.linear")
    return pays


def packing_pays(model: nn.Module, dtype: torch.dtype) -> bool:
    """The runner's default where :func:`packing_supported`: always in bf16 (oneDNN would reorder the weights on
    every call otherwise); in fp32 where :func:`fp32_packing_pays` for the model's LM head (else its first
    projection)."""
    if dtype != torch.float32:
        return True
    head = getattr(model, "lm_head", None)
    if not _is_linear(head):
        head = next((m for m in model.modules() if _is_linear(m)), None)
    return head is not None and fp32_packing_pays(head.weight)


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held in oneDNN's blocked layout (no dense copy kept)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # NOTE: plain attributes, not parameters: the packed tensor has the opaque mkldnn
        # layout, which state_dict, .to() and parameter iteration cannot handle.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
        self.bias = None if bias is None else bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _FusedOutput:
    """One fused product shared by the modules that each return a column slice of it."""

    __slots__ = ("linear", "x", "y")

    def __init__(self, linear: PackedLinear) -> None:
        self.linear = linear
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None


class FusedSlice(nn.Module):
    """Stands in for one of several projections of the same input, computed as one product.

    The first slice called with a new input computes the whole product; the others
    called with the same tensor object return their columns of it. The last slice
    drops the cached tensors. Any other call order is still correct (it recomputes).
    """

    def __init__(self, shared: _FusedOutput, start: int, end: int, last: bool) -> None:
        super().__init__()
        self.shared, self.start, self.end, self.last = shared, start, end, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shared
        if s.x is not x:
            s.x, s.y = x, s.linear(x)
        y = s.y[..., self.start : self.end]
        if self.last:
            s.x = s.y = None
        return y

    def extra_repr(self) -> str:
        return f"columns=[{self.start}, {self.end})"


class FusedGateUpMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up as one packed product.

    NOTE: oneDNN can also run the SiLU and the product as post-ops of two separate products
    ("swish", then a binary "mul"). That was 11-14% faster for 32 decodes and 1,024-token
    prefills with one thread, but slower in the server on all six bf16 rows of a side-by-side run
    (docs/executor.md, 'Prepacked linears'), so it is not used.
    """

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn) -> None:
        super().__init__()
        self.inter = gate.out_features
        self.gate_up = PackedLinear(torch.cat([gate.weight, up.weight]), _cat_bias(gate, up))
        self.down_proj = PackedLinear(down.weight, down.bias)
        self.act_fn = act_fn
        # act(gate) * up in one pass over [gate | up]; set by kernel_modules.use_kernels
        self.silu_and_mul = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x)
        if self.silu_and_mul is not None:
            return self.down_proj(self.silu_and_mul(gu))
        return self.down_proj(self.act_fn(gu[..., : self.inter]) * gu[..., self.inter :])


def _cat_bias(*linears: nn.Linear) -> torch.Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=m.weight.dtype)
                      for m in linears])


def _is_linear(m) -> bool:
    return type(m) is nn.Linear


def _pack_attention(attn: nn.Module) -> int:
    names = ("q_proj", "k_proj", "v_proj")
    if all(_is_linear(getattr(attn, n, None)) for n in names):
        parts = [getattr(attn, n) for n in names]
        shared = _FusedOutput(PackedLinear(torch.cat([p.weight for p in parts]), _cat_bias(*parts)))
        start = 0
        for i, (n, p) in enumerate(zip(names, parts)):
            setattr(attn, n, FusedSlice(shared, start, start + p.out_features, last=i == len(parts) - 1))
            start += p.out_features
        count = 3
    else:
        count = 0
    if _is_linear(getattr(attn, "o_proj", None)):
        attn.o_proj = PackedLinear(attn.o_proj.weight, attn.o_proj.bias)
        count += 1
    return count


def _pack_mlp(layer: nn.Module) -> int:
    mlp = getattr(layer, "mlp", None)
    names = ("gate_proj", "up_proj", "down_proj")
    if mlp is None or not all(_is_linear(getattr(mlp, n, None)) for n in names) or not hasattr(mlp, "act_fn"):
        return 0
    # NOTE: only the plain gated MLP (Llama, Mistral, Qwen2: down(act(gate(x)) * up(x))); a model
    # whose MLP forward differs keeps its own module.
    if "act_fn(self.gate_proj(x)) * self.up_proj(x)" not in _source(type(mlp).forward):
        return 0
    layer.mlp = FusedGateUpMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)
    return 3


def _source(fn) -> str:
    import inspect

    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def pack_linears(model: nn.Module) -> int:
    """Replace the decoder layers' projections and the LM head of ``model`` in place; returns how many.

    Expects the ``model.model.layers[i].self_attn`` / ``.mlp`` structure of transformers'
    decoder-only models; modules of other shapes are left as they are. The tied LM head
    gets its own packed copy (the input embedding keeps the dense weight).
    """
    count = 0
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is not None:
            count += _pack_attention(attn)
        count += _pack_mlp(layer)
    head = getattr(model, "lm_head", None)
    if _is_linear(head):
        model.lm_head = PackedLinear(head.weight, head.bias)
        count += 1
    log.info("prepacked %d linear layers for oneDNN", count)
    return count
