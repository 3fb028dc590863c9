"""Scan order tables: in which order each direction of a multi-direction scan visits a 2D or 3D map.

:func:`scan_orders` turns direction names into a (K, L) table: ``orders[k, t]`` is the flat position (C order,
image order) that direction k visits at step t. A direction names the spatial axes from the slowest- to the
fastest-varying one, optionally prefixed with ``-`` to read the whole sequence backwards. Axes are ``h, w``
for 2D maps and ``d, h, w`` for 3D maps::

    2D   "hw" row-major (image order)   "wh" column-major   "-hw", "-wh" the same, reversed
    3D   "dhw" image order   "-dhw" reversed   "hwd" inter-slice (d fastest)   any permutation of d, h, w,
         with or without "-"

VMamba's SS2D is ``("hw", "wh", "-hw", "-wh")``; SegMamba's ToM is ``("dhw", "-dhw", "hwd")``; Flemme's cross
scans are axis permutations, optionally reversed.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

_AXES = {2: "hw", 3: "dhw"}
# Order tables kept per (shape, directions, device); a training run meets a handful of shapes.
_ORDER_CACHE: OrderedDict[tuple, Tensor] = OrderedDict()
_ORDER_CACHE_SIZE = 64


def _parse_direction(direction: str, ndim: int) -> tuple[tuple[int, ...], bool]:
    """(axis permutation, slowest first; whether the sequence is reversed) of a direction name."""
    axes = _AXES[ndim]
    reverse = direction.startswith("-")
    names = direction[1:] if reverse else direction
    if sorted(names) != sorted(axes):
        raise ValueError(f"direction {direction!r} must be a permutation of {axes!r} (slowest axis first), "
                         f"optionally prefixed with '-' (reversed)")
    return tuple(axes.index(name) for name in names), reverse


def _build_orders(spatial_shape: tuple[int, ...], directions: tuple[str, ...], device: torch.device) -> Tensor:
    grid = torch.arange(math.prod(spatial_shape), device=device).view(spatial_shape)
    rows = []
    for direction in directions:
        permutation, reverse = _parse_direction(direction, len(spatial_shape))
        # flattening the permuted grid in C order makes the last named axis the fastest
        row = grid.permute(permutation).reshape(-1)
        rows.append(row.flip(0) if reverse else row)
    return torch.stack(rows)


def scan_orders(spatial_shape: Sequence[int], directions: Sequence[str],
                device: torch.device | None = None) -> Tensor:
    """The (K, L) int64 order table of ``directions`` (see the module docstring) on a map of ``spatial_shape``.

    ``orders[k, t]`` is the C-order flat position that direction k visits at step t, so ``x[..., orders[k]]`` is
    direction k's sequence. Tables are cached per (shape, directions, device); treat them as read-only.
    """
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) not in _AXES:
        raise ValueError(f"scan orders are defined for 2D and 3D maps, got spatial shape {shape}")
    directions = tuple(directions)
    if not directions:
        raise ValueError("at least one direction is needed")
    device = torch.device("cpu") if device is None else torch.device(device)
    if torch.compiler.is_compiling():  # traced into the graph: a handful of index ops, no Python-side cache
        return _build_orders(shape, directions, device)
    key = (shape, directions, device)
    orders = _ORDER_CACHE.get(key)
    if orders is None:
        # never an inference tensor: a table first built under inference_mode may later index tensors that
        # autograd saves
        with torch.inference_mode(False):
            orders = _build_orders(shape, directions, device)
        if is_fake(orders):  # built under FakeTensorMode (memory planning): no data to keep
            return orders
        _ORDER_CACHE[key] = orders
        if len(_ORDER_CACHE) > _ORDER_CACHE_SIZE:
            _ORDER_CACHE.popitem(last=False)
    else:
        _ORDER_CACHE.move_to_end(key)
    return orders


def inverse_orders(orders: Tensor) -> Tensor:
    """Row-wise inverse permutations: ``inverse[k, orders[k, t]] = t``, so ``seq[..., inverse[k]]`` is back in
    image order. Accepts a (K, L) table or a single (L,) order."""
    positions = torch.arange(orders.shape[-1], device=orders.device).expand_as(orders)
    return torch.empty_like(orders).scatter_(-1, orders, positions)
