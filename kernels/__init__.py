"""KL divergence kernels for consolidation: on logits (kl.py) and fused with the output projection
(fused_linear_kl.py)."""

from kernels.fused_linear_kl import fused_linear_kl, fused_linear_kl_reference, fused_linear_kl_triton
from kernels.kl import kl_div, kl_div_reference, kl_div_triton

__all__ = ["kl_div", "kl_div_reference", "kl_div_triton",
           "fused_linear_kl", "fused_linear_kl_reference", "fused_linear_kl_triton"]
