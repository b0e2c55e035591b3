"""Module-tree plumbing shared by the adapters."""
from __future__ import annotations


def set_submodule(root, name: str, module):
    """Put ``module`` at the dotted ``name`` inside ``root`` (``""``: not allowed, the root cannot be replaced)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
