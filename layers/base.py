"""Base classes shared by every factorized layer.

A factorized layer is an ``nn.Module`` with the call signature of the layer it
replaces, and

* ``to_dense()``      an equivalent plain nn.Linear / nn.ConvNd (same options, dtype, device);
* ``num_params``      parameters it stores (bias included);
* ``flops(shape)``    multiply–accumulates of one forward on an input of that shape;
* ``config``          the constructor keywords that rebuild it (for state_dict round trips);
* ``dense_config``    the constructor keywords of the original dense layer.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._accounting import layer_macs

DENSE_TYPES = {"linear": nn.Linear, 1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class FactorizedLayer(nn.Module):
    """Common behaviour; subclasses implement ``dense_weight()`` and ``flops_and_shape``."""

    def dense_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def dense_bias(self):
        return self.bias

    @property
    def dense_type(self) -> type:
        return DENSE_TYPES[self.dense_config.get("dim", "linear")]

    def to_dense(self) -> nn.Module:
        """A plain dense layer computing the same function (weight reconstructed)."""
        kwargs = {k: v for k, v in self.dense_config.items() if k != "dim"}
        weight = self.dense_weight()
        dense = self.dense_type(**kwargs, bias=self.dense_bias is not None, device=weight.device,
                                dtype=weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if self.dense_bias is not None:
                dense.bias.copy_(self.dense_bias)
        return dense

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def dense_params(self) -> int:
        """Parameters of the dense layer this replaces (bias included)."""
        weight_params = self.dense_weight_numel()
        return weight_params + (self.dense_bias.numel() if self.dense_bias is not None else 0)

    def dense_weight_numel(self) -> int:
        cfg = self.dense_config
        if "in_features" in cfg:
            return cfg["in_features"] * cfg["out_features"]
        kernel = 1
        for k in cfg["kernel_size"]:
            kernel *= k
        return cfg["out_channels"] * (cfg["in_channels"] // cfg["groups"]) * kernel

    def flops(self, input_shape) -> int:
        """Multiply–accumulates of one forward on ``input_shape`` (batch dim optional)."""
        return self.flops_and_shape(input_shape)[0]

    def dense_flops(self, input_shape) -> int:
        """Multiply–accumulates of the dense layer this replaces on ``input_shape``."""
        return layer_macs(self.dense_type(**{k: v for k, v in self.dense_config.items() if k != "dim"},
                                          device="meta"), input_shape)[0]


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
