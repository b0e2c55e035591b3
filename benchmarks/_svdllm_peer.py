"""Run SVD-LLM's own profiling and truncation (a checkout of github.com/AIoT-MLSys-Lab/SVD-LLM) beside ours.

Nothing of that project is copied here: ``load_svdllm(path)`` imports its ``SVDLLM.py`` from the
checkout the user points to. Modules it imports at the top but that the whitening path never
uses (``datasets``, the Mistral / OPT components written for older ``transformers``, the
evaluator) are replaced by empty placeholders when they cannot be imported, so the Llama path
runs with the installed ``transformers``.

Its functions, as called here (SmolLM2 is a Llama architecture):

* ``profle_svdllm("llama", model, loader, "cpu")``: float32 Gram of every ``nn.Linear`` input
  (``lm_head`` included), then one float64 Cholesky per decoder Linear;
* ``whitening("llama", model, profiling, ratio, "cpu")``: per decoder Linear, ``W L`` in float32,
  its full SVD, the rank ``int(m n ratio / (m + n))`` (``ratio`` = kept fraction of the
  parameters, as our ``ratio=``), the factors written into its own low-rank modules.
"""
from __future__ import annotations

import copy
import importlib
import sys
import types
from pathlib import Path

_PLACEHOLDERS = {"datasets": ("load_dataset",), "component.svd_mistral": ("SVD_MistralAttention", "SVD_MistralMLP"),
                 "component.svd_opt": ("SVDOPTDecoderLayer",), "evaluater": ()}


def load_svdllm(path):
    """The ``SVDLLM`` module of the checkout at ``path`` (raises FileNotFoundError naming what is missing)."""
    root = Path(path).expanduser().resolve()
    if not (root / "SVDLLM.py").is_file():
        raise FileNotFoundError(f"--svdllm {path}: no SVDLLM.py there; pass a checkout of "
                                f"github.com/AIoT-MLSys-Lab/SVD-LLM")
    sys.path.insert(0, str(root))
    for name, attributes in _PLACEHOLDERS.items():
        try:
            importlib.import_module(name)
        except Exception:  # written for an older transformers / a package we do not install
            placeholder = types.ModuleType(name)
            for attribute in attributes:
                setattr(placeholder, attribute, None)
            sys.modules[name] = placeholder
    return importlib.import_module("SVDLLM")


def svdllm_steps(svdllm, model, cal_tokens, ratio, batch_size=8) -> dict:
    """``{label: callable}``: SVD-LLM's profiling, then its truncation, on a copy of ``model``
    (the same calibration tokens and batches as ours). The truncation step returns ``(model, None)``."""
    state = {"model": copy.deepcopy(model)}
    loader = [{"input_ids": cal_tokens[i:i + batch_size]} for i in range(0, len(cal_tokens), batch_size)]

    def profile():
        state["profile"] = svdllm.profle_svdllm("llama", state["model"], loader, "cpu")
        return None, None

    def truncate():
        svdllm.whitening("llama", state["model"], state["profile"], ratio, "cpu")
        return state["model"], None

    return {"SVD-LLM profiling (its code)": profile, "SVD-LLM truncation (its code)": truncate}


def dense_equivalent(truncated, dense):
    """A copy of ``dense`` whose decoder Linears hold SVD-LLM's product ``U V`` (read from ``truncated``'s
    ``*_u_proj`` / ``*_v_proj`` modules): its own attention modules do not run under ``transformers`` 5,
    the product is the same function, so this copy is what the perplexity is measured on."""
    model = copy.deepcopy(dense)
    for block, source in zip(model.model.layers, truncated.model.layers):
        for part in ("self_attn", "mlp"):
            for name, linear in getattr(block, part).named_children():
                factors = getattr(source, part)
                if hasattr(factors, f"{name[:-5]}_u_proj"):
                    u = getattr(factors, f"{name[:-5]}_u_proj").weight
                    v = getattr(factors, f"{name[:-5]}_v_proj").weight
                    linear.weight.data = (u.double() @ v.double()).to(linear.weight.dtype)
    return model
