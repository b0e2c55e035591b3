"""torch.nn adapters built on :mod:`decomp`: factorized layers, ``decompose`` and ``compress``."""
from .base import FactorizedChain, FactorizedLayer
from .compress import compress
from .decompose import decompose
from .report import LayerRecord, Report
from .lowrank import LowRankConv, LowRankLinear, SpatialLowRankConv
from .registry import available_methods, register

__all__ = [
    "FactorizedLayer", "FactorizedChain", "decompose", "compress", "Report", "LayerRecord", "available_methods", "register",
    "LowRankLinear", "LowRankConv", "SpatialLowRankConv",
]

from .pq import PQConv, PQLinear  # noqa: E402
from .structured import CirculantLinear, LDRLinear, ToeplitzLinear  # noqa: E402

__all__ += ["PQLinear", "PQConv", "ToeplitzLinear", "CirculantLinear", "LDRLinear"]

from .calibrate import Calibration, calibrate  # noqa: E402
from .finetune import finetune  # noqa: E402

__all__ += ["Calibration", "calibrate", "finetune"]

from .btd import BlockTermConv  # noqa: E402
from .cp import CPConv  # noqa: E402
from .speed import SlowerThanDenseWarning  # noqa: E402
from .tt import TTLinear  # noqa: E402
from .tucker import TuckerConv  # noqa: E402

__all__ += ["TuckerConv", "CPConv", "TTLinear", "BlockTermConv", "SlowerThanDenseWarning"]
