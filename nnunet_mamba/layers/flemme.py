"""Flemme's building blocks (Zhang et al., "Flemme: A Flexible and Modular Learning Platform for Medical Images"),
one implementation for 2D and 3D, chosen by ``conv_op`` (convolution blocks) or the tensor's rank (token blocks).

Convolution blocks work on channels-first maps (batch, C, *spatial):
    ConvBlock        conv (k, same padding, bias) -> norm -> activation [-> multi-head self-attention, CAtten-U]
    ResConvBlock     paper Eq. 3: act(ConvBlock(x) -> conv -> norm  +  shortcut(x)), shortcut a 1x1 conv when the
                     widths differ
Token blocks work on channels-last maps (batch, *spatial, C), as the original's:
    SwinBlock        x + W-MSA(LN(x)) (windows with relative position bias, optionally shifted), then
                     fc(x) + MLP(LN(x)); fc is a linear map when the block changes the width
    MambaBlock       paper Eq. 5: x + out_proj(LN(SSM(cross scan(act(dwconv(W x LN(x)))))) * act(z)), then
                     fc(x) + MLP(x) (the original has no norm before this MLP)
    Res*Block        two blocks, act(b2(b1(x)) + shortcut(x)); a Swin pair is one W-MSA and one SW-MSA block
    MLP              Linear-act-Linear-act, as the original's (its DenseBlocks all activate, the last included)
Patch operations (token networks): PatchEmbedding (strided conv), PatchMerging (neighbours concatenated in the
original's order, linear, LN), PatchExpanding (linear, depth-to-space, LN), PatchRecovery (linear
depth-to-space, 1x1 conv to the classes).
CombinationLayer is H-SeM's fusion (paper Eq. 12).

Parameters (names aside) are the original's, so the networks built from these blocks reproduce the paper's
Table III counts exactly (tests/test_flemme.py): attention head width floor(C / heads) (3 heads on 32 channels
use 30), Mamba state size ceil(C / 6) and dt rank ceil(C / 16), no Linear in a patch expansion whose output width
already equals its input width. Deliberate differences in behaviour, none of which changes a parameter count:
- The second block of a residual pair keeps its SiLU gate, conv activation and MLP activation; the original
  passes ``activation=None`` to it, which silently made its gate, conv and MLP linear.
- Swin windows work on any map size: a map smaller than the window along an axis uses a window of the map's size
  there (and no shift, as Swin does); otherwise the map is padded to a multiple of the window and padded tokens
  are masked out of every real token's attention. The original asserts the map is a multiple of the window.
- CAtten-U's self-attention is added to the block output (a residual) instead of replacing it.

The Mamba cross scan: Flemme's scan modes are named as direction tuples (:func:`flemme_directions`, e.g. 3D
``simplified`` = ("dhw", "whd")), turned into order tables by :func:`nnunet_mamba.ops.cross_scan.scan_orders` and
scanned, every direction with its own parameters, in ONE :func:`nnunet_mamba.ops.cross_scan.cross_selective_scan`
call, which returns the directions' outputs summed in image order.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn.modules.conv import _ConvNd

from ..ops import cross_selective_scan, scan_orders
from .blocks import as_tuple, conv_dim
from .vss import _inverse_softplus_dt

SCAN_MODES = {2: ("single", "cross"), 3: ("single", "simplified", "cross")}
# Flemme's scan modes as ops.cross_scan direction names: the axes from the slowest- to the fastest-varying (h, w in
# 2D; d, h, w in 3D), as the original's permutation tables; a '-' prefix reads the sequence backwards (its flip).
_SCAN_DIRECTIONS = {
    (2, "single"): ("hw",),
    (2, "cross"): ("hw", "wh"),
    (3, "single"): ("dhw",),
    (3, "simplified"): ("dhw", "whd"),
    (3, "cross"): ("dhw", "dwh", "hdw", "hwd", "wdh", "whd"),
}


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


def transposed_conv(conv_op: type[_ConvNd]) -> type[nn.Module]:
    """The transposed convolution of ``conv_op``'s dimensionality."""
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[conv_dim(conv_op)]


