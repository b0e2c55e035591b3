"""``finetune(student, teacher, data)``: accuracy recovery by knowledge distillation.

Loss per batch (Hinton, Vinyals, Dean 2015, "Distilling the knowledge in a neural network"):

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

when the batches carry integer labels, else the pure distillation term ``T^2 * KL``. The
``T^2`` factor keeps the soft-target gradients on the scale of the hard-target ones.
Optionally ``layer_match`` adds ``match_weight * sum MSE(student module output, teacher
module output)`` over matched modules (FitNets-style hints), collected with forward hooks
that are removed even on error. Adam on the student's trainable parameters.

The student is trained in place (that is the point); the teacher is run in eval mode
under ``torch.no_grad()`` and is not modified (its training flags are restored; parameters
and buffers the student shares with it, e.g. a student built from the teacher's own
modules, are replaced in the student by copies first, so training never reaches them). Hyper-parameters must be finite, labels in
range; NaN/Inf in the data or in either model's output raise at the batch where they appear. The
student runs in train mode during fine-tuning (``student_train_mode=False`` keeps it in
eval mode, e.g. to freeze BatchNorm statistics on small data) and gets its flags back.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from decomp_toolkit.decomp._backend import all_finite

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

    ``data``: a re-iterable of batches (a tensor, a dict of tensors, or tuples ``(x,)`` / ``(x, labels)``
    with ``labels`` an integer tensor of shape (B,)), or one input tensor (shuffled each
    epoch with ``random_state`` and split into ``batch_size`` batches). ``layer_match``:
    a list of module names present in both models, or ``{student name: teacher name}``.
    ``max_batches`` limits the batches per epoch. Returns a list with one dict per epoch:
    ``epoch, steps, loss, kd`` (mean over the epoch's batches) and ``ce`` / ``match`` /
    ``accuracy`` (student's training accuracy on the labelled batches) where they apply.
    ``forward(model, x) -> logits`` runs a model on a batch input (default
    :func:`default_forward`: ``model(x)``, or ``model(**x).logits`` for a dict batch such as
    ``{"input_ids": ...}`` of a ``transformers`` model; e.g. ``lambda m, x: m(*x)`` for models
    taking several tensors).
    """
    run = forward or default_forward
    _check(student, teacher, epochs, temperature, alpha, lr)
    _check_finite_number("weight_decay", weight_decay, allow_zero=True)
    _check_finite_number("match_weight", match_weight, allow_zero=True)
    _untie_from_teacher(student, teacher)
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
        hooks += _capture_hooks(pairs, student, teacher, captured)
        teacher.eval()
        student.train(student_train_mode)
        for epoch in range(epochs):
            batches = _epoch_batches(data, batch_size, generator)
            batches = _progress(batches, progress, f"finetune {epoch + 1}/{epochs}")
            history.append(_train_epoch(student, teacher, batches, optimizer, epoch, dict(
                run=run, device=device, pairs=pairs, captured=captured, max_batches=max_batches,
                temperature=temperature, alpha=alpha, match_weight=match_weight, lr=lr)))
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return history


def _train_epoch(student, teacher, batches, optimizer, epoch, options) -> dict:
    """One distillation epoch over ``batches``; the epoch's history record."""
    o = options
    sums, steps, correct, labelled = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "match": 0.0}, 0, 0, 0
    for index, batch in enumerate(batches):
        if o["max_batches"] is not None and index >= o["max_batches"]:
            break
        x, labels = _split_batch(batch, o["device"])
        _check_batch(x, labels, epoch, index)
        with torch.no_grad():
            teacher_logits = o["run"](teacher, x)
        student_logits = o["run"](student, x)
        _check_logits(student_logits, teacher_logits, labels, epoch, index)
        loss, kd, ce = distillation_loss(student_logits, teacher_logits, labels, o["temperature"], o["alpha"])
        match = None
        if o["pairs"]:
            match = sum(F.mse_loss(o["captured"]["student"][s], o["captured"]["teacher"][t].detach())
                        for s, t in o["pairs"])
            loss = loss + o["match_weight"] * match
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"finetune: the loss became {loss.item()} at epoch {epoch + 1}, "
                                     f"batch {index} (the data and both models' outputs were finite, so "
                                     f"the student's weights diverged); lower lr={o['lr']}")
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
        for store in o["captured"].values():
            store.clear()
    if steps == 0:
        raise ValueError("finetune: data yielded no batches")
    return _epoch_record(epoch, steps, sums, correct, labelled, bool(o["pairs"]))


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
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0 <= alpha <= 1):
        raise ValueError(f"finetune: alpha={alpha!r} must be in [0, 1]")
    _check_finite_number("lr", lr)


