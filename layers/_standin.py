"""What ``.weight`` of a factorized layer is: its dense weight's metadata, and nothing to compute with.

Code written for a dense layer often reads ``layer.weight`` only for its metadata (transformers'
CLIP embeddings cast the pixels to ``patch_embedding.weight.dtype``, T5 casts to
``wo.weight.dtype``, generation code reads ``lm_head.weight.device``). A factorized layer
stores factors, not a weight, so ``layer.weight`` is a :class:`WeightStandIn`: ``dtype``,
``device``, ``shape`` (the dense weight's), ``ndim``, ``requires_grad``, ``size()``, ``dim()``,
``numel()`` ... answer as the dense weight would; any other use (an attribute, an operator,
a torch function) raises the error that says why, and marks the owner ``weight_read`` (the
flag ``compress`` uses to keep such layers dense on its example input).

``WeightStandIn(tensor=..., on_use=...)`` is the probe form used while checking which layers a
model's code reads the weight of: metadata as the tensor's; any other use calls ``on_use()``
and then runs on the real tensor, so the probing forward computes what it computed.
"""
from __future__ import annotations

import torch

METADATA = ("dtype", "device", "shape", "ndim", "requires_grad", "is_cuda", "is_meta", "is_sparse", "layout")
METADATA_METHODS = ("size", "dim", "numel", "is_floating_point", "is_complex", "element_size", "get_device")
_OPERATORS = ("add", "radd", "sub", "rsub", "mul", "rmul", "matmul", "rmatmul", "truediv", "rtruediv", "pow",
              "neg", "getitem", "setitem", "iter", "len", "float", "int", "bool", "array", "dlpack")


class WeightStandIn:
    """``.weight`` of a factorized layer (module docstring): the dense weight's metadata, no values."""

    __slots__ = ("_meta", "_tensor", "_on_use", "_explain")

    def __init__(self, meta=None, *, tensor=None, on_use=None, explain=None):
        """``meta``: ``(shape, dtype, device, requires_grad)`` of the dense weight (stand-in form), or ``tensor``:
        the real weight (probe form); ``on_use()`` is called on any non-metadata use; ``explain(what)`` returns
        the error raised then (stand-in form)."""
        self._meta, self._tensor, self._on_use, self._explain = meta, tensor, on_use, explain

    def _metadata(self, name):
        if self._tensor is not None:
            return getattr(self._tensor, name)
        shape, dtype, device, requires_grad = self._meta
        values = dict(dtype=dtype, device=device, shape=shape, ndim=len(shape), requires_grad=requires_grad,
                      is_cuda=device.type == "cuda", is_meta=device.type == "meta", is_sparse=False,
                      layout=torch.strided)
        if name in values:
            return values[name]
        methods = dict(size=lambda dim=None: shape if dim is None else shape[dim], dim=lambda: len(shape),
                       numel=shape.numel, is_floating_point=lambda: dtype.is_floating_point,
                       is_complex=lambda: dtype.is_complex, element_size=lambda: dtype.itemsize,
                       get_device=lambda: device.index if device.type != "cpu" else -1)
        return methods[name]

    def _used(self, what):
        if self._on_use is not None:
            self._on_use()
        if self._tensor is None:
            raise self._explain(what)
        return self._tensor

    def __getattr__(self, name):
        if name.startswith("_"):   # an unset slot (copy, pickle, tracers building the object): not a use
            raise AttributeError(name)
        if name in METADATA or name in METADATA_METHODS:
            return self._metadata(name)
        return getattr(self._used(f".weight.{name}"), name)

    def __repr__(self):
        if self._tensor is not None:
            return repr(self._tensor)
        return f"WeightStandIn(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}: no values)"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        swap = lambda value: value._used(f"{getattr(func, '__name__', func)}(.weight)") \
            if isinstance(value, WeightStandIn) else value  # noqa: E731
        args = tuple(swap(a) for a in args)
        kwargs = {k: swap(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _operator(name):
    def use(self, *args):
        return getattr(self._used(f".weight.__{name}__"), f"__{name}__")(*args)
    use.__name__ = f"__{name}__"
    return use


for _name in _OPERATORS:
    setattr(WeightStandIn, f"__{_name}__", _operator(_name))


def dense_weight_stand_in(layer, explain) -> WeightStandIn:
    """The :class:`WeightStandIn` of factorized ``layer`` (a FactorizedLayer): the dense weight's shape (worked out
    once per layer), the dtype, device and requires_grad of its first floating-point parameter; ``explain(what)``
    builds the error of a use."""
    shape = layer.__dict__.get("_dense_weight_shape")
    if shape is None:
        shape = layer.dense_type(**layer._dense_kwargs(), bias=False, device="meta").weight.shape
        layer.__dict__["_dense_weight_shape"] = shape
    floating = next((p for p in layer.parameters() if p.is_floating_point()), None)
    if floating is None:
        meta = (shape, torch.get_default_dtype(), torch.device("cpu"), False)
    else:
        meta = (shape, floating.dtype, floating.device, floating.requires_grad)
    return WeightStandIn(meta, on_use=lambda: layer.__dict__.__setitem__("weight_read", True), explain=explain)
