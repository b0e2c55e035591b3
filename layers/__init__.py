"""torch.nn adapters built on :mod:`decomp`: factorized layers, ``decompose``, ``compress``,
calibration for data-aware decomposition, and distillation."""
from ._accounting import count_params, layer_macs
from .base import FactorizedChain, FactorizedLayer
from .btd import BlockTermConv
from .calibrate import Calibration, calibrate
from .compress import compress
from .cp import CPConv
from .decompose import WorseThanZeroWarning, check_request, decompose
from .errors import UnsupportedLayerError
from .finetune import finetune
from .recover import recover
from .sequential import compress_sequential
from .fit import Fit
from .kinds import LayerKind, kind_of, layer_kind, register_layer_kind
from .lowrank import LowRankConv, LowRankLinear, SpatialLowRankConv
from .pq import PQConv, PQLinear
from .registry import MethodEntry, available_methods, method_table, register, register_budget_profile
from .report import LayerRecord, Report
from .serialize import CompressedModelError, load_compressed, load_report, save_compressed
from .speed import SlowerThanDenseWarning
from .structured import CirculantLinear, LDRLinear, ToeplitzLinear
from .tt import TTLinear
from .tucker import TuckerConv



def _import_method_modules():
    """Import every public module of this package, so a method module added here registers itself
    (a new method is one module with its ``@register``: nothing else to edit)."""
    import pkgutil
    from importlib import import_module
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            import_module(f"{__name__}.{info.name}")


_import_method_modules()
decompose.__doc__ = decompose.__doc__.replace("{methods}", "\n    ".join(method_table().splitlines()))

__all__ = [
    "decompose", "compress", "save_compressed", "load_compressed", "load_report", "CompressedModelError",
    "calibrate", "Calibration", "finetune", "compress_sequential", "recover", "Report", "LayerRecord",
    "available_methods", "register", "register_budget_profile", "SlowerThanDenseWarning", "WorseThanZeroWarning",
    "MethodEntry", "method_table", "check_request", "UnsupportedLayerError", "Fit", "LayerKind", "register_layer_kind",
    "kind_of", "layer_kind", "count_params", "layer_macs",
    "FactorizedLayer", "FactorizedChain", "LowRankLinear", "LowRankConv", "SpatialLowRankConv", "TuckerConv",
    "CPConv", "TTLinear", "BlockTermConv", "PQLinear", "PQConv", "ToeplitzLinear", "CirculantLinear", "LDRLinear",
]
