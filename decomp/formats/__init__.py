"""Factor formats: one module per format, each holding its factor object, its reconstruction and
its parameter / size counting (the only copy). See :mod:`decomp.formats.base` for the protocol."""
from .base import Factorization
from .btd import BlockTermFactors, btd_num_params
from .cp import CPFactors, cp_num_params, cp_reconstruct
from .pq import ProductQuantized, WeightedPQFactors, code_bits_for, code_dtype, pq_decode, pq_size_bits
from .structured import CirculantFactors, LDRFactors, ToeplitzFactors
from .svd import SVDFactors, WhitenedSVDFactors, svd_num_params
from .tt import TTFactors, TTMatrixFactors, tt_matrix_num_params, tt_num_params
from .tucker import TuckerFactors, WhitenedTucker2Factors, tucker_params

__all__ = ["Factorization", "SVDFactors", "WhitenedSVDFactors", "TuckerFactors", "WhitenedTucker2Factors",
           "CPFactors", "TTFactors", "TTMatrixFactors", "BlockTermFactors", "ProductQuantized", "WeightedPQFactors",
           "ToeplitzFactors", "CirculantFactors", "LDRFactors",
           "svd_num_params", "tucker_params", "cp_num_params", "tt_num_params", "tt_matrix_num_params",
           "btd_num_params", "pq_size_bits", "code_bits_for", "code_dtype", "pq_decode", "cp_reconstruct"]
