"""Convolutions (plain or transposed) followed by BatchNorm: find the pairs, fold them, or make decomposition see
the BN's scale.

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

Pairs are found by :func:`conv_bn_pairs`, which keeps only pairs that are safe to change: with
``torch.fx`` when the model traces (the conv module called at exactly one call site, whose only
user is the call of a BatchNorm with as many features as the conv has output channels, that BN
called exactly once), else by adjacency in containers whose forward is exactly
``nn.Sequential.forward``; a module shared in the module tree is never paired. A refused
candidate (:func:`refused_pairs`, named in ``compress``'s notes) is treated as a conv without
BatchNorm. Explicit ``pairs=`` given to :func:`fold_batchnorm` / :func:`scale_for_batchnorm` are
trusted as given.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._modules import name_counts, set_submodule as _set_submodule

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _compatible(conv, bn) -> bool:
    if not isinstance(conv, CONV_TYPES) or not isinstance(bn, BN_TYPES):
        return False
    base = next(t for t in CONV_TYPES if isinstance(conv, t))
    return (bn.num_features == conv.out_channels and bn.track_running_stats and bn.running_mean is not None
            and type(conv).forward is base.forward)


def _fx_reason(conv_node, bn_node, calls, attrs) -> str | None:
    """Why ``(conv call, BN call)`` of a traced graph is not a safe pair, or None when it is.

    Safe: the conv module is called at exactly one call site, that call's only user is the BN's
    call, the BN module is called at exactly one call site, and neither module's parameters or
    buffers are read directly (``get_attr``) anywhere in the graph.
    """
    conv_name, bn_name = conv_node.target, bn_node.target
    if calls[conv_name] != 1:
        return f"conv {conv_name} is called at {calls[conv_name]} call sites"
    if calls[bn_name] != 1:
        return f"BatchNorm {bn_name} is called at {calls[bn_name]} call sites"
    if len(conv_node.users) != 1:
        return f"the output of conv {conv_name} is also used outside BatchNorm {bn_name}"
    read = [a for a in attrs if a.startswith((conv_name + ".", bn_name + "."))]
    if read:
        return f"{read[0]} is read directly by the forward"
    return None


def _fx_candidates(model) -> list:
    """``[(conv name, bn name, reason or None)]`` from a ``torch.fx`` trace (raises when fx cannot trace).

    A candidate is a conv call with a compatible BatchNorm call among its users; ``reason``
    (:func:`_fx_reason`) says why it is unsafe. Call sites are counted per module target.
    """
    import torch.fx

    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls, attrs = {}, [n.target for n in graph.nodes if n.op == "get_attr"]
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    out, seen = [], set()
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), CONV_TYPES):
            continue
        for user in node.users:
            pair = (node.target, user.target)
            if user.op == "call_module" and pair not in seen and _compatible(modules[node.target],
                                                                             modules.get(user.target)):
                seen.add(pair)
                out.append((*pair, _fx_reason(node, user, calls, attrs)))
    return out


def _sequential_candidates(model) -> list:
    """``[(conv name, bn name, reason or None)]`` of a conv and a compatible BN adjacent in a container.

    Accepted (reason None) only in containers whose forward is exactly ``nn.Sequential.forward``
    (a subclass overriding it may use the conv output elsewhere). Shared modules are refused by
    :func:`_pair_candidates`. Calls from outside the container (``model.seq[0](x)`` in a parent's
    forward) cannot be seen without a trace.
    """
    out = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        own = type(module).forward is not nn.Sequential.forward
        why = f"{type(module).__name__} {prefix or '(root)'} overrides nn.Sequential.forward" if own else None
        children = list(module.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if _compatible(a, b):
                conv, bn = (f"{prefix}.{name_a}", f"{prefix}.{name_b}") if prefix else (name_a, name_b)
                out.append((conv, bn, why))
    return out


def _pair_candidates(model) -> list:
    """``[(conv name, bn name, reason or None)]``: fx candidates, or Sequential ones when fx cannot trace.

    Either way a conv or BN that appears more than once in the module tree (shared under two
    names) is refused: replacing or rescaling it under one name would change its other uses.
    """
    try:
        candidates = _fx_candidates(model)
    except Exception:  # noqa: BLE001 - any model fx cannot trace: fall back to Sequential adjacency
        candidates = _sequential_candidates(model)
    counts = name_counts(model)
    module = model.get_submodule   # a shared module may be named here by any of its names
    out = []
    for conv, bn, reason in candidates:
        shared = [n for n in (conv, bn) if counts[id(module(n))] > 1]
        if reason is None and shared:
            reason = f"{shared[0]} is shared (it appears {counts[id(module(shared[0]))]} times in the module tree)"
        out.append((conv, bn, reason))
    return out


def refused_pairs(model) -> list:
    """``[(conv name, bn name, reason)]``: conv -> BatchNorm candidates :func:`conv_bn_pairs` leaves out, and why."""
    return [c for c in _pair_candidates(model) if c[2] is not None]


def conv_bn_pairs(model) -> list:
    """``[(conv name, bn name)]`` of every conv -> BatchNorm pair that is safe to fold or rescale.

    With ``torch.fx`` (when the model traces): the conv module is called at exactly one call
    site, whose only user is the call of a BatchNorm with as many features as the conv has output
    channels; that BN module is called exactly once; neither module's tensors are read directly.
    Else (fallback): a conv and such a BN adjacent in a container whose forward is exactly
    ``nn.Sequential.forward``. In both cases a module shared in the module tree is left out.
    :func:`refused_pairs` lists the candidates left out, with the reason.
    """
    return [(c, b) for c, b, reason in _pair_candidates(model) if reason is None]


def _bn_scale(bn) -> torch.Tensor:
    """Per-channel eval-mode scale ``gamma / sqrt(var + eps)`` (float64)."""
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(var)
    return gamma / torch.sqrt(var + bn.eps)


def _scaled_outputs(conv, s) -> torch.Tensor:
    """``conv``'s weight (float64) with each output channel's filter times ``s[channel]``: rows of a conv's
    ``(C_out, C_in/g, *k)`` weight; for a transposed conv's ``(C_in, C_out/g, *k)`` weight, dim 1 within each group."""
    w = conv.weight.double()
    if not isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return w * s.reshape(-1, *([1] * (w.ndim - 1)))
    g = conv.groups
    grouped = w.reshape(g, w.shape[0] // g, *w.shape[1:])
    return (grouped * s.reshape(g, 1, -1, *([1] * (w.ndim - 2)))).reshape(w.shape)


@torch.no_grad()
def fold_batchnorm(model, pairs=None) -> list:
    """Fold each ``(conv, bn)`` of ``pairs`` (default: :func:`conv_bn_pairs`) in place; returns the pairs folded.

    The conv gets a bias when it had none; the BN becomes ``nn.Identity``. Exact in eval mode.
    """
    pairs = conv_bn_pairs(model) if pairs is None else list(pairs)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        s = _bn_scale(bn)
        shift = (bn.bias.detach().double() if bn.affine else torch.zeros_like(s)) - s * bn.running_mean.double()
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(s)
        conv.weight.copy_(_scaled_outputs(conv, s).to(conv.weight.dtype))
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
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        var = bn.running_var.double()
        c = torch.maximum(_bn_scale(bn).abs(), torch.sqrt(2 * bn.eps / (var + bn.eps)))
        conv.weight.copy_(_scaled_outputs(conv, c).to(conv.weight.dtype))
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
    wanted, step = set(conv_names), "fold_bn" if fold_bn else "bn_aware"
    candidates = [c for c in _pair_candidates(model) if c[0] in wanted]
    pairs = [(c, b) for c, b, reason in candidates if reason is None]
    notes = [f"{step}: not used for {b} after {c} (treated as a conv without BatchNorm): {reason}"
             for c, b, reason in candidates if reason is not None]
    if not pairs:
        return notes or [f"{step}: no targeted conv is followed by a BatchNorm"]
    listing = ", ".join(f"{b} into {c}" for c, b in pairs)
    if fold_bn:
        fold_batchnorm(model, pairs)
        return [f"fold_bn: folded {len(pairs)} BatchNorm(s) into the preceding conv (BN replaced by Identity; "
                f"exact in eval mode): {listing}"] + notes
    scale_for_batchnorm(model, pairs)
    return [f"bn_aware: {len(pairs)} conv(s) decomposed in the output scale of the BatchNorm after them "
            f"(|gamma| / sqrt(var + eps) moved from the BN's statistics into the conv; exact in eval mode): "
            f"{listing}"] + notes


__all__ = ["conv_bn_pairs", "refused_pairs", "fold_batchnorm", "scale_for_batchnorm", "prepare_batchnorm"]
