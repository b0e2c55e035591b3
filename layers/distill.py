"""``distill(student, teacher, data, held_out)``: time-bounded recovery of a compressed model on unlabelled data.

For models whose outputs are not class logits (score maps, embeddings) the loss is the
mean squared error to the teacher's outputs, normalised by the teacher's output energy
(``||s - t||^2 / ||t||^2`` per batch), or any ``loss(student_out, teacher_out)``; for score
maps whose few high scores decide the result (a detector's text / object heat maps, in
``[0, 1]``), ``loss=score_map_mse`` weights each position by its teacher score. Adam on
the student's trainable parameters (``params="factorized"``: only the factorized layers'
parameters, the rest frozen). The teacher's output on each training batch is computed once
and kept (``cache_teacher=True``, default: the batches are fixed, so every later pass over
them costs only the student's forward and backward); pass ``cache_teacher=False`` when the
teacher's outputs are too large to hold (e.g. LM logits). The student stays in eval mode (BatchNorm statistics and
dropout are frozen: recovery data is small and unlabelled).

Bounds and guarantee: training stops after ``seconds`` of CPU time of this thread
(``time.thread_time``; wall time is meaningless on a shared machine) or ``max_steps``;
the held-out loss (or ``held_out_fn(student)``, lower is better) is measured before the
first step, every ``eval_every`` steps and at the end, and the best state is restored, so
the returned student is never worse on the held-out data than the one passed in. The
student is trained in place; the teacher is not modified.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from .base import FactorizedLayer
from .calibrate import batch_input, iter_batches


@dataclass
class DistillLog:
    """Held-out score before / best, per evaluation ``(step, cpu seconds, score)``, steps and CPU seconds."""

    before: float
    best: float
    history: list = field(default_factory=list)
    steps: int = 0
    cpu_seconds: float = 0.0

    def summary(self) -> str:
        return (f"distill: {self.steps} steps, {self.cpu_seconds:.0f} s CPU; held-out {self.before:.5g} -> "
                f"best {self.best:.5g}")


def relative_mse(student_out, teacher_out):
    """``||s - t||^2 / ||t||^2`` over the batch."""
    return (student_out - teacher_out).pow(2).sum() / teacher_out.pow(2).sum().clamp_min(1e-12)


def score_map_mse(student_out, teacher_out, foreground: float = 20.0):
    """``sum w (s - t)^2 / sum w t^2`` with ``w = 1 + foreground * clamp(t, 0, 1)``, over the batch.

    For outputs that are scores in ``[0, 1]`` (heat maps, segmentation probabilities), any shape:
    a position the teacher scores 1 weighs ``1 + foreground`` times a background one, so the rare
    high-score positions a thresholded decoder reads are not drowned by the background
    (``foreground=0`` is :func:`relative_mse`). Pass ``loss=score_map_mse`` to :func:`distill`, or
    ``functools.partial(score_map_mse, foreground=f)``; ``foreground``: a number >= 0.
    """
    if isinstance(foreground, bool) or not isinstance(foreground, (int, float)) or not foreground >= 0:
        raise ValueError(f"score_map_mse: foreground={foreground!r} must be a number >= 0 (the extra weight of a "
                         f"position the teacher scores 1; 0 gives relative_mse)")
    weight = 1 + foreground * teacher_out.clamp(0, 1)
    return (weight * (student_out - teacher_out).pow(2)).sum() / (weight * teacher_out.pow(2)).sum().clamp_min(1e-12)


def _trainable(student, params):
    if params == "all":
        return [p for p in student.parameters() if p.requires_grad]
    if params == "factorized":
        return [p for m in student.modules() if isinstance(m, FactorizedLayer) for p in m.parameters()
                if p.requires_grad]
    raise ValueError(f"params={params!r}: pass 'factorized' or 'all'")


def distill(student, teacher, data, held_out, *, seconds=900.0, max_steps=None, lr=1e-4, loss=None,
            held_out_fn=None, eval_every=25, params="factorized", batch_size=4, forward=None,
            cache_teacher=True) -> DistillLog:
    """Distil ``teacher`` into ``student`` (see module docstring); returns a :class:`DistillLog`.

    ``data`` / ``held_out``: batches (a tensor split into ``batch_size`` rows, or an iterable of
    batches; a batch's first element is the input); ``data`` is cycled until a bound is hit.
    ``forward(model, x)`` runs a model on a batch input (default ``model(x)``).
    """
    run = forward or (lambda model, x: model(x))
    loss = loss or relative_mse
    trainable = _trainable(student, params)
    if not trainable:
        raise ValueError(f"distill: the student has no trainable parameters (params={params!r})")
    if seconds <= 0 or (max_steps is not None and max_steps < 1):
        raise ValueError(f"distill: seconds={seconds!r} and max_steps={max_steps!r} must be positive")
    frozen = [p for p in student.parameters() if p.requires_grad and all(p is not q for q in trainable)]
    batches, held = list(iter_batches(data, batch_size)), list(iter_batches(held_out, batch_size))
    if not batches or not held:
        raise ValueError("distill: data and held_out must each yield at least one batch")
    with torch.no_grad():
        targets = [run(teacher.eval(), batch_input(b)) for b in held]

    def score():
        if held_out_fn is not None:
            return float(held_out_fn(student))
        with torch.no_grad():
            return float(sum(loss(run(student, batch_input(b)), t) for b, t in zip(held, targets)) / len(held))

    modes = {m: m.training for m in student.modules()}
    for p in frozen:
        p.requires_grad_(False)
    try:
        student.eval()
        first = score()
        log, best_state = DistillLog(before=first, best=first), copy.deepcopy(student.state_dict())
        log.history.append((0, 0.0, first))
        optimizer = torch.optim.Adam(trainable, lr=lr)
        start = time.thread_time()
        cached = {}
        while log.cpu_seconds < seconds and (max_steps is None or log.steps < max_steps):
            for index, batch in enumerate(batches):
                x = batch_input(batch)
                target = cached.get(index)
                if target is None:
                    with torch.no_grad():
                        target = run(teacher, x)
                    if cache_teacher:
                        cached[index] = target
                optimizer.zero_grad(set_to_none=True)
                loss(run(student, x), target).backward()
                optimizer.step()
                log.steps += 1
                log.cpu_seconds = time.thread_time() - start
                done = log.cpu_seconds >= seconds or (max_steps is not None and log.steps >= max_steps)
                if done or log.steps % eval_every == 0:
                    current = score()
                    log.history.append((log.steps, log.cpu_seconds, current))
                    if current < log.best:
                        log.best, best_state = current, copy.deepcopy(student.state_dict())
                if done:
                    break
        student.load_state_dict(best_state)
        return log
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for module, training in modes.items():
            module.training = training


__all__ = ["distill", "DistillLog", "relative_mse", "score_map_mse"]
