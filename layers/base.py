"""The protocol every factorized layer follows, declared once (as torch's ``_ConvNd`` declares its own).

A factorized layer is an ``nn.Module`` with the call signature of the layer it replaces, and

* ``dense_config``    the constructor keywords of the original dense layer (``dim`` for convs);
* ``config``          the constructor keywords that rebuild it (for state_dict round trips):
                      ``dense_config`` + the attributes named in ``CONFIG`` + ``bias``;
* ``dense_weight()``  the reconstructed dense weight, original shape (abstract);
* ``flops_and_shape(input_shape)``  ``(MACs, output shape)`` of one forward (abstract);
* ``to_dense()``      an equivalent plain nn.Linear / nn.ConvNd (same options, dtype, device);
* ``num_params``      numbers it stores (parameters and buffers, bias included); ``dense_params`` the dense layer's;
* ``flops(shape)`` / ``dense_flops(shape)``  MACs of one forward, factorized / dense;
* ``fit``             the :class:`~layers.fit.Fit` record of the factorization that built it
                      (None for a module built directly from its constructor).

The dense layer's configuration reads as on the dense layer (``layer.in_features``, ``conv.stride``:
``dense_config``). Its ``weight`` is a :class:`layers._standin.WeightStandIn`: the dense weight's ``dtype``,
``device`` and ``shape``, and no values: computing with it raises an AttributeError that says so (and marks the
layer ``weight_read``, which ``compress`` uses to keep dense the layers a model's own code computes with the
weight of).
"""
from __future__ import annotations

import abc
import math

import torch
import torch.nn as nn

from ._accounting import layer_macs
from ._standin import dense_weight_stand_in
from .kinds import standard_type


class FactorizedLayer(nn.Module, metaclass=abc.ABCMeta):
    """Common behaviour of every factorized layer; subclasses implement ``dense_weight`` and ``flops_and_shape``."""

    #: attributes that, with ``dense_config`` and ``bias``, make up ``config``
    CONFIG: tuple = ("rank",)
    dense_config: dict
    fit = None

    def __getattr__(self, name):   # only reached when ordinary lookup fails (parameters, submodules, ...)
        dense = self.__dict__.get("dense_config", {})
        if name in dense:   # the dense layer's configuration (``conv.stride``, ``linear.in_features``) holds
            return dense[name]
        if name != "weight" or any(name in self.__dict__.get(store, ()) for store in
                                   ("_parameters", "_buffers", "_modules")):
            return super().__getattr__(name)
        # code written for the dense layer reads its weight's metadata (transformers' T5: ``wo.weight.dtype``): a
        # stand-in answers those; any other use raises and marks ``weight_read``, which ``compress`` uses to find
        # such layers on its example input and keep them dense
        return dense_weight_stand_in(self, self._no_weight_error)

    def _no_weight_error(self, what) -> AttributeError:
        return AttributeError(f"{type(self).__name__}({self.extra_repr()}) has no .weight values ({what}): it stores "
                              f"factors, and code that computes with layer.weight of the dense layer cannot use it; "
                              f"compress with example_input= keeps such layers dense (or exclude= it), and "
                              f"dense_weight() / to_dense() give the reconstructed weight (.weight.dtype, .device, "
                              f".shape answer as the dense layer's)")

    @abc.abstractmethod
    def dense_weight(self) -> torch.Tensor:
        """The reconstructed dense weight, in the original layer's shape."""

    @abc.abstractmethod
    def flops_and_shape(self, input_shape):
        """``(multiply-accumulates, output shape)`` of one forward on ``input_shape``."""

    @property
    def config(self) -> dict:
        """Constructor keywords that rebuild this module (load its state_dict into the result)."""
        return dict(**self.dense_config, **{k: getattr(self, k) for k in self.CONFIG}, bias=self.bias is not None)

    def extra_repr(self) -> str:
        shape = ", ".join(f"{k}={v!r}" for k, v in self.dense_config.items() if k in ("in_features", "out_features"))
        own = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.CONFIG)
        return ", ".join(part for part in (shape, own) if part)

    @property
    def dense_bias(self):
        return self.bias

    @property
    def dense_type(self) -> type:
        return standard_type(self.dense_config.get("dim", "linear"))

    def _dense_kwargs(self) -> dict:
        return {k: v for k, v in self.dense_config.items() if k != "dim"}

    def to_dense(self) -> nn.Module:
        """A plain dense layer computing the same function (weight reconstructed)."""
        weight = self.dense_weight()
        dense = self.dense_type(**self._dense_kwargs(), bias=self.dense_bias is not None, device=weight.device,
                                dtype=weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if self.dense_bias is not None:
                dense.bias.copy_(self.dense_bias)
        return dense

    @property
    def num_params(self) -> int:
        """Numbers the module stores: its parameters and buffers (e.g. PQ's codes), bias included."""
        return sum(p.numel() for p in self.parameters()) + sum(b.numel() for b in self.buffers())

    @property
    def dense_params(self) -> int:
        """Parameters of the dense layer this replaces (bias included)."""
        return self.dense_weight_numel() + (self.dense_bias.numel() if self.dense_bias is not None else 0)

    def dense_weight_numel(self) -> int:
        cfg = self.dense_config
        if "in_features" in cfg:
            return cfg["in_features"] * cfg["out_features"]
        return cfg["out_channels"] * (cfg["in_channels"] // cfg["groups"]) * math.prod(cfg["kernel_size"])

    def flops(self, input_shape) -> int:
        """Multiply–accumulates of one forward on ``input_shape`` (batch dim optional)."""
        return self.flops_and_shape(input_shape)[0]

    def dense_flops(self, input_shape) -> int:
        """Multiply–accumulates of the dense layer this replaces on ``input_shape``."""
        return layer_macs(self.dense_type(**self._dense_kwargs(), device="meta"), input_shape)[0]


class FactorizedChain(FactorizedLayer):
    """A factorized layer that is a chain of plain Linear/Conv stages, bias on the last.

    Subclasses register their stages as child modules in forward order.
    """

    def forward(self, x):
        for stage in self.children():
            x = stage(x)
        return x

    @property
    def bias(self):
        return list(self.children())[-1].bias

    def flops_and_shape(self, input_shape):
        total, shape = 0, tuple(input_shape)
        for stage in self.children():
            macs, shape = layer_macs(stage, shape)
            total += macs
        return total, shape

    def reset_parameters(self):
        for stage in self.children():
            stage.reset_parameters()


__all__ = ["FactorizedLayer", "FactorizedChain"]
