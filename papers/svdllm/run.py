"""Wang, Zheng, Wan, Zhang 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for Large
Language Model Compression": whitened (data-aware) vs plain truncated SVD, measured by the
OUTPUT error of real layers on real inputs.

Run: ``python -m papers.svdllm.run``.

Claim (REFERENCES.md [V code]): with ``L`` the Cholesky factor of ``X^T X`` (calibration
inputs ``X``), truncating the SVD of ``W L`` at rank ``k`` gives the ``W'`` of rank ``k`` with
the smallest ``||(W - W') X^T||_F``, and that error is ``sqrt(sum_{i>k} s_i(W L)^2)``; so it is
never worse than plain SVD on that objective. We check both on every Linear layer of
all-MiniLM-L6-v2 (36 layers) with the 64 calibration sentences of :mod:`analysis.zoo.sentences`,
and look at what happens on the 64 held-out evaluation sentences (not covered by the
theorem), then end to end (cosine similarity of the sentence embeddings). The same is done
on the ccexam MNIST CNN's classifier.0 with calibration images.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from decomp_toolkit.decomp import svd, whitened_svd  # noqa: E402
from decomp_toolkit.decomp.whitened import output_error  # noqa: E402
from decomp_toolkit.layers import calibrate, compress  # noqa: E402
from papers._common import Check, finish, setup_threads, table  # noqa: E402

RANK_FRACTIONS = (0.125, 0.25, 0.5)   # rank k as a fraction of min(out, in)
CERTIFY_RTOL = 1e-6                   # certified bound vs measured output error (float64)


class PackedMiniLM(nn.Module):
    """MiniLM taking one tensor ``(N, 2, T)`` = stacked (input_ids, attention_mask), so that
    :func:`layers.calibrate` (which feeds one input) can drive it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, packed):
        return self.model(packed[:, 0], packed[:, 1])


def sentence_batches(which: str) -> list:
    """Unpadded ``(B, 2, T)`` batches, one per sentence length: padding tokens never enter a Gram."""
    from decomp_toolkit.analysis.zoo import load_sentences

    ids, mask = load_sentences(which=which)
    lengths = mask.sum(1)
    return [torch.stack([ids[lengths == n, :n], mask[lengths == n, :n]], dim=1)
            for n in sorted(set(lengths.tolist()))]


def layer_errors(W, gram_cal, gram_eval, rank) -> dict:
    """Relative output errors of plain and whitened SVD at ``rank`` on calibration and held-out inputs."""
    W = W.detach().double()
    plain = svd(W, rank=rank).to_tensor()
    white = whitened_svd(W, gram_cal, rank=rank)
    W_white = white.to_tensor()
    out = dict(rank=rank, certified=white.error_bound, jitter=white.jitter,
               measured=output_error(W, W_white, gram_cal))
    for label, G in (("cal", gram_cal), ("eval", gram_eval)):
        norm = math.sqrt(max(float(((W @ G) * W).sum()), 0.0))     # ||W X^T||_F
        out[f"plain_{label}"] = output_error(W, plain, G) / norm
        out[f"white_{label}"] = output_error(W, W_white, G) / norm
    out["cal_norm"] = math.sqrt(max(float(((W @ gram_cal) * W).sum()), 0.0))
    return out


def grams(model, cal_data, eval_data, names) -> tuple:
    cal = calibrate(model, cal_data, layers=names, progress=False)
    held = calibrate(model, eval_data, layers=names, progress=False)
    return ({n: cal[n][0] for n in names}, {n: held[n][0] for n in names}, cal)


def study(model, cal_data, eval_data, names) -> list:
    """Per layer and rank fraction: the errors of :func:`layer_errors`."""
    G_cal, G_eval, _ = grams(model, cal_data, eval_data, names)
    rows = []
    for name in names:
        W = model.get_submodule(name).weight
        for fraction in RANK_FRACTIONS:
            rank = max(1, int(fraction * min(W.shape)))
            rows.append(dict(layer=name, fraction=fraction, **layer_errors(W, G_cal[name], G_eval[name], rank)))
    return rows


def certified_ok(row) -> bool:
    """The certified bound equals the measured output error (an upper bound of it when jitter was added)."""
    tol = CERTIFY_RTOL * max(row["cal_norm"], 1e-300)
    if row["jitter"]:
        return row["measured"] <= row["certified"] + tol
    return abs(row["certified"] - row["measured"]) <= tol


def checks_for(label, rows) -> list:
    n = len(rows)
    certified = sum(certified_ok(r) for r in rows)
    better = sum(r["white_cal"] <= r["plain_cal"] * (1 + 1e-9) for r in rows)
    held = sum(r["white_eval"] <= r["plain_eval"] for r in rows)
    return [Check(f"{label}: certified bound == measured output error", n, certified, "exact",
                  "(layer, rank) pairs, calibration data"),
            Check(f"{label}: whitened <= plain output error (calibration data)", n, better, "exact",
                  "(layer, rank) pairs"),
            Check(f"{label}: whitened < plain on held-out data", None, held, "info", f"of {n} (layer, rank) pairs")]