def _check_finite_number(name, value, allow_zero=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"finetune: {name}={value!r} must be a finite number {bound}")


def _untie_from_teacher(student, teacher) -> None:
    """Give the student its own copy of every parameter / buffer it shares with the teacher (ties inside the
    student are kept), so that training the student never changes the teacher."""
    import copy
    teacher_modules = {id(m) for m in teacher.modules()}
    module_copies = {}
    for parent in list(student.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in teacher_modules:  # a module object of the teacher: the student gets a copy of it
                if id(child) not in module_copies:
                    module_copies[id(child)] = copy.deepcopy(child)
                setattr(parent, child_name, module_copies[id(child)])
    shared = {id(t) for t in list(teacher.parameters()) + list(teacher.buffers())}
    copies = {}
    for module in student.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in shared:
                if id(param) not in copies:
                    copies[id(param)] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                setattr(module, name, copies[id(param)])
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and id(buffer) in shared:
                copies.setdefault(id(buffer), buffer.detach().clone())
                module._buffers[name] = copies[id(buffer)]


def _check_batch(x, labels, epoch, index):
    where = f"finetune: epoch {epoch + 1}, batch {index}"
    tensors = x if isinstance(x, (tuple, list)) else list(x.values()) if isinstance(x, Mapping) else [x]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not all_finite(t):
            raise ValueError(f"{where}: the input contains NaN or Inf (shape {tuple(t.shape)}); clean the data")
    if labels is not None and labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{where}: labels must be class indices >= 0, got min {int(labels.min())}")


def _check_logits(student_logits, teacher_logits, labels, epoch, index):
    where = f"finetune: epoch {epoch + 1}, batch {index}"
    for name, logits in (("student", student_logits), ("teacher", teacher_logits)):
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"{where}: the {name} returned {type(logits).__name__}, not a logits tensor; pass "
                            f"forward=lambda model, x: model(x).logits (or similar)")
        if not all_finite(logits.detach()):
            raise ValueError(f"{where}: the {name}'s output contains NaN or Inf")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{where}: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if labels is not None:
        classes = student_logits.shape[-1]
        if labels.shape[0] != student_logits.shape[0]:
            raise ValueError(f"{where}: {labels.shape[0]} labels for a batch of {student_logits.shape[0]} logits rows")
        if int(labels.max()) >= classes:
            raise ValueError(f"{where}: label {int(labels.max())} is out of range for {classes} classes")


def _capture_hooks(pairs, student, teacher, captured) -> list:
    """Forward hooks storing the outputs of the matched modules of both models in ``captured``."""
    hooks = []
    for side, model in (("student", student), ("teacher", teacher)):
        modules = dict(model.named_modules())
        for name in (s if side == "student" else t for s, t in pairs):
            hooks.append(modules[name].register_forward_hook(_capture(captured[side], name)))
    return hooks


def _epoch_record(epoch, steps, sums, correct, labelled, matched) -> dict:
    record = {"epoch": epoch + 1, "steps": steps, "loss": sums["loss"] / steps, "kd": sums["kd"] / steps}
    if labelled:
        record["ce"] = sums["ce"] / steps
        record["accuracy"] = correct / labelled
    if matched:
        record["match"] = sums["match"] / steps
    return record


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


def default_forward(model, x):
    """``model(x)``; for a mapping batch ``model(**x)``, its ``logits`` when the output has them."""
    if not isinstance(x, Mapping):
        return model(x)
    out = model(**x)
    return out.logits if getattr(out, "logits", None) is not None else out


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
    if isinstance(x, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()}, labels
    return x.to(device), labels


def _progress(items, enabled, desc):
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit="batch", leave=False)


__all__ = ["finetune", "distillation_loss"]
