"""Bit-for-bit snapshots of the inputs of a call, to check that the call left them unchanged."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


def _bits(tensor: torch.Tensor):
    if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
        return ("uninitialized", id(tensor))
    if tensor.device.type == "meta":
        return ("meta", tuple(tensor.shape), tensor.dtype)
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return (tuple(tensor.shape), tensor.dtype, flat.view(torch.uint8).clone() if flat.numel() else flat.clone())


def snapshot(value):
    """A structure of bytes/ids capturing ``value`` (tensor, array, module, or nested dict/list/tuple)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", _bits(value))
    if isinstance(value, np.ndarray):
        return ("array", value.dtype, value.shape, value.tobytes())
    if isinstance(value, nn.Module):
        tensors = {k: _bits(v) for k, v in value.state_dict(keep_vars=True).items()}
        modules = [(n, id(m), type(m)) for n, m in value.named_modules(remove_duplicate=False)]
        params = [(n, id(p)) for n, p in value.named_parameters(remove_duplicate=False)]
        flags = [m.training for m in value.modules()]
        hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in value.modules()]
        return ("module", tensors, modules, params, flags, hooks)
    if isinstance(value, dict):
        return ("dict", {k: snapshot(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [snapshot(v) for v in value])
    return ("other", id(value))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def assert_unchanged(value, saved) -> None:
    assert _same(snapshot(value), saved), "the call modified its input"


def checked(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, asserting afterwards (also when it raised) that no argument was modified."""
    values = list(args) + list(kwargs.values())
    saved = [snapshot(v) for v in values]
    try:
        return fn(*args, **kwargs)
    finally:
        for value, before in zip(values, saved):
            assert_unchanged(value, before)


def raises(error, match, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises ``error`` matching ``match`` and leaves its arguments unchanged."""
    import pytest
    with pytest.raises(error, match=match):
        checked(fn, *args, **kwargs)
