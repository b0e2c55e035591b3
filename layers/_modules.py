"""Module-tree plumbing shared by the adapters."""
from __future__ import annotations

from contextlib import contextmanager


def set_submodule(root, name: str, module):
    """Put ``module`` at the dotted ``name`` inside ``root`` (``""``: not allowed, the root cannot be replaced)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


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
