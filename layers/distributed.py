"""Data-parallel calibration with ``torch.distributed``: each rank sees its shard of the data.

* :func:`all_reduce_calibration` sums a :class:`~layers.calibrate.Calibration` (Grams, row sums,
  sample and batch counts) over the ranks in place, so every rank holds the statistics of the
  whole calibration set: ``compress(model, calibration=cal)`` then gives the same model on
  every rank as one process calibrated on all the shards (to rounding of the sums).
* :func:`layers.sequential.compress_sequential` all-reduces its statistics itself and splits
  the per-layer fits across the ranks (each layer fitted by one rank, factors broadcast).

Without an initialised process group (or with one rank) both are plain single-process runs.
"""
from __future__ import annotations

import copy

import torch

from .calibrate import Calibration


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is initialised."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_calibration(calibration: Calibration) -> Calibration:
    """Sum ``calibration`` over the ranks (in place; returned). Every rank must have calibrated the same layers.

    The Grams, sums, row counts and row-correlation sums (hence the effective sample sizes) are
    summed. ``Calibration.fisher`` (``calibrate(fisher=True)``) is not touched: calibrate already sums
    it over the ranks (its backward pass runs on every rank at once)."""
    if not isinstance(calibration, Calibration):
        raise TypeError(f"all_reduce_calibration: expected a Calibration, got {type(calibration).__name__}")
    if not is_distributed():
        return calibration
    import torch.distributed as dist
    names = sorted(calibration.grams)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, names)
    if any(g != names for g in gathered):
        raise ValueError("all_reduce_calibration: the ranks calibrated different layers; every rank must run the "
                         "same layers= on its shard")
    for name in names:
        dist.all_reduce(calibration.grams[name])
        dist.all_reduce(calibration.sums[name])
    counts = torch.tensor([float(calibration.samples[n]) for n in names] + [float(calibration.batches)],
                          dtype=torch.float64)
    dist.all_reduce(counts)
    for name, value in zip(names, counts[:-1].tolist()):
        calibration.samples[name] = int(value)
    calibration.batches = int(counts[-1])
    _combine_correlations(calibration, names)
    return calibration


def _combine_correlations(calibration: Calibration, names) -> None:
    """Every rank's row-correlation sums of each layer (``Calibration.correlation``, the effective
    sample size's input), added in rank order on every rank: the sums of all the shards."""
    import torch.distributed as dist
    mine = {name: calibration.correlation.get(name) for name in names}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    for name in names:
        parts = [rank_sums[name] for rank_sums in gathered if rank_sums.get(name) is not None]
        if not parts:
            continue
        total = copy.deepcopy(parts[0])
        for part in parts[1:]:
            total.add(part)
        calibration.correlation[name] = total


__all__ = ["all_reduce_calibration", "is_distributed"]
