"""Module-tree plumbing shared by the adapters."""
from __future__ import annotations

import fnmatch
from contextlib import contextmanager


def set_submodule(root, name: str, module):
    """Put ``module`` at the dotted ``name`` inside ``root`` (``""``: not allowed, the root cannot be replaced)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def name_counts(model) -> dict:
    """``{id(module): number of names}`` over ``model``'s module tree (a module shared by two blocks has 2)."""
    counts = {}
    for _, module in model.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    return counts


def owners_of_parameters(model) -> dict:
    """``{id(parameter): [(module, "dotted.param.name"), ...]}`` over every name of every module."""
    owners = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            owners.setdefault(id(param), []).append((module, full))
    return owners


def tied_names(module, owners) -> list:
    """Names of parameters outside ``module`` that are the very tensors ``module`` holds (``owners``:
    :func:`owners_of_parameters` of the model)."""
    inside = {id(m) for m in module.modules()}
    tied = []
    for param in module.parameters():
        tied += [full for owner, full in owners.get(id(param), []) if id(owner) not in inside and full not in tied]
    return tied


def tied_reason(tied) -> str:
    """Why a layer whose weight is tied with the parameters ``tied`` stays dense."""
    return f"weight tied with {', '.join(tied)}; decomposing one side would untie it and grow the model"


def check_patterns(names, where, **patterns):
    """Every fnmatch pattern of each keyword (``include=[...]``, ``exclude=[...]``) must match one of ``names``
    (a pattern that matches nothing is a request that would be silently dropped): ValueError naming it and
    the layers; a bare string instead of a list is a TypeError."""
    for label, given in patterns.items():
        if isinstance(given, str):
            raise TypeError(f"{where}: {label}= takes a list of fnmatch patterns, got the string {given!r}; "
                            f"pass [{given!r}]")
        for pattern in given:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f"{where}: {label} pattern {pattern!r} matches no layer; layers: {names[:12]}"
                                 f"{' ...' if len(names) > 12 else ''}")


@contextmanager
def kv_cache_off(model):
    """Run the body with every ``config.use_cache`` found on ``model``'s modules set to False, then give each
    its value back. A decoder that builds a key/value cache (transformers GPT-2, Llama, ... with
    ``use_cache=True``) hands the same cache object to every block; a block re-run on captured inputs would
    then append its keys a second time and attend over both copies."""
    configs = {id(c): c for m in model.modules() for c in [getattr(m, "config", None)]
               if c is not None and getattr(c, "use_cache", None) is not None}
    saved = {key: c.use_cache for key, c in configs.items()}
    for c in configs.values():
        c.use_cache = False
    try:
        yield model
    finally:
        for key, c in configs.items():
            c.use_cache = saved[key]


def is_kv_cache(value) -> bool:
    """Whether ``value`` is a key/value cache object (a transformers ``Cache``: it has ``update`` and
    ``get_seq_length``)."""
    return callable(getattr(value, "update", None)) and callable(getattr(value, "get_seq_length", None))


class _WeightReadProbe:
    """Stands in for a layer during one forward and records whether code outside it computes with its ``.weight``
    (reading its dtype, device or shape is not: a factorized layer's stand-in answers those, :mod:`layers._standin`)."""

    def __init__(self, layer):
        self.layer, self.weight_read = layer, False

    def __call__(self, *args, **kwargs):
        return self.layer(*args, **kwargs)

    def __getattr__(self, name):
        value = getattr(self.layer, name)
        if name != "weight":
            return value
        from ._standin import WeightStandIn
        return WeightStandIn(tensor=value, on_use=lambda: setattr(self, "weight_read", True))


def weight_readers(model, names, run) -> list:
    """The layers among ``names`` whose ``.weight`` ``model``'s own code computes with (not the layer's own
    forward) during ``run(model)`` (nn.MultiheadAttention-style fused forwards; reading ``wo.weight.dtype``
    as transformers' T5 does is not computing): a factorized replacement has no weight values. Each layer is
    swapped for a probe in its parent's ``__dict__`` for the one run (outputs unchanged), then put back."""
    probes = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        probes[name] = (parent, child, _WeightReadProbe(parent._modules[child]))
    for parent, child, probe in probes.values():
        parent.__dict__[child] = probe    # found before nn.Module.__getattr__ looks in _modules
    try:
        run(model)
    finally:
        for parent, child, _ in probes.values():
            parent.__dict__.pop(child, None)
    return [name for name, (_, _, probe) in probes.items() if probe.weight_read]


@contextmanager
def eval_mode(model):
    """Run the body with ``model`` in eval mode (BatchNorm on its running statistics, no dropout, no
    statistics updated), then give every module its training flag back, by name: a module the body put
    in place of another takes the flag of the module that had its name, a new one its parent's."""
    flags = {name: module.training for name, module in model.named_modules(remove_duplicate=False)}
    model.eval()
    try:
        yield model
    finally:
        restored = {}
        for name, module in model.named_modules(remove_duplicate=False):
            parent = name.rpartition(".")[0]
            restored[name] = flags.get(name, restored.get(parent, flags.get("", module.training)))
            module.training = restored[name]


