"""``finetune(student, teacher, data)``: accuracy recovery by knowledge distillation.

Loss per batch (Hinton, Vinyals, Dean 2015, "Distilling the knowledge in a neural network"):

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

when the batches carry integer labels, else the pure distillation term ``T^2 * KL``. The
``T^2`` factor keeps the soft-target gradients on the scale of the hard-target ones.
Optionally ``layer_match`` adds ``match_weight * sum MSE(student module output, teacher
module output)`` over matched modules (FitNets-style hints), collected with forward hooks
that are removed even on error. Adam on the student's trainable parameters.

The student is trained in place (that is the point); the teacher is run in eval mode
under ``torch.no_grad()`` and is not modified (its training flags are restored). The
student runs in train mode during fine-tuning (``student_train_mode=False`` keeps it in
eval mode, e.g. to freeze BatchNorm statistics on small data) and gets its flags back.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .calibrate import iter_batches


def distillation_loss(student_logits, teacher_logits, labels=None, temperature=4.0, alpha=0.9):
    """``(loss, kd, ce)``: Hinton's KD loss (see module docstring); ``ce`` is None without labels."""
    T = float(temperature)
    kd = F.kl_div(F.log_softmax(student_logits / T, dim=-1), F.log_softmax(teacher_logits / T, dim=-1),
                  log_target=True, reduction="batchmean") * T * T
    if labels is None:
        return kd, kd, None
    ce = F.cross_entropy(student_logits, labels)
    return alpha * kd + (1 - alpha) * ce, kd, ce


def finetune(student, teacher, data, epochs=1, temperature=4.0, alpha=0.9, lr=1e-3, layer_match=None,
             progress=True, *, match_weight=1.0, batch_size=64, max_batches=None, weight_decay=0.0,
             student_train_mode=True, random_state=0, forward=None) -> list:
    """Distil ``teacher`` into ``student`` on ``data``; returns the per-epoch history.

    ``data``: a re-iterable of batches (a tensor, or tuples ``(x,)`` / ``(x, labels)``
    with ``labels`` an integer tensor of shape (B,)), or one input tensor (shuffled each
    epoch with ``random_state`` and split into ``batch_size`` batches). ``layer_match``:
    a list of module names present in both models, or ``{student name: teacher name}``.
    ``max_batches`` limits the batches per epoch. Returns a list with one dict per epoch:
    ``epoch, steps, loss, kd`` (mean over the epoch's batches) and ``ce`` / ``match`` /
    ``accuracy`` (student's training accuracy on the labelled batches) where they apply.
    ``forward(model, x) -> logits`` runs a model on a batch input (default ``model(x)``;
    e.g. ``lambda m, x: m(*x)`` for models taking several tensors).
    """
    run = forward or (lambda model, x: model(x))
    _check(student, teacher, epochs, temperature, alpha, lr)
    pairs = _match_pairs(student, teacher, layer_match)
    if not isinstance(data, torch.Tensor) and iter(data) is data and epochs > 1:
        raise ValueError("finetune: data is a one-shot iterator but epochs > 1; pass a list or a DataLoader")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the student has no trainable parameters")
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    device = params[0].device
    generator = torch.Generator().manual_seed(int(random_state))
    modes = {m: m.training for m in list(student.modules()) + list(teacher.modules())}
    captured, hooks = {"student": {}, "teacher": {}}, []
    history = []
    try:
        for side, model in (("student", student), ("teacher", teacher)):
            names = [s if side == "student" else t for s, t in pairs]
            modules = dict(model.named_modules())
            for name in names:
                hooks.append(modules[name].register_forward_hook(_capture(captured[side], name)))
        teacher.eval()
        student.train(student_train_mode)
        for epoch in range(epochs):
            sums, steps, correct, labelled = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "match": 0.0}, 0, 0, 0
            batches = _epoch_batches(data, batch_size, generator)
            for index, batch in enumerate(_progress(batches, progress, f"finetune {epoch + 1}/{epochs}")):
                if max_batches is not None and index >= max_batches:
                    break
                x, labels = _split_batch(batch, device)
                with torch.no_grad():
                    teacher_logits = run(teacher, x)
                student_logits = run(student, x)
                loss, kd, ce = distillation_loss(student_logits, teacher_logits, labels, temperature, alpha)
                match = None
                if pairs:
                    match = sum(F.mse_loss(captured["student"][s], captured["teacher"][t].detach())
                                for s, t in pairs)
                    loss = loss + match_weight * match
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"finetune: the loss became {loss.item()} at epoch {epoch + 1}, "
                                             f"batch {index}; lower lr={lr}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                sums["loss"] += loss.item()
                sums["kd"] += kd.item()
                if ce is not None:
                    sums["ce"] += ce.item()
                    correct += int((student_logits.argmax(-1) == labels).sum())
                    labelled += int(labels.numel())
                if match is not None:
                    sums["match"] += match.item()
                for store in captured.values():
                    store.clear()
            if steps == 0:
                raise ValueError("finetune: data yielded no batches")
            record = {"epoch": epoch + 1, "steps": steps, "loss": sums["loss"] / steps, "kd": sums["kd"] / steps}
            if labelled:
                record["ce"] = sums["ce"] / steps
                record["accuracy"] = correct / labelled
            if pairs:
                record["match"] = sums["match"] / steps
            history.append(record)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return history


def _check(student, teacher, epochs, temperature, alpha, lr):
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"finetune: {name} must be an nn.Module, got {type(model).__name__}")
    if student is teacher:
        raise ValueError("finetune: student and teacher are the same module; pass a compressed copy as the student")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"finetune: epochs={epochs!r} must be a positive int")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"finetune: temperature={temperature!r} must be > 0")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f"finetune: alpha={alpha!r} must be in [0, 1]")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"finetune: lr={lr!r} must be > 0")


def _match_pairs(student, teacher, layer_match):
    if layer_match is None:
        return []
    pairs = list(layer_match.items()) if isinstance(layer_match, dict) else [(n, n) for n in layer_match]
    s_names, t_names = dict(student.named_modules()), dict(teacher.named_modules())
    for s, t in pairs:
        if s not in s_names:
            raise ValueError(f"finetune: layer_match names {s!r}, which is not a module of the student")
        if t not in t_names:
            raise ValueError(f"finetune: layer_match names {t!r}, which is not a module of the teacher")
    return pairs


def _capture(store, name):
    def hook(module, args, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"finetune: layer_match module {name!r} returned {type(output).__name__}, not a tensor")
        store[name] = output
    return hook


def _epoch_batches(data, batch_size, generator):
    if isinstance(data, torch.Tensor):
        order = torch.randperm(len(data), generator=generator)
        return iter_batches(data[order.to(data.device)], batch_size)
    return iter_batches(data)


def _split_batch(batch, device):
    labels = None
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("finetune: got an empty batch")
        x = batch[0]
        if len(batch) > 1 and isinstance(batch[1], torch.Tensor) and not batch[1].is_floating_point() \
                and batch[1].ndim == 1:
            labels = batch[1].to(device)
    else:
        x = batch
    if isinstance(x, (tuple, list)):
        return type(x)(t.to(device) if isinstance(t, torch.Tensor) else t for t in x), labels
    return x.to(device), labels


def _progress(items, enabled, desc):
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit="batch", leave=False)


__all__ = ["finetune", "distillation_loss"]
