"""Swap transformers' RMSNorm modules and the packed MLP's activation for the C++ kernels
(``executor_svc.cpu_kernels``; docs/executor.md, "C++ kernels").

transformers' RMSNorm is six torch ops (upcast, square, mean, rsqrt, multiply, downcast, times
the weight), each a pass over the activations; SiLU(gate) * up is two more. The kernels do each
in one pass and round where the modules round, so outputs match up to the order of one fp32 sum.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from executor_svc.cpu_kernels import CpuKernels
from executor_svc.packed_linears import FusedGateUpMLP

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
    if not type(module).__name__.endswith("RMSNorm") or not hasattr(module, "variance_epsilon"):
        return False
    try:
        return _RMS_NORM_BODY in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


def use_kernels(model: nn.Module, kernels: CpuKernels) -> int:
    """Replace ``model``'s plain RMSNorms and give its packed SiLU MLPs the fused activation; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_plain_rms_norm(child):
                setattr(parent, name, KernelRMSNorm(child, kernels))
                count += 1
            elif isinstance(child, FusedGateUpMLP) and type(child.act_fn).__name__ in _SILU:
                child.silu_and_mul = kernels.silu_and_mul
                count += 1
    log.info("%d modules use the C++ kernels", count)
    return count
