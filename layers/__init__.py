"""torch.nn adapters built on :mod:`decomp`: factorized layers, ``decompose``, ``compress``,
calibration for data-aware decomposition, and distillation."""
from .base import FactorizedChain, FactorizedLayer
from .btd import BlockTermConv
from .calibrate import Calibration, calibrate
from .compress import compress
from .cp import CPConv
from .decompose import decompose
from .finetune import finetune
from .lowrank import LowRankConv, LowRankLinear, SpatialLowRankConv
from .pq import PQConv, PQLinear
from .registry import available_methods, register, register_budget_profile
from .report import LayerRecord, Report
from .speed import SlowerThanDenseWarning
from .structured import CirculantLinear, LDRLinear, ToeplitzLinear
from .tt import TTLinear
from .tucker import TuckerConv

__all__ = [
    "decompose", "compress", "calibrate", "Calibration", "finetune", "Report", "LayerRecord",
    "available_methods", "register", "register_budget_profile", "SlowerThanDenseWarning",
    "FactorizedLayer", "FactorizedChain", "LowRankLinear", "LowRankConv", "SpatialLowRankConv", "TuckerConv",
    "CPConv", "TTLinear", "BlockTermConv", "PQLinear", "PQConv", "ToeplitzLinear", "CirculantLinear", "LDRLinear",
]
