"""Convolutions followed by BatchNorm: find the pairs, fold them, or make decomposition see the BN's scale.

In eval mode ``BN(y) = s * (y - mean) + beta`` per output channel, ``s = gamma / sqrt(var + eps)``.
What the next layer sees is ``s * y``: a channel with a small ``s`` matters little, one with a
large ``s`` a lot, but a decomposition of the conv alone weighs every output channel equally.

* :func:`fold_batchnorm` replaces conv + BN by one conv (weight ``s * W``, bias
  ``s * (b - mean) + beta``) and the BN by ``nn.Identity``: exact in eval mode (the folded
  model no longer has batch statistics to update in train mode).
* :func:`scale_for_batchnorm` keeps both modules but moves the BN's scale magnitude into the
  conv: conv rows and bias times ``c = |s|`` (at least ``sqrt(2 eps / (var + eps))``, so the
  new variance stays >= eps), BN ``running_mean * c`` and ``running_var`` set so that
  ``c^2 (var + eps) = var' + eps``. The composition is unchanged in eval mode, and in train
  mode up to ``eps`` (batch statistics scale with ``c``, so eps weighs ``1/c^2`` as much);
  ``gamma``/``beta`` are untouched.
  A decomposition of the rescaled conv then measures its error (ranks, energies, budgets,
  relative errors) in the units the next layer receives.

Pairs are found by :func:`conv_bn_pairs`: with ``torch.fx`` when the model traces (a conv whose
only user is a BatchNorm with as many features as the conv has output channels), else by
adjacency in ``nn.Sequential`` containers.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._modules import set_submodule as _set_submodule

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _compatible(conv, bn) -> bool:
    return (isinstance(conv, CONV_TYPES) and isinstance(bn, BN_TYPES) and bn.num_features == conv.out_channels
            and bn.track_running_stats and bn.running_mean is not None and type(conv).forward is CONV_TYPES[
                len(conv.kernel_size) - 1].forward)


def _fx_pairs(model):
    import torch.fx

    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), CONV_TYPES):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and _compatible(modules[node.target],
                                                                             modules.get(users[0].target)):
            pairs.append((node.target, users[0].target))
    return pairs


def _sequential_pairs(model):
    pairs = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if _compatible(a, b):
                pairs.append((f"{prefix}.{name_a}" if prefix else name_a, f"{prefix}.{name_b}" if prefix else name_b))
    return pairs


def conv_bn_pairs(model) -> list:
    """``[(conv name, bn name)]`` of every conv whose output goes only into a BatchNorm (see module docstring).

    A module used at several places (shared) is left out: folding it would change its other uses.
    """
    try:
        pairs = _fx_pairs(model)
    except Exception:  # noqa: BLE001 - any model fx cannot trace: fall back to Sequential adjacency
        pairs = _sequential_pairs(model)
    counts = {}
    for _, module in model.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    modules = dict(model.named_modules())
    return [(c, b) for c, b in pairs if counts[id(modules[c])] == 1 and counts[id(modules[b])] == 1]


def _bn_scale(bn) -> torch.Tensor:
    """Per-channel eval-mode scale ``gamma / sqrt(var + eps)`` (float64)."""
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(var)
    return gamma / torch.sqrt(var + bn.eps)


def _view_channels(t, conv):
    return t.reshape(-1, *([1] * (conv.weight.ndim - 1)))


@torch.no_grad()
def fold_batchnorm(model, pairs=None) -> list:
    """Fold each ``(conv, bn)`` of ``pairs`` (default: :func:`conv_bn_pairs`) in place; returns the pairs folded.

    The conv gets a bias when it had none; the BN becomes ``nn.Identity``. Exact in eval mode.
    """
    pairs = conv_bn_pairs(model) if pairs is None else list(pairs)
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        s = _bn_scale(bn)
        shift = (bn.bias.detach().double() if bn.affine else torch.zeros_like(s)) - s * bn.running_mean.double()
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(s)
        conv.weight.copy_((conv.weight.double() * _view_channels(s, conv)).to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                                 device=conv.weight.device))
        conv.bias.copy_((s * bias + shift).to(conv.bias.dtype))
        _set_submodule(model, bn_name, nn.Identity())
    return pairs


@torch.no_grad()
def scale_for_batchnorm(model, pairs=None) -> list:
    """Move each BN's scale magnitude into its conv (see module docstring), in place; returns the pairs."""
    pairs = conv_bn_pairs(model) if pairs is None else list(pairs)
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        var = bn.running_var.double()
        c = torch.maximum(_bn_scale(bn).abs(), torch.sqrt(2 * bn.eps / (var + bn.eps)))
        conv.weight.copy_((conv.weight.double() * _view_channels(c, conv)).to(conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.copy_((conv.bias.double() * c).to(conv.bias.dtype))
        bn.running_mean.copy_((bn.running_mean.double() * c).to(bn.running_mean.dtype))
        bn.running_var.copy_((c * c * (var + bn.eps) - bn.eps).to(bn.running_var.dtype))
    return pairs


def prepare_batchnorm(model, conv_names, *, fold_bn=False, bn_aware=False) -> list:
    """``compress``'s BN step on its (copied) model: report notes for the pairs whose conv is in ``conv_names``.

    ``fold_bn`` folds those pairs (:func:`fold_batchnorm`); else ``bn_aware`` rescales them
    (:func:`scale_for_batchnorm`); both exact in eval mode.
    """
    if not (fold_bn or bn_aware):
        return []
    wanted = set(conv_names)
    pairs = [(c, b) for c, b in conv_bn_pairs(model) if c in wanted]
    if not pairs:
        return [f"{'fold_bn' if fold_bn else 'bn_aware'}: no targeted conv is followed by a BatchNorm"]
    listing = ", ".join(f"{b} into {c}" for c, b in pairs)
    if fold_bn:
        fold_batchnorm(model, pairs)
        return [f"fold_bn: folded {len(pairs)} BatchNorm(s) into the preceding conv (BN replaced by Identity; "
                f"exact in eval mode): {listing}"]
    scale_for_batchnorm(model, pairs)
    return [f"bn_aware: {len(pairs)} conv(s) decomposed in the output scale of the BatchNorm after them "
            f"(|gamma| / sqrt(var + eps) moved from the BN's statistics into the conv; exact in eval mode): {listing}"]


__all__ = ["conv_bn_pairs", "fold_batchnorm", "scale_for_batchnorm", "prepare_batchnorm"]
