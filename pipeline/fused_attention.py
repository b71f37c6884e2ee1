"""TimeSformer self-attention with kernels picked for torch.compile (`extract --compile`).

Its own module because it subclasses transformers' attention: importing it imports transformers,
which the stages that never build a backbone (status, fit-head, export) do without.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.timesformer.modeling_timesformer import TimesformerSelfAttention

# Below this many tokens (TimeSformer's temporal attention: one sequence of T frames per patch)
# the fused SDPA kernel's per-sequence overhead dominates; plain matmuls + softmax, which
# torch.compile fuses, measured ~2x faster there on the CPU. Spatial attention (197 tokens) keeps SDPA.
SHORT_SEQUENCE = 64


class FusedSelfAttention(TimesformerSelfAttention):
    """HF's TimeSformer self-attention with kernels picked for torch.compile.

    Long sequences go through F.scaled_dot_product_attention (fused kernels); short ones through
    HF's own maths (matmuls, softmax in fp32), which the compiler fuses. Same maths as HF's eager
    attention, different rounding in bf16. Used by `extract --compile`, whose fingerprint records it.
    """

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        if output_attentions:  # SDPA does not return the attention map
            return super().forward(hidden_states, output_attentions=True)
        batch, tokens, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # (B, h, N, d) each
        if tokens < SHORT_SEQUENCE:
            weights = ((query @ key.transpose(-2, -1)).float() * self.scale).softmax(-1)
            context = self.attn_drop(weights).to(value.dtype) @ value
        else:  # SDPA's CPU kernel ran 1.5x faster on contiguous heads than on these strided views, bit for bit the same
            # result (base size, T=8): the copy costs less than it saves, ~3-9% of a frozen compiled forward (2026-12-05)
            dropout = self.attn_drop.p if self.training else 0.0
            query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
            context = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=self.scale)
        return (context.transpose(1, 2).reshape(batch, tokens, dim),)


def use_fused_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every TimeSformer self-attention of `model` (adapted or not) to FusedSelfAttention, in place."""
    for module in model.modules():
        if type(module) is TimesformerSelfAttention:
            module.__class__ = FusedSelfAttention
    return model
