"""Token-level pieces of Flemme's Swin and Mamba blocks: the MLP and multi-head self-attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn



class TokenMLP(nn.Sequential):
    """Linear (C -> ratio C), activation, Linear (-> output width), activation.

    The original's ``MultiLayerPerceptionBlock`` (``flemme/block/common.py``, commit 0be9dade) is a chain of
    ``DenseBlock``s, each linear -> activation, the last one included (``final_activation=True``, which its Swin
    and Mamba blocks leave at the default), so the MLP's output is activated too.
    """

    def __init__(self, input_channels: int, output_channels: int, ratio: float, nonlin: type[nn.Module]) -> None:
        hidden = int(input_channels * ratio)
        super().__init__(nn.Linear(input_channels, hidden), nonlin(), nn.Linear(hidden, output_channels), nonlin())


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention on tokens (..., N, C) with the original's head width floor(C / heads)."""

    def __init__(self, channels: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or channels < num_heads:
            raise ValueError(f"need 1 <= num_heads <= channels, got {num_heads} heads on {channels} channels")
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        width = num_heads * self.head_dim
        self.qkv = nn.Linear(channels, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, channels)

    def forward(self, tokens: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_bias`` is added to the attention logits; it broadcasts against (..., heads, N, N)."""
        qkv = self.qkv(tokens).unflatten(-1, (3, self.num_heads, self.head_dim))  # (..., N, 3, h, d)
        q, k, v = qkv.movedim(-4, -2).unbind(-4)  # each (..., h, N, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        return self.proj(out.transpose(-3, -2).flatten(-2))
