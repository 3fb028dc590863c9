"""Flemme's Swin blocks on channels-last maps: x + W-MSA(LN(x)) (windows with relative position bias,
optionally shifted), then fc(x) + MLP(LN(x)); a residual pair is one W-MSA and one SW-MSA block.

Windows work on any map size: a map smaller than the window along an axis uses a window of the map's size there
(and no shift, as Swin does); otherwise the map is padded to a multiple of the window and padded tokens are
masked out of every real token's attention (the original asserts the map is a multiple of the window)."""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from .patches import _depth_to_space, _space_to_depth
from .tokens import MultiHeadAttention, TokenMLP



def _table_cache(build):
    """Memoise a function of hashable arguments that builds an index table or mask (a tensor or None), except what
    it builds under FakeTensorMode (``nnunet_mamba.planning``'s memory estimate): such tensors hold no data, and a
    later real call must not get one."""
    cache = {}

    @functools.wraps(build)
    def cached(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in cache:
            table = build(*args, **kwargs)
            if table is not None and is_fake(table):
                return table
            cache[key] = table
        return cache[key]
    return cached


def _window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """(B, *P, C) with P a multiple of ``window`` -> (B, windows, prod(window), C), windows in C order."""
    return _space_to_depth(x, window).flatten(1, -2).unflatten(-1, (math.prod(window), x.shape[-1]))


def _window_reverse(windows: torch.Tensor, window: Sequence[int], padded: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`_window_partition`."""
    grid = [p // w for p, w in zip(padded, window)]
    return _depth_to_space(windows.flatten(-2).unflatten(1, grid), window)


@_table_cache
def _relative_position_index(window: tuple[int, ...], table_window: tuple[int, ...],
                             device: torch.device) -> torch.Tensor:
    """(N, N) rows of a relative-position table built for ``table_window`` (Swin's layout), for a window of
    ``window`` <= ``table_window`` tokens per axis."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
    relative = coords[:, :, None] - coords[:, None, :]
    index = torch.zeros_like(relative[0])
    for axis, table in enumerate(table_window):
        index = index * (2 * table - 1) + relative[axis] + table - 1
    return index.to(device)


@_table_cache
def _window_mask(size: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...],
                 device: torch.device) -> torch.Tensor | None:
    """Additive attention mask (windows, N, N) for a map of ``size`` padded to a multiple of ``window`` and rolled
    by -``shift``; None when neither happens.

    Tokens attend only to tokens with the same label: Swin's shift regions (in the rolled frame, per axis: the
    rest, the last window less the shift, the last shift) and whether the token is padding.
    """
    padded = [-(-s // w) * w for s, w in zip(size, window)]
    if not any(shift) and list(size) == padded:
        return None
    labels = torch.zeros(padded, dtype=torch.long)
    for axis, (n, p, w, s) in enumerate(zip(size, padded, window, shift)):
        region = torch.zeros(p, dtype=torch.long)
        if s:
            region[p - w:p - s] = 1
            region[p - s:] = 2
        # the rolled map holds the original position (q + s) % p at position q
        is_padding = ((torch.arange(p) + s) % p >= n).long()
        view = [1] * len(size)
        view[axis] = p
        labels = labels * 6 + (2 * region + is_padding).view(view)
    windows = _window_partition(labels[None, ..., None], window)[0, ..., 0]  # (windows, N)
    same = windows[:, :, None] == windows[:, None, :]
    return torch.zeros(same.shape).masked_fill_(~same, float("-inf")).to(device)


class WindowAttention(MultiHeadAttention):
    """W-MSA with a learnable relative position bias ((2w - 1)^dim entries per head, truncated-normal init)."""

    def __init__(self, channels: int, window_size: Sequence[int], num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__(channels, num_heads, qkv_bias)
        self.window_size = tuple(window_size)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(math.prod(2 * w - 1 for w in self.window_size), num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, windows: torch.Tensor, window: Sequence[int],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``windows`` (B, nW, N, C) of shape ``window`` (<= window_size per axis); ``mask`` (nW, N, N)."""
        index = _relative_position_index(tuple(window), self.window_size, windows.device)
        bias = self.relative_position_bias_table[index].permute(2, 0, 1).to(windows.dtype)  # (h, N, N)
        if mask is not None:
            bias = bias + mask[:, None].to(windows.dtype)  # (nW, h, N, N)
        return super().forward(windows, bias)


class SwinBlock(nn.Module):
    """Swin transformer block on channels-last maps (B, *S, C_in) -> (B, *S, C_out); ``shifted``: SW-MSA."""

    def __init__(self, input_channels: int, output_channels: int, window_size: Sequence[int], num_heads: int,
                 shifted: bool = False, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 nonlin: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.window_size = tuple(window_size)
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(input_channels)
        self.attn = WindowAttention(input_channels, self.window_size, num_heads)
        self.norm2 = nn.LayerNorm(input_channels)
        self.mlp = TokenMLP(input_channels, output_channels, mlp_ratio, nonlin)
        self.fc = nn.Linear(input_channels, output_channels) if input_channels != output_channels else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[1:-1])
        if len(size) != len(self.window_size):
            raise ValueError(f"SwinBlock with a {len(self.window_size)}D window got a map of shape {tuple(x.shape)}")
        window = tuple(min(w, n) for w, n in zip(self.window_size, size))
        # Swin does not shift along an axis the window covers entirely
        shift = tuple(w // 2 if self.shifted and n > w else 0 for w, n in zip(window, size))
        axes = tuple(range(1, len(size) + 1))
        h = self.norm1(x)
        pad = [-n % w for n, w in zip(size, window)]
        if any(pad):  # at the end of each spatial axis; F.pad lists the last (channel) axis first
            h = F.pad(h, [0, 0, *(p for amount in reversed(pad) for p in (0, amount))])
        padded = h.shape[1:-1]
        if any(shift):
            h = torch.roll(h, [-s for s in shift], axes)
        attended = self.attn(_window_partition(h, window), window, _window_mask(size, window, shift, x.device))
        h = _window_reverse(attended, window, padded)
        if any(shift):
            h = torch.roll(h, shift, axes)
        h = h[(slice(None), *(slice(0, n) for n in size))]
        x = x + self.drop_path(h)
        return self.fc(x) + self.drop_path(self.mlp(self.norm2(x)))


class ResSwinBlock(nn.Module):
    """Two Swin blocks, one W-MSA and one SW-MSA (``shifted_first`` picks which comes first), with a residual
    around the pair (a linear shortcut when the width changes) and an activation."""

    def __init__(self, input_channels: int, output_channels: int, window_size: Sequence[int], num_heads: int,
                 shifted_first: bool = False, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 nonlin: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        common = {"window_size": window_size, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
                  "drop_path": drop_path, "nonlin": nonlin}
        self.block1 = SwinBlock(input_channels, output_channels, shifted=shifted_first, **common)
        self.block2 = SwinBlock(output_channels, output_channels, shifted=not shifted_first, **common)
        self.shortcut = (nn.Linear(input_channels, output_channels) if input_channels != output_channels
                         else nn.Identity())
        self.act = nonlin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.block2(self.block1(x)) + self.shortcut(x))
