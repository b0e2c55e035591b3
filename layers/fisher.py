"""Per-layer output sensitivities for loss-aware rank allocation.

``layer_fisher(model, names, data)`` returns, for every named layer, the diagonal empirical
Fisher of its OUTPUT channels: ``F[name][j] = sum over batches and positions of
(d loss / d y_j)^2``, ``y`` the layer's output. Dropping a component ``s u v^T`` of the
layer's whitened SVD (of the Gram summed over ``N`` rows) then raises the loss by about
``s^2 sum_j F_j u_j^2 / N`` (second order, diagonal approximation; :func:`fisher_weighted_spectrum`
gives the sum; both ``F`` and ``s^2`` sum over the rows, hence the ``/ N``), a number that is
comparable across layers of one model, unlike a layer's relative output energy.

The loss (``loss=fn(model, batch) -> scalar``; default :func:`default_sensitivity_loss`):

* a language model (integer ``(batch, tokens)`` ids, an output with ``logits`` or a
  ``(batch, tokens, vocab)`` tensor): the model's own ``loss`` when the batch has ``labels``, else
  the next-token cross-entropy of the sequence the logits are computed on (``decoder_input_ids``
  of an encoder-decoder, else ``input_ids``);
* any other model: ``<v, f(x)>`` with ``v`` a fixed standard-normal direction per batch (seed 0)
  and ``f(x)`` the model's first output tensor. ``E_v[(J^T v)^2] = diag(J^T J)``: the Gauss-Newton
  sensitivity of the model's output to the layer's output, i.e. the curvature of
  ``||f'(x) - f(x)||^2`` (distance to the original outputs), which needs no labels.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from .calibrate import batch_input, iter_batches, run_model
from .distributed import is_distributed


def _first_tensor(output):
    """The first tensor of a model output: a tensor, ``.logits`` / ``.last_hidden_state``, a tuple or dict."""
    if isinstance(output, torch.Tensor):
        return output
    for attribute in ("logits", "last_hidden_state"):
        value = getattr(output, attribute, None)
        if isinstance(value, torch.Tensor):
            return value
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    raise ValueError(f"layer_fisher: cannot find an output tensor in the model's output ({type(output).__name__}); "
                     f"pass loss=fn(model, batch) -> scalar")


def _is_token_batch(batch) -> bool:
    ids = batch_input(batch) if not isinstance(batch, Mapping) else batch.get("input_ids")
    return isinstance(ids, torch.Tensor) and ids.ndim == 2 and ids.dtype in (torch.int32, torch.int64)


class OutputProjectionLoss:
    """``loss(model, batch) = <v, f(x)>`` with ``v ~ N(0, I)`` drawn per call from a seeded generator.

    Squared gradients of this loss average to the Gauss-Newton diagonal ``diag(J^T J)`` of the
    model's outputs (see module docstring). ``forward(model, batch)`` runs a batch (default
    :func:`layers.calibrate.run_model`).
    """

    def __init__(self, forward=None, random_state: int = 0):
        self.forward = forward
        self.generator = torch.Generator().manual_seed(random_state)

    def __call__(self, model, batch):
        out = self.forward(model, batch) if self.forward is not None else run_model(model, batch, what="layer_fisher")
        y = _first_tensor(out)
        v = torch.randn(y.shape, generator=self.generator, dtype=torch.float32).to(y.device, y.dtype)
        return (v * y).sum()


class CausalLMLoss:
    """Next-token cross-entropy of a (causal or encoder-decoder) LM; ``forward(model, batch)`` runs a
    batch (default: ``model(ids)``).

    The model's own ``loss`` when it returns one (a batch with ``labels``); else the logits
    predict the next token of the sequence they were computed on: ``decoder_input_ids`` when the
    batch has them (encoder-decoder models), else ``input_ids``."""

    def __init__(self, forward=None):
        self.forward = forward

    def __call__(self, model, batch):
        out = self.forward(model, batch) if self.forward is not None else run_model(model, batch, what="layer_fisher")
        if isinstance(getattr(out, "loss", None), torch.Tensor):
            return out.loss
        ids = _target_ids(batch)
        logits = _first_tensor(out)
        if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
            raise ValueError(f"layer_fisher: the model's logits have shape {tuple(logits.shape)}, which does not match "
                             f"the token ids of shape {tuple(ids.shape)} they should predict; pass "
                             f"loss=fn(model, batch) -> scalar, or labels in the batch")
        device = next((p.device for p in model.parameters()), logits.device)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 ids.to(device)[:, 1:].reshape(-1))


def _target_ids(batch) -> torch.Tensor:
    """The token ids the logits of ``batch`` are computed on (``decoder_input_ids`` first)."""
    if not isinstance(batch, Mapping):
        return batch_input(batch)
    return batch["decoder_input_ids"] if "decoder_input_ids" in batch else batch["input_ids"]


def default_sensitivity_loss(model, batch, forward=None):
    """The loss :func:`layer_fisher` uses when none is given, chosen from the first batch (module docstring)."""
    if _is_token_batch(batch):
        out = (forward(model, batch) if forward is not None else run_model(model, batch, what="layer_fisher"))
        if getattr(out, "logits", None) is not None or (isinstance(out, torch.Tensor) and out.ndim == 3):
            return CausalLMLoss(forward)
    return OutputProjectionLoss(forward)


def output_fisher(model, names, batches, loss=None, chunk_size=2) -> dict:
    """``{name: (out,) float64}``: sum over batches and positions of the squared loss gradient of each
    named layer's output channels (the diagonal empirical Fisher of the outputs). ``loss(model,
    batch) -> scalar`` (default: :func:`default_sensitivity_loss` of the first batch). Tensor
    batches are run ``chunk_size`` rows at a time (the backward's activations are the memory
    peak). The model's parameters, their ``.grad`` and its training flags are left as they were;
    with ``torch.distributed`` initialised the result is summed over the ranks."""
    if loss is None:
        with torch.no_grad():
            loss = default_sensitivity_loss(model, next(iter(batches)))
    outputs, fisher, hooks = {}, {}, []
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for name in names:
        def keep(module, args, out, name=name):
            outputs[name] = out
        hooks.append(model.get_submodule(name).register_forward_hook(keep))
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
        for batch in _chunks(batches, chunk_size):
            outputs.clear()
            with torch.enable_grad():
                value = loss(model, batch)
                ran = [n for n in names if n in outputs]
                grads = torch.autograd.grad(value, [outputs[n] for n in ran], allow_unused=True)
            for name, g in zip(ran, grads):
                if g is None:
                    continue
                module = model.get_submodule(name)
                channel = g.ndim - 1 if isinstance(module, nn.Linear) else (1 if g.ndim > len(module.kernel_size) + 1
                                                                            else 0)
                squared = g.detach().double().pow(2).movedim(channel, -1).reshape(-1, g.shape[channel]).sum(0)
                fisher[name] = fisher[name] + squared.cpu() if name in fisher else squared.cpu()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, training in modes.items():
            m.training = training
    if is_distributed():
        import torch.distributed as dist
        for name in sorted(fisher):
            dist.all_reduce(fisher[name])
    return fisher


def _chunks(batches, size):
    for batch in batches:
        if isinstance(batch, torch.Tensor) and size and len(batch) > size:
            yield from batch.split(size)
        else:
            yield batch


def layer_fisher(model, names, data, *, loss=None, forward=None, batch_size=128, max_batches=None,
                 chunk_size=4) -> dict:
    """``{name: (out_channels,) float64 CPU}``: diagonal output Fisher of each named layer (module docstring).

    ``data`` / ``batch_size`` / ``max_batches`` / ``forward`` as in :func:`layers.calibrate.calibrate`;
    tensor batches run ``chunk_size`` rows at a time (the backward's activations are the memory
    peak). Only ``nn.Linear`` / ``nn.ConvNd`` layers get an entry. One forward + backward per chunk; the model, its parameters' ``requires_grad`` and
    ``.grad`` and its training flags are left as they were. Layers that never ran get no entry.
    """
    batches = list(iter_batches(data, batch_size))
    if max_batches is not None:
        batches = batches[:max_batches]
    if not batches:
        raise ValueError("layer_fisher: no calibration batch was given")
    if loss is None:
        with torch.no_grad():
            loss = default_sensitivity_loss(model, batches[0], forward)
    standard = [n for n in names if isinstance(model.get_submodule(n), (nn.Linear, nn.modules.conv._ConvNd))]
    return output_fisher(model, standard, batches, loss, chunk_size=chunk_size)


def fisher_weighted_spectrum(matrix, fisher) -> torch.Tensor:
    """``(r,)`` estimated loss increase of dropping each singular component of ``matrix`` (descending order).

    ``matrix``: ``(out, k)`` or ``(groups, out / groups, k)``, the (whitened) weight whose rows are
    the layer's output channels; ``fisher``: ``(out,)`` diagonal output Fisher. Component ``i``
    (``matrix = sum_i s_i u_i v_i^T``) costs ``sum_groups s_i^2 sum_j F_j u_ij^2``.

    Computed from the eigendecomposition of the smaller Gram (no SVD): ``M M^T = U S^2 U^T`` gives
    ``s_i^2 u_i`` directly; for tall matrices ``M^T M = V S^2 V^T`` and ``M v_i = s_i u_i``, so the
    cost is ``sum_j F_j (M v_i)_j^2``. Each value agrees with the SVD formula to ~1e-15 of the
    largest one (float64); values far below that are rounding noise in both.
    """
    batched = (matrix if matrix.ndim == 3 else matrix[None]).double()
    F = torch.as_tensor(fisher, dtype=torch.float64, device=batched.device).reshape(batched.shape[0], -1, 1)
    if F.shape[1] != batched.shape[1]:
        raise ValueError(f"fisher has {F.numel()} entries but the matrix has "
                         f"{batched.shape[0] * batched.shape[1]} output rows")
    if batched.shape[1] <= batched.shape[2]:
        energies, U = torch.linalg.eigh(batched @ batched.mT)          # ascending s_i^2, u_i
        losses = energies.clamp_min(0.0) * (F * U ** 2).sum(1)
    else:
        _, V = torch.linalg.eigh(batched.mT @ batched)
        losses = (F * (batched @ V) ** 2).sum(1)                       # (M v_i)_j = s_i u_ij
    return losses.flip(-1).sum(0).cpu()


__all__ = ["layer_fisher", "output_fisher", "fisher_weighted_spectrum", "default_sensitivity_loss", "OutputProjectionLoss", "CausalLMLoss"]