def carry_marks(original, replacement):
    """``replacement`` with the marks of the ``original`` layer it replaces: its parameters' ``requires_grad``
    (:func:`carry_requires_grad`), ``resized`` (:func:`carry_resized`) and its train / eval mode (submodules
    included). Returns ``replacement``."""
    return carry_resized(original, carry_requires_grad(original, replacement)).train(original.training)


def carry_hooks(original, replacement, consumed=None):
    """Give ``replacement`` the forward and forward-pre hooks of the ``original`` layer it replaces (plain,
    with-kwargs and always-called ones, under their handles' ids), except ``consumed`` (a legacy weight
    reparametrization hook whose effect the replacement's weights already hold). Returns ``replacement``."""
    for store in ("_forward_pre_hooks", "_forward_hooks"):
        for key, hook in getattr(original, store).items():
            if hook is not consumed:
                getattr(replacement, store)[key] = hook
    for store in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(replacement, store).update(getattr(original, store, {}))
    return replacement


def carry_resized(original, replacement):
    """Mark ``replacement`` ``resized`` when ``original`` is: a layer whose units hidden-unit pruning cut
    (:func:`layers.interpolative.slice_producer`), so that a saved model rebuilds it, factorized or not, at its
    own size over the base model's wider layer. Returns ``replacement``."""
    if getattr(original, "resized", False):
        replacement.resized = True
    return replacement


def carry_requires_grad(original, replacement):
    """Give ``replacement``'s parameters the ``requires_grad`` of the ``original`` layer they come from: its
    ``bias`` parameters that of the original bias, every other one that of the original weight (a frozen
    layer stays frozen). Nothing changes when every parameter of ``original`` requires grad. Returns
    ``replacement``."""
    own = dict(original.named_parameters(recurse=False))
    if all(p.requires_grad for p in own.values()):
        return replacement
    weight = own.get("weight")
    weight_grad = weight.requires_grad if weight is not None else all(p.requires_grad for p in own.values())
    bias = own.get("bias")
    for name, parameter in replacement.named_parameters():
        is_bias = bias is not None and name.rpartition(".")[2] == "bias"
        parameter.requires_grad_(bias.requires_grad if is_bias else weight_grad)
    return replacement


@contextmanager
def fused_fast_path_off():
    """torch's fused transformer fast paths (``torch.backends.mha``) off inside the block, restored after: they read
    the ``.weight`` of Linears that a fit in progress replaces by factorized ones."""
    import torch

    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _fast_path_off(module, args):
    """A no-op forward pre-hook: an nn.TransformerEncoderLayer with any hook attached skips its fused fast path."""
    return None


def keep_off_fused_fast_path(model) -> list:
    """Names of the ``nn.TransformerEncoderLayer``s whose ``linear1``/``linear2`` were replaced by factorized modules.

    Their fused eval-mode fast paths read ``linear1.weight`` / ``linear2.weight``, which a factorized layer does not
    have: each such layer gets a no-op forward pre-hook (once; torch skips the fused layer kernel when a hook is
    attached) and an ``nn.TransformerEncoder`` holding them ``use_nested_tensor = False`` (its nested-tensor path
    reads the first layer's weights), so they run module by module."""
    import torch.nn as nn

    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoder) and any(map(_factorized_feed_forward, module.layers)):
            module.use_nested_tensor = False
        if _factorized_feed_forward(module):
            if _fast_path_off not in module._forward_pre_hooks.values():
                module.register_forward_pre_hook(_fast_path_off)
            names.append(name)
    return names


def _factorized_feed_forward(module) -> bool:
    import torch.nn as nn

    return isinstance(module, nn.TransformerEncoderLayer) and not all(
        "weight" in getattr(module, part)._parameters for part in ("linear1", "linear2"))


FUSED_READER_REASON = ("nn.MultiheadAttention's fused forward reads out_proj.weight itself (it never calls "
                       "out_proj), so a factorized out_proj would not run")


def fused_weight_readers(model) -> set:
    """ids of the Linears whose parent reads their weight instead of calling them (nn.MultiheadAttention.out_proj)."""
    import torch

    return {id(m.out_proj) for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)}


def note_fused_fast_path_off(model, report):
    """Encoder layers with factorized feed-forward Linears run module by module (:func:`keep_off_fused_fast_path`)."""
    names = keep_off_fused_fast_path(model)
    if names:
        report.notes.append(f"nn.TransformerEncoderLayer fused fast path off (it reads linear1/linear2.weight; a "
                            f"no-op forward pre-hook makes it run module by module): {', '.join(names)}")