def strided_conv(conv_op: type[_ConvNd], input_channels: int, output_channels: int,
                 stride: int | Sequence[int], transposed: bool = False) -> nn.Module:
    """Flemme's down/up-sampling convolution: kernel 2s - s % 2, padding s // 2, stride s (per axis), so that it
    divides (or multiplies) every size that is a multiple of s exactly; a stride of 1 gives a 1x1 convolution."""
    stride = as_tuple(stride, conv_dim(conv_op))
    kernel = tuple(2 * s - s % 2 for s in stride)
    padding = tuple(s // 2 for s in stride)
    op = transposed_conv(conv_op) if transposed else conv_op
    return op(input_channels, output_channels, kernel, stride=stride, padding=padding)


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


class VoxelSelfAttention(MultiHeadAttention):
    """CAtten-U's attention: self-attention over all voxels of a channels-first map, added to the map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        return x + super().forward(tokens).transpose(1, 2).reshape(x.shape)


class ConvBlock(nn.Module):
    """Convolution (same padding, bias), normalisation, activation; optionally then voxel self-attention."""

    def __init__(self, conv_op: type[_ConvNd], input_channels: int, output_channels: int,
                 kernel_size: int | Sequence[int], norm_op: type[nn.Module], norm_op_kwargs: dict | None,
                 nonlin: type[nn.Module] | None, nonlin_kwargs: dict | None, attention_heads: int = 0) -> None:
        super().__init__()
        kernel_size = as_tuple(kernel_size, conv_dim(conv_op))
        self.conv = conv_op(input_channels, output_channels, kernel_size, padding=[k // 2 for k in kernel_size])
        self.norm = norm_op(output_channels, **(norm_op_kwargs or {}))
        self.act = nonlin(**(nonlin_kwargs or {})) if nonlin is not None else nn.Identity()
        self.attention = VoxelSelfAttention(output_channels, attention_heads) if attention_heads else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.act(self.norm(self.conv(x))))


class ResConvBlock(nn.Module):
    """Paper Eq. 3: act(norm(conv(ConvBlock(x))) + shortcut(x)); the shortcut is a 1x1 conv iff widths differ."""

    def __init__(self, conv_op: type[_ConvNd], input_channels: int, output_channels: int,
                 kernel_size: int | Sequence[int], norm_op: type[nn.Module], norm_op_kwargs: dict | None,
                 nonlin: type[nn.Module], nonlin_kwargs: dict | None, attention_heads: int = 0) -> None:
        super().__init__()
        self.conv1 = ConvBlock(conv_op, input_channels, output_channels, kernel_size, norm_op, norm_op_kwargs,
                               nonlin, nonlin_kwargs, attention_heads)
        self.conv2 = ConvBlock(conv_op, output_channels, output_channels, kernel_size, norm_op, norm_op_kwargs,
                               None, None, attention_heads)
        self.shortcut = (conv_op(input_channels, output_channels, 1) if input_channels != output_channels
                         else nn.Identity())
        self.act = nonlin(**(nonlin_kwargs or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


# ---------------------------------------------------------------------------------------------------------------
# Patch operations on channels-last maps


def _space_to_depth(x: torch.Tensor, factor: Sequence[int], first_axis_fastest: bool = False) -> torch.Tensor:
    """(B, *S, C) -> (B, *S / f, prod(f) * C): each output token holds its f-neighbourhood, offsets outermost.

    The neighbours are concatenated in C order of their offsets (the last axis' offset varies fastest), or, with
    ``first_axis_fastest``, with the first axis' offset varying fastest (Flemme's patch merging)."""
    dim = len(factor)
    spatial = x.shape[1:-1]
    split = [n for size, f in zip(spatial, factor) for n in (size // f, f)]
    x = x.reshape(x.shape[0], *split, x.shape[-1])
    coarse = [1 + 2 * a for a in range(dim)]
    offsets = [2 + 2 * a for a in range(dim)]
    if first_axis_fastest:
        offsets.reverse()
    x = x.permute(0, *coarse, *offsets, 2 * dim + 1)
    return x.reshape(x.shape[0], *(size // f for size, f in zip(spatial, factor)), -1)


def _depth_to_space(x: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`_space_to_depth`: (B, *S, prod(f) * C) -> (B, *S * f, C)."""
    dim = len(factor)
    spatial = x.shape[1:-1]
    x = x.reshape(x.shape[0], *spatial, *factor, -1)
    order = [i for a in range(dim) for i in (1 + a, 1 + dim + a)]
    x = x.permute(0, *order, 2 * dim + 1)
    return x.reshape(x.shape[0], *(size * f for size, f in zip(spatial, factor)), x.shape[-1])


class PatchEmbedding(nn.Module):
    """Non-overlapping patches: a convolution with kernel = stride = ``patch``; channels-first in, channels-last out."""

    def __init__(self, conv_op: type[_ConvNd], input_channels: int, output_channels: int,
                 patch: Sequence[int]) -> None:
        super().__init__()
        self.proj = conv_op(input_channels, output_channels, tuple(patch), stride=tuple(patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).movedim(1, -1)


class PatchMerging(nn.Module):
    """Swin's down-sampling: the ``factor`` neighbourhood concatenated, a bias-free linear map, LayerNorm.

    The neighbours are concatenated as the original's ``PatchMergingBlock`` (``flemme/block/swin.py``, commit
    0be9dade) orders them, the first spatial axis' offset fastest: 2D [x(0::2, 0::2), x(1::2, 0::2),
    x(0::2, 1::2), x(1::2, 1::2)], 3D x0..x7 with offsets (0,0,0), (1,0,0), (0,1,0), (1,1,0), (0,0,1), ...
    The original merges by 2 on every axis (a factor 2^k is k such merges); other factors (an anisotropic stride
    from the plans) extend that order: the first axis' offset fastest, the last's slowest.
    """

    def __init__(self, input_channels: int, output_channels: int, factor: Sequence[int]) -> None:
        super().__init__()
        self.factor = tuple(factor)
        self.reduction = nn.Linear(math.prod(self.factor) * input_channels, output_channels, bias=False)
        self.norm = nn.LayerNorm(output_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(_space_to_depth(x, self.factor, first_axis_fastest=True)))


class PatchExpanding(nn.Module):
    """Up-sampling by ``factor``: a bias-free linear map to prod(factor) * out channels (none when that is already
    the input width, as in the original), depth-to-space, then LayerNorm (``norm``)."""

    def __init__(self, input_channels: int, output_channels: int, factor: Sequence[int], norm: bool = True) -> None:
        super().__init__()
        self.factor = tuple(factor)
        expanded = math.prod(self.factor) * output_channels
        self.expand = nn.Linear(input_channels, expanded, bias=False) if expanded != input_channels else nn.Identity()
        self.norm = nn.LayerNorm(output_channels) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_depth_to_space(self.expand(x), self.factor))


class PatchRecovery(nn.Module):
    """Back to the image grid: patch expanding by ``patch`` (width kept, no norm), then a 1x1 convolution;
    channels-last in, channels-first out."""

    def __init__(self, conv_op: type[_ConvNd], input_channels: int, output_channels: int,
                 patch: Sequence[int]) -> None:
        super().__init__()
        self.expand = PatchExpanding(input_channels, input_channels, patch, norm=False)
        self.proj = conv_op(input_channels, output_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.expand(x).movedim(-1, 1))


# ---------------------------------------------------------------------------------------------------------------
# Swin blocks


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


# ---------------------------------------------------------------------------------------------------------------
# Mamba blocks


def flemme_directions(dim: int, mode: str = "single", flip: bool = False) -> tuple[str, ...]:
    """The scan directions of a Flemme scan ``mode``: 2D ``single`` (row-major) or ``cross`` (row- and
    column-major); 3D ``single``, ``simplified`` (dhw, whd) or ``cross`` (all six axis orders). ``flip`` adds every
    direction reversed (the original's flip_scan doubles K)."""
    if mode not in SCAN_MODES.get(dim, ()):
        raise ValueError(f"scan mode for {dim}D maps must be one of {SCAN_MODES.get(dim)}, got {mode!r}")
    directions = _SCAN_DIRECTIONS[dim, mode]
    return directions + tuple("-" + d for d in directions) if flip else directions


class MambaBlock(nn.Module):
    """Flemme's vision Mamba block (paper Eq. 5) on channels-last maps (B, *S, C_in) -> (B, *S, C_out).

    Per direction k (of ``scan_orders(mode, flip)``) its own x_proj / dt_proj / A / D, stored stacked as in the
    original: ``x_proj_weight`` (K, R + 2N, E), ``dt_projs_weight`` (K, E, R), ``dt_projs_bias`` (K, E),
    ``A_logs`` (K E, N), ``Ds`` (K E), with E = ``expand`` C_in, N = ``d_state`` (default ceil(C_in / 6)),
    R = ceil(C_in / 16). The scan and the merge of the directions run in float32.
    """

    def __init__(self, input_channels: int, output_channels: int, dim: int, scan: str = "single",
                 flip_scan: bool = False, d_state: int | None = None, expand: float = 2.0, d_conv: int = 3,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, nonlin: type[nn.Module] = nn.SiLU,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4) -> None:
        super().__init__()
        self.directions = flemme_directions(dim, scan, flip_scan)
        directions = len(self.directions)
        inner = int(expand * input_channels)
        self.d_state = d_state or math.ceil(input_channels / 6)
        self.dt_rank = math.ceil(input_channels / 16)
        conv_op = {2: nn.Conv2d, 3: nn.Conv3d}[dim]

        self.norm1 = nn.LayerNorm(input_channels)
        self.in_proj = nn.Linear(input_channels, 2 * inner, bias=False)
        self.conv = conv_op(inner, inner, d_conv, padding=(d_conv - 1) // 2, groups=inner)
        self.act = nonlin()
        self.x_proj_weight = nn.Parameter(
            torch.empty(directions, self.dt_rank + 2 * self.d_state, inner).uniform_(-inner ** -0.5, inner ** -0.5))
        std = self.dt_rank ** -0.5  # Mamba's dt init: keeps dt's variance at initialisation
        self.dt_projs_weight = nn.Parameter(torch.empty(directions, inner, self.dt_rank).uniform_(-std, std))
        self.dt_projs_bias = nn.Parameter(
            torch.stack([_inverse_softplus_dt(inner, dt_min, dt_max, dt_init_floor) for _ in range(directions)]))
        # S4D-real: A = -(1..N) for every channel of every direction, stored as log
        self.A_logs = nn.Parameter(
            torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(directions * inner, 1))
        self.A_logs._no_weight_decay = True
        self.Ds = nn.Parameter(torch.ones(directions * inner))
        self.Ds._no_weight_decay = True
        self.norm2 = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, input_channels, bias=False)
        self.mlp = TokenMLP(input_channels, output_channels, mlp_ratio, nonlin)
        self.fc = nn.Linear(input_channels, output_channels) if input_channels != output_channels else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def _scan(self, x: torch.Tensor) -> torch.Tensor:
        """(B, E, *S) -> (B, E, L) float32: every direction's scan, back in image order, summed."""
        batch, inner = x.shape[:2]
        orders = scan_orders(tuple(x.shape[2:]), self.directions, x.device)
        directions, length = orders.shape
        x = x.reshape(batch, inner, length)
        x_dbl = torch.einsum("bel,kce->bkcl", x, self.x_proj_weight)  # per token, so image order is fine
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,ker->bkel", dts, self.dt_projs_weight).reshape(batch, directions * inner, length)
        return cross_selective_scan(x, dts, -torch.exp(self.A_logs.float()), Bs, Cs, orders, self.Ds.float(),
                                    self.dt_projs_bias.float().view(-1), delta_softplus=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[1:-1]
        h, z = self.in_proj(self.norm1(x)).chunk(2, dim=-1)
        h = h.movedim(-1, 1)
        if h.dim() == 5:
            # cuDNN's weight gradient of a channels-last depthwise Conv3d runs group by group: on an H100 a Table III
            # Mamba-U step at 64^3 took 529 ms this way, 81 ms with a contiguous (N, C, D, H, W) input
            h = h.contiguous()
        h = self.act(self.conv(h))
        y = self.norm2(self._scan(h).transpose(1, 2).reshape(x.shape[0], *spatial, -1)).to(z.dtype)
        x = x + self.drop_path(self.out_proj(y * self.act(z)))
        return self.fc(x) + self.drop_path(self.mlp(x))


class ResMambaBlock(nn.Module):
    """Two Mamba blocks with a residual around the pair (a linear shortcut when the width changes), activation."""

    def __init__(self, input_channels: int, output_channels: int, dim: int, nonlin: type[nn.Module] = nn.SiLU,
                 **block_kwargs) -> None:
        super().__init__()
        self.block1 = MambaBlock(input_channels, output_channels, dim, nonlin=nonlin, **block_kwargs)
        self.block2 = MambaBlock(output_channels, output_channels, dim, nonlin=nonlin, **block_kwargs)
        self.shortcut = (nn.Linear(input_channels, output_channels) if input_channels != output_channels
                         else nn.Identity())
        self.act = nonlin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.block2(self.block1(x)) + self.shortcut(x))


class CombinationLayer(nn.Module):
    """H-SeM's fusion (paper Eq. 12): every prediction resized to the output size (nearest), plus its own
    learnable position encoding, concatenated, fused by a 1x1 convolution.

    The original learns each encoding at the full output size (classes x patch voxels per input: 44M parameters
    for its BraTS patch). Here each is a ``grid``^dim map (truncated-normal init, std 0.02, as the original's),
    upsampled (bi/trilinear) to the output size: ``inputs`` x classes x ``grid``^dim parameters whatever the patch
    size, and any patch size works.
    """

    def __init__(self, conv_op: type[_ConvNd], inputs: int, channels: int, grid: int = 8) -> None:
        super().__init__()
        self.dim = conv_dim(conv_op)
        self.position_encodings = nn.Parameter(torch.zeros(inputs, channels, *[grid] * self.dim))
        trunc_normal_(self.position_encodings, std=0.02)
        self.fuse = conv_op(inputs * channels, channels, 1)

    def forward(self, predictions: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        if len(predictions) != self.position_encodings.shape[0]:
            raise ValueError(f"CombinationLayer was built for {self.position_encodings.shape[0]} predictions, got "
                             f"{len(predictions)}")
        size = tuple(size)
        mode = "bilinear" if self.dim == 2 else "trilinear"
        encodings = F.interpolate(self.position_encodings, size=size, mode=mode, align_corners=False)
        resized = [p if tuple(p.shape[2:]) == size else F.interpolate(p, size=size, mode="nearest")
                   for p in predictions]
        return self.fuse(torch.cat([p + e.to(p.dtype) for p, e in zip(resized, encodings)], dim=1))
