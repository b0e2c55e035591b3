"""``recover(model, train, heldout)``: fine-tune the kept low-rank factors of a compressed causal LM.

Only the factor weights of the factorized layers (``reduce`` / ``expand`` of
:class:`~layers.lowrank.LowRankLinear` and every other :class:`~layers.base.FactorizedLayer`'s
parameters) are trained; embeddings, norms, dense layers and biases stay frozen. Loss:
next-token cross-entropy on the training windows, plus, with ``teacher=``, ``kd_weight`` times
the KL divergence to the teacher's next-token distribution (:func:`layers.finetune.distillation_loss`).

Bounds: training stops after ``seconds`` of wall time or ``max_tokens`` training tokens,
whichever comes first. Guarantee: the held-out perplexity is measured before the first step
and every ``eval_every`` steps (and at the end); the factors with the best held-out perplexity
are restored, so the returned model is never worse on the held-out windows than the one passed
in. The model is trained in place (and returned); its training flags are restored.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .base import FactorizedLayer
from .finetune import distillation_loss


@dataclass
class RecoveryLog:
    """What :func:`recover` did: held-out perplexity before / best / per evaluation, steps, tokens, seconds."""

    before: float
    best: float
    history: list = field(default_factory=list)   # (step, tokens, held-out perplexity)
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"recovery: {self.steps} steps, {self.tokens:,} tokens, {self.seconds:.0f} s; held-out perplexity "
                f"{self.before:.2f} -> {self.best:.2f} (best kept)")


def factor_parameters(model) -> list:
    """The weight parameters of every factorized layer of ``model`` (biases excluded)."""
    params = []
    for module in model.modules():
        if isinstance(module, FactorizedLayer):
            params += [p for name, p in module.named_parameters() if not name.endswith("bias")]
    return params


@torch.no_grad()
def heldout_perplexity(model, windows, batch_size=8) -> float:
    """``exp`` of the mean next-token cross-entropy over ``windows (n, length)``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        logits = _logits(model, batch)[:, :-1]
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                   batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def _logits(model, ids):
    out = model(ids)
    return getattr(out, "logits", out)


def _check(train, heldout, seconds, max_tokens, lr, batch_size, eval_every):
    for label, windows in (("train", train), ("heldout", heldout)):
        if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.dtype != torch.int64:
            raise ValueError(f"recover: {label} must be an int64 tensor (windows, tokens) of token ids")
    if seconds is None and max_tokens is None:
        raise ValueError("recover: pass seconds= and/or max_tokens= (the training budget)")
    for label, value in (("seconds", seconds), ("max_tokens", max_tokens), ("lr", lr)):
        if value is not None and not value > 0:
            raise ValueError(f"recover: {label}={value!r} must be > 0")
    if batch_size < 1 or eval_every < 1:
        raise ValueError(f"recover: batch_size={batch_size} and eval_every={eval_every} must be >= 1")


def recover(model, teacher, train, heldout, *, seconds=600.0, max_tokens=None, lr=1e-4, batch_size=4,
            eval_every=10, kd_weight=0.5, temperature=1.0, seed=0, progress=True):
    """Fine-tune ``model``'s factors on ``train`` windows; returns ``(model, RecoveryLog)`` (see module docstring).

    ``teacher``: the dense model for the KD term (None: cross-entropy only); ``train`` /
    ``heldout``: ``(windows, tokens)`` int64 token ids; ``lr``: Adam's step size.
    """
    _check(train, heldout, seconds, max_tokens, lr, batch_size, eval_every)
    params = factor_parameters(model)
    if not params:
        raise ValueError("recover: the model has no factorized layers to fine-tune")
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    trainable = set(params)
    start = time.perf_counter()
    log = RecoveryLog(before=heldout_perplexity(model, heldout), best=0.0)
    log.best, best_state = log.before, [p.detach().clone() for p in params]
    log.history.append((0, 0, log.before))
    optimizer = torch.optim.Adam(params, lr=lr)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    bar = _bar(progress, seconds, max_tokens)
    try:
        for p in model.parameters():
            p.requires_grad_(p in trainable)
        while not _spent(start, seconds, log.tokens, max_tokens):
            batch = train[order[(log.steps * batch_size + torch.arange(batch_size)) % len(train)]]
            model.train()
            loss = _step_loss(model, teacher, batch, kd_weight, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            log.steps, log.tokens = log.steps + 1, log.tokens + batch[:, 1:].numel()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", best=f"{log.best:.2f}")
            bar.update(1)
            if log.steps % eval_every == 0:
                best_state = _evaluate(model, heldout, params, log, best_state)
        if log.steps % eval_every:
            best_state = _evaluate(model, heldout, params, log, best_state)
    finally:
        bar.close()
        with torch.no_grad():
            for p, saved in zip(params, best_state):
                p.copy_(saved)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, training in modes.items():
            m.training = training
    log.seconds = time.perf_counter() - start
    return model, log


def _step_loss(model, teacher, batch, kd_weight, temperature):
    logits = _logits(model, batch)[:, :-1].float()
    flat, labels = logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    if teacher is None or kd_weight == 0:
        return nn.functional.cross_entropy(flat, labels)
    with torch.no_grad():
        teacher.eval()
        reference = _logits(teacher, batch)[:, :-1].float().reshape(-1, logits.shape[-1])
    loss, _, _ = distillation_loss(flat, reference, labels, temperature=temperature, alpha=kd_weight)
    return loss


def _evaluate(model, heldout, params, log, best_state):
    value = heldout_perplexity(model, heldout)
    log.history.append((log.steps, log.tokens, value))
    if value < log.best:
        log.best = value
        return [p.detach().clone() for p in params]
    return best_state


def _spent(start, seconds, tokens, max_tokens) -> bool:
    return (seconds is not None and time.perf_counter() - start >= seconds) or (
        max_tokens is not None and tokens >= max_tokens)


def _bar(enabled, seconds, max_tokens):
    from tqdm.auto import tqdm
    return tqdm(desc=f"recover (<= {seconds:.0f} s)" if seconds else "recover", unit="step", disable=not enabled,
                leave=False)


__all__ = ["recover", "RecoveryLog", "factor_parameters", "heldout_perplexity"]
