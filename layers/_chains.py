"""``producer(s) -> channel-wise ops -> consumer`` chains read from :mod:`torch.fx` graphs.

A chain is a candidate hidden-unit pair (:mod:`layers.interpolative`): the consumer's input is a
CHANNEL-WISE function of the producers' outputs and nothing else reads them. Read from the graph:

* every node from a producer to the consumer has exactly one user;
* the nodes between are element-wise activations / dropout (``nn.ReLU``, ``F.gelu``, ``x.sigmoid()``,
  multiplication by a constant, transformers' activation modules), BatchNorms and, between two convs
  only, per-channel spatial ops (pooling, upsampling) and depthwise convs of the same dimension (one
  filter per channel: MobileNet's ``1x1 -> depthwise 3x3 -> 1x1``); the BatchNorms and depthwise convs
  hold per-unit state and are kept in ``between`` (:func:`is_per_unit`: their entries are sliced with
  the units);
* or a product of two such branches (the gated MLP ``down(act(gate(x)) * up(x))``: two producers);
* producers and consumer are targeted plain layers of one family (``nn.Linear`` to ``nn.Linear``,
  ungrouped ``nn.ConvNd`` to ``nn.ConvNd`` of the same dimension), each called once in the graph.

A model that :mod:`torch.fx` cannot trace (data-dependent control flow, such as a shape check in its
``forward``) is read submodule by submodule: its largest children that do trace (a ``features``
``nn.Sequential``, an MLP block). The graph only proposes pairs: :func:`layers.interpolative.check_pairs`
verifies each on calibration data.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._accounting import CONV_TYPES
from .batchnorm import BN_TYPES

ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
                       nn.Tanh, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Softsign,
                       nn.Identity, nn.Dropout, nn.AlphaDropout)
SPATIAL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                   nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                   nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
ELEMENTWISE_FUNCTIONS = (torch.relu, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
                         torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.elu, F.celu, F.selu, F.mish, F.softplus,
                         F.hardtanh, F.dropout, torch.clamp)
SPATIAL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                     F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.interpolate)
ELEMENTWISE_METHODS = ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "contiguous")
PRODUCTS = (operator.mul, torch.mul)


def _is_activation_module(module) -> bool:
    """A transformers activation (``transformers.activations``: element-wise, parameter-free)."""
    return type(module).__module__ == "transformers.activations" and not any(True for _ in module.parameters())


class _Tracer(torch.fx.Tracer):
    """fx tracer that keeps transformers' activation modules as single nodes (their formulas reuse ``x``)."""

    def is_leaf_module(self, module, qualified_name):
        return _is_activation_module(module) or super().is_leaf_module(module, qualified_name)


def traced_graphs(model, prefix: str = "") -> list:
    """``[(prefix, module, graph)]``: ``model``'s fx graph, or those of its children (recursively) when it does
    not trace; only modules holding two or more Linear / conv layers are tried."""
    if sum(isinstance(m, (nn.Linear,) + CONV_TYPES) for m in model.modules()) < 2:
        return []
    try:
        return [(prefix, model, _Tracer().trace(model))]
    except Exception:   # noqa: BLE001 - any tracing failure means: read the children instead
        pass
    found = []
    for name, child in model.named_children():
        found.extend(traced_graphs(child, f"{prefix}{name}."))
    return found


def is_depthwise(module) -> bool:
    """A depthwise conv: one filter per channel (``groups == in_channels == out_channels > 1``)."""
    return (type(module) in CONV_TYPES and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def is_per_unit(module) -> bool:
    """A channel-wise module with per-unit state, sliced with a pair's units: a BatchNorm or a depthwise conv."""
    return isinstance(module, BN_TYPES) or is_depthwise(module)


def _family(layer):
    """``"linear"``, the conv type, or None for layers a pair cannot take."""
    if type(layer) is nn.Linear:
        return "linear"
    if type(layer) in CONV_TYPES and layer.groups == 1:
        return type(layer)
    return None


def _node_arguments(node) -> list:
    """The Node arguments of ``node`` (the tensors it reads), positional then keyword."""
    return [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, torch.fx.Node)]


def _only_node_argument(node):
    """The node's one Node argument (the tensor it transforms), or None when it reads more than one."""
    nodes = _node_arguments(node)
    return nodes[0] if len(nodes) == 1 else None


def _channelwise(node, modules, family) -> bool:
    """Whether ``node`` maps each unit (channel) of its one tensor input to the same unit of its output."""
    spatial_ok = family != "linear"
    if node.op == "call_module":
        module = modules[node.target]
        return (isinstance(module, ELEMENTWISE_MODULES + BN_TYPES) or _is_activation_module(module)
                or (spatial_ok and (isinstance(module, SPATIAL_MODULES)
                                    or (is_depthwise(module) and type(module) is family))))
    if node.op == "call_function":
        return (node.target in ELEMENTWISE_FUNCTIONS or node.target in PRODUCTS
                or (spatial_ok and node.target in SPATIAL_FUNCTIONS))
    return node.op == "call_method" and node.target in ELEMENTWISE_METHODS


class _ChainReader:
    """Walks one graph backwards from consumers to their producers (see the module docstring)."""

    def __init__(self, prefix, root, graph, targets):
        self.prefix = prefix
        self.modules = dict(root.named_modules())
        calls = [n.target for n in graph.nodes if n.op == "call_module"]
        self.called_once = {t for t in calls if calls.count(t) == 1}
        self.layers = {}
        for node in graph.nodes:
            layer = self.modules.get(node.target) if node.op == "call_module" else None
            family = _family(layer) if layer is not None else None
            if family is not None and node.target in self.called_once and prefix + node.target in targets:
                self.layers[node] = family

    def producers(self, node, family):
        """``(producers, between)`` feeding ``node`` channel-wise, or None."""
        if len(node.users) != 1:
            return None
        if node in self.layers:
            return ((node,), ()) if self.layers[node] == family else None
        if not _channelwise(node, self.modules, family):
            return None
        branches = _node_arguments(node)
        if node.op == "call_function" and node.target in PRODUCTS and len(branches) == 2:
            left, right = (self.producers(b, family) for b in branches)
            return None if left is None or right is None else (left[0] + right[0], left[1] + right[1])
        source = _only_node_argument(node)
        found = self.producers(source, family) if source is not None else None
        if found is None:
            return None
        sliced = node.op == "call_module" and is_per_unit(self.modules[node.target])
        if sliced and node.target not in self.called_once:   # its entries are sliced: no other call may read them
            return None
        return found[0], found[1] + ((node,) if sliced else ())

    def pairs(self):
        """``[(producer names, consumer name, between names)]`` of this graph, in graph order."""
        found = []
        for consumer, family in self.layers.items():
            source = _only_node_argument(consumer)
            chain = self.producers(source, family) if source is not None else None
            if chain is None or len(set(chain[0])) != len(chain[0]):
                continue
            name = lambda n: self.prefix + n.target   # noqa: E731
            found.append((tuple(name(p) for p in chain[0]), name(consumer), tuple(name(b) for b in chain[1])))
        return found


def channel_chains(model, targets) -> list:
    """``[(producer names, consumer name, between names)]``: the chains of ``model`` among ``targets``."""
    found = []
    for prefix, root, graph in traced_graphs(model):
        found.extend(_ChainReader(prefix, root, graph, set(targets)).pairs())
    return found