def summary_table(title, rows):
    out = []
    for fraction in RANK_FRACTIONS:
        sel = [r for r in rows if r["fraction"] == fraction]

        def mean(key):
            return sum(r[key] for r in sel) / len(sel)
        out.append(dict(rank=f"{fraction:g} of full", layers=len(sel), plain_cal=f"{mean('plain_cal'):.4f}",
                        whitened_cal=f"{mean('white_cal'):.4f}", plain_heldout=f"{mean('plain_eval'):.4f}",
                        whitened_heldout=f"{mean('white_eval'):.4f}",
                        whitened_wins_heldout=f"{sum(r['white_eval'] < r['plain_eval'] for r in sel)}/{len(sel)}"))
    return table(out, title=title + ": mean relative output error ||(W - W')X^T|| / ||W X^T||")


def per_layer_table(title, rows, fraction=0.25, limit=None):
    sel = [r for r in rows if r["fraction"] == fraction][:limit]
    return table([dict(layer=r["layer"], rank=r["rank"], plain_cal=f"{r['plain_cal']:.4f}",
                       whitened_cal=f"{r['white_cal']:.4f}", certified=f"{r['certified'] / r['cal_norm']:.4f}",
                       plain_heldout=f"{r['plain_eval']:.4f}", whitened_heldout=f"{r['white_eval']:.4f}")
                  for r in sel], title=f"{title}, rank = {fraction:g} of full (relative output errors)")


# ----------------------------------------------------------------------------- models

def minilm_study():
    from decomp_toolkit.analysis.zoo import load_minilm

    model = PackedMiniLM(load_minilm())
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return model, names, study(model, sentence_batches("calibration"), sentence_batches("eval"), names)


def minilm_end_to_end(model, ratios=(0.5, 0.3)):
    """compress(all 36 Linear, method='svd', ratio=r), plain vs calibration=: embedding cosine on eval sentences."""
    from decomp_toolkit.analysis.zoo import embed, load_sentences

    data = load_sentences(which="eval")
    cal = calibrate(model, sentence_batches("calibration"), progress=False)
    reference = embed(model.model, data)
    rows = []
    for ratio in ratios:
        for label, kw in (("plain SVD", {}), ("whitened (calibration=)", dict(calibration=cal))):
            small, report = compress(model, method="svd", ratio=ratio, progress=False, **kw)
            cos = torch.nn.functional.cosine_similarity(embed(small.model, data), reference, dim=1)
            totals = report.totals()
            rows.append(dict(ratio=ratio, decomposition=label,
                             linear_params=f"{totals['params_after']:,} / {totals['params_before']:,}",
                             mean_cosine=f"{float(cos.mean()):.4f}", min_cosine=f"{float(cos.min()):.4f}"))
    return table(rows, title="all-MiniLM-L6-v2, every Linear at ratio= of its parameters: cosine of the "
                             "sentence embeddings to the original's (64 held-out sentences)")


def mnist_study(n_cal=1000, n_eval=2000):
    """classifier.0 (3136 -> 128) of the ccexam MNIST CNN: calibration on images [0, n_cal), held out after."""
    from decomp_toolkit.analysis.zoo import load_mnist_cnn, load_mnist_images

    model = load_mnist_cnn()
    images, _ = load_mnist_images(n_cal + n_eval)
    return study(model, images[:n_cal], images[n_cal:], ["classifier.0"])


def main(argv=None) -> int:
    setup_threads()
    mn = mnist_study()
    tables = [per_layer_table("ccexam MNIST CNN classifier.0 (1,000 calibration / 2,000 held-out images)", mn,
                              fraction=f) for f in RANK_FRACTIONS[:1]]
    tables.append(summary_table("ccexam MNIST CNN classifier.0", mn))
    checks = checks_for("MNIST classifier.0", mn)
    model, _, rows = minilm_study()
    tables += [per_layer_table("all-MiniLM-L6-v2, layers 0 and 5", [r for r in rows if ".layer.0." in r["layer"]
                                                                    or ".layer.5." in r["layer"]]),
               summary_table("all-MiniLM-L6-v2, all 36 Linear layers (64 calibration / 64 held-out sentences)",
                             rows)]
    checks += checks_for("MiniLM (36 layers x 3 ranks)", rows)
    if "--no-accuracy" not in (sys.argv[1:] if argv is None else argv):
        tables.append(minilm_end_to_end(model))
    return finish("svdllm", checks, tables)


if __name__ == "__main__":
    sys.exit(main())
