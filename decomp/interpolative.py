"""Column selection with a least-squares refit: the interpolative fit of a layer's inputs.

A consumer layer ``y = W h`` whose input ``h`` is a channel-wise function of a producer's
outputs (``h = act(P x)``, a transformer MLP's hidden units, or ``act(G x) * (U x)`` for a
gated one) can be shrunk by keeping a subset ``S`` of the hidden units: the producers keep
the rows ``S`` of their weights and the consumer gets a refitted ``W' (m, |S|)``:

    min over |S| = k, W'   ||Y - X_S W'^T||_F ,     Y = X0 W^T

``X (N, n)``: the inputs the consumer receives (in a partly compressed model), ``X0`` the
ones it received in the original model, ``X_S`` the columns ``S`` of ``X``. For a fixed ``S``
the optimum is the least-squares solution ``W'^T = (X_S^T X_S)^{-1} X_S^T Y``; ``S`` is
chosen greedily (forward selection: at each step the column whose addition explains the most
of ``Y``'s remaining energy, computed exactly). Everything is computed from the Grams
``X^T X`` (n, n) and ``X^T Y`` (n, m) alone, in float64; the error of the returned fit is the
exact identity, for any ``B = W'^T``,

    ||Y - X_S B||_F^2 = ||Y||_F^2 - 2 <B, X_S^T Y> + <B, X_S^T X_S B>

so ``InterpolativeFit.error`` is certified on the calibration data (not an estimate).
Unlike a low-rank factorization the result is a smaller dense layer pair: its FLOP saving is
realized by the plain matmul kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .rank import InfeasibleRankError

PIVOT_FLOOR = 1e-12   # a column whose residual variance is below PIVOT_FLOOR x the largest diagonal is never picked


@dataclass
class InterpolativeFit:
    """The kept columns ``indices`` (ascending, ``(k,)`` int64), the refitted ``weight (m, k)``, the output
    ``error = ||Y - X_S W'^T||_F`` and ``norm = ||Y||_F`` (float64 scalars) on the calibration rows;
    ``independent``: how many of the kept groups the greedy selection chose (the others, when the
    calibration data span fewer groups than asked, are the most energetic of the rest: they add nothing
    on those data)."""

    indices: torch.Tensor
    weight: torch.Tensor
    error: float
    norm: float
    independent: int = 0

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0


def greedy_columns(gram: torch.Tensor, target_cross: torch.Tensor, k: int, context: str = "",
                   strict: bool = True, group: int = 1, ridge: float = 0.0) -> tuple:
    """``(indices, gains)``: ``k`` groups of ``group`` consecutive columns of ``X`` chosen by forward
    selection for ``min ||Y - X_S B||_F`` (``group=1``: single columns; a conv's input channel is the
    group of its ``kh * kw`` im2col columns).

    ``gram = X^T X (n, n)``, ``target_cross = X^T Y (n, m)``, ``n`` a multiple of ``group``.
    ``indices``: the chosen groups (ascending, group numbers in ``[0, n / group)``). ``gains (k, m)``:
    row ``t`` is the energy each column of ``Y`` loses from its residual at step ``t`` (pick order;
    >= 0; the residual after ``t`` steps is ``||Y||^2 - gains[:t].sum()``). A partial block Cholesky of
    ``gram`` on the chosen groups is kept; the residual cross-product ``C = X^T (Y - Y_S)`` and the
    residual Gram blocks ``D_g`` give each candidate's gain ``||R_g^{-1} C_g||^2`` (``R_g R_g^T = D_g``)
    exactly. With ``floor = PIVOT_FLOOR * max(diag(gram))``: groups whose residual variances are all
    below ``floor`` (dead or already spanned) are never chosen, and ``floor * I`` is added to each
    residual block (a group partly spanned by the chosen ones is scored on its new directions); if
    fewer than ``k`` groups remain, :class:`decomp.rank.InfeasibleRankError` (``strict=False``: stop
    there and return fewer).
    """
    gram, residual = gram.double(), target_cross.double().clone()
    n, groups = gram.shape[0], gram.shape[0] // group
    if not 1 <= k <= groups:
        raise InfeasibleRankError(f"{context or 'greedy_columns'}: cannot keep {k} of {groups} "
                                  f"{'columns' if group == 1 else 'column groups'}; pass 1 <= k <= {groups}")
    floor = PIVOT_FLOOR * float(gram.diagonal().max().clamp(min=0))
    penalty = ridge_penalty(gram, ridge)
    gram = gram + penalty * torch.eye(n, dtype=gram.dtype, device=gram.device) if penalty else gram
    blocks = gram.reshape(groups, group, groups, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1).clone()
    factor = torch.zeros(n, k * group, dtype=torch.float64, device=gram.device)
    chosen = torch.zeros(groups, dtype=torch.bool, device=gram.device)
    picked, gains = [], []
    for step in range(k):
        roots, usable = _block_roots(blocks, chosen, floor)
        if not bool(usable.any()):
            if not strict:
                break
            raise InfeasibleRankError(f"{context or 'greedy_columns'}: only {step} of the {groups} "
                                      f"{'columns' if group == 1 else 'column groups'} are linearly independent on "
                                      f"the calibration data; {k} were asked")
        whitened = torch.linalg.solve_triangular(roots, residual.reshape(groups, group, -1), upper=False)
        g = int(torch.argmax(torch.where(usable, whitened.square().sum((1, 2)), -1.0)))
        cols = slice(g * group, (g + 1) * group)
        done = step * group
        column = torch.linalg.solve_triangular(roots[g], (gram[:, cols] - factor[:, :done] @ factor[cols, :done].T).T,
                                               upper=False).T                       # (n, group)
        projected = whitened[g]                                                     # (group, m)
        residual -= column @ projected
        part = column.reshape(groups, group, group)
        blocks -= part @ part.transpose(1, 2)
        factor[:, done:done + group] = column
        chosen[g] = True
        picked.append(g)
        gains.append(projected.square().sum(0))
    gains = torch.stack(gains) if gains else torch.zeros(0, residual.shape[1], dtype=torch.float64)
    return torch.tensor(sorted(picked), dtype=torch.int64), gains


def ridge_penalty(gram, ridge: float) -> float:
    """The absolute ridge ``ridge * mean(diag(gram))`` (``ridge`` is relative to the mean input energy)."""
    return float(ridge) * float(gram.diagonal().mean().clamp(min=0)) if ridge else 0.0


def _block_roots(blocks, chosen, floor):
    """``(roots, usable)``: the Cholesky factor of each residual block ``(groups, s, s)`` (plus ``floor * I``
    where the block is singular; identity where even that fails) and which unchosen groups keep a residual variance above ``floor`` in at
    least one of their columns (a group partly spanned by the chosen ones stays usable: the ridge
    ``floor`` keeps its factor finite)."""
    eye = torch.eye(blocks.shape[1], dtype=blocks.dtype, device=blocks.device)
    roots, info = torch.linalg.cholesky_ex(blocks)
    if bool((info != 0).any()):   # the ridge only where a block is singular: elsewhere the factor stays exact
        ridged, info_ridged = torch.linalg.cholesky_ex(blocks + floor * eye)
        roots = torch.where((info != 0)[:, None, None], ridged, roots)
        info = torch.where(info != 0, info_ridged, info)
    alive = blocks.diagonal(dim1=1, dim2=2).amax(1) > floor
    usable = (~chosen) & (info == 0) & alive
    return torch.where(usable[:, None, None], roots, eye), usable


def interpolative_fit(gram: torch.Tensor, target_cross: torch.Tensor, target_energy: float, k: int,
                      context: str = "", group: int = 1, ridge: float = 0.0) -> InterpolativeFit:
    """The interpolative fit keeping ``k`` of the ``n / group`` column groups (see module docstring).

    ``gram = X^T X (n, n)``, ``target_cross = X^T Y (n, m)``, ``target_energy = ||Y||_F^2``. Returns the
    kept group ``indices`` (``k`` of them even when the data span fewer: see
    :class:`InterpolativeFit`), ``weight = W' (m, k * group)`` (``Y ~ X_S W'^T``, ``S`` the kept groups'
    columns in order) and the calibration error of ``B = W'^T``, the least-squares solution with the
    ridge ``PIVOT_FLOOR * max(diag(gram))`` (which keeps partly dependent kept columns finite):
    ``sqrt(||Y||^2 - 2 <B, X_S^T Y> + <B, X_S^T X_S B>)``, an identity for any ``B`` (clamped at 0
    against rounding).
    """
    indices, _ = greedy_columns(gram, target_cross, k, context=context, group=group, strict=False, ridge=ridge)
    independent = len(indices)
    if independent < k:   # the rest carry nothing the chosen ones do not: keep the most energetic of them
        energy = gram.diagonal().reshape(-1, group).sum(1).clone()
        energy[indices] = -1.0
        indices = torch.cat([indices, torch.argsort(energy, descending=True)[: k - independent].cpu()]).sort().values
    columns = group_columns(indices, group).to(gram.device)
    kept, cross = gram.double()[columns][:, columns], target_cross.double()[columns]
    penalty = max(ridge_penalty(gram, ridge), PIVOT_FLOOR * float(gram.diagonal().max().clamp(min=0)))
    solution = torch.linalg.solve(kept + penalty * torch.eye(len(columns), dtype=torch.float64, device=gram.device),
                                  cross)                                          # (k * group, m)
    weight = solution.T.contiguous()
    return InterpolativeFit(indices=indices, weight=weight,
                            error=selection_error(gram, target_cross, target_energy, indices, weight, group),
                            norm=max(float(target_energy), 0.0) ** 0.5, independent=independent)


def group_columns(indices: torch.Tensor, group: int = 1) -> torch.Tensor:
    """The columns ``(k * group,)`` of the column groups ``indices (k,)`` (``group`` consecutive columns each)."""
    return (indices[:, None] * group + torch.arange(group, device=indices.device)).reshape(-1)


def selection_error(gram: torch.Tensor, target_cross: torch.Tensor, target_energy: float, indices: torch.Tensor,
                    weight: torch.Tensor, group: int = 1) -> float:
    """``||Y - X_S W'^T||_F`` for any ``weight = W' (m, k * group)`` on the kept groups ``indices``, from the
    statistics ``gram = X^T X``, ``target_cross = X^T Y`` and ``target_energy = ||Y||_F^2`` (the identity of the
    module docstring; clamped at 0 against rounding)."""
    columns = group_columns(indices, group).to(gram.device)
    B = weight.double().T
    kept, cross = gram.double()[columns][:, columns], target_cross.double()[columns]
    energy = float(target_energy) - 2 * float((B * cross).sum()) + float((B * (kept @ B)).sum())
    return max(energy, 0.0) ** 0.5
