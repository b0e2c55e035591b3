"""Pure decomposition core: arrays in (numpy or torch), factor objects out; no layer modules.

One function per method; every result follows the protocol of :mod:`decomp.factors`
(``to_tensor()``, ``num_params``, ``shape``, ``rank``, ``error_bound``) and every method
takes the rank specification of :mod:`decomp.rank`.
"""
from .btd import btd
from .cp import cp
from .data_aware import output_sq_error, weighted_pq, whitened_tucker2
from .factors import (BlockTermFactors, CirculantFactors, CPFactors, Factorization, LDRFactors, ProductQuantized,
                      SVDFactors, ToeplitzFactors, TTFactors, TTMatrixFactors, TuckerFactors)
from .pq import kmeans, pq, pq_size_bits
from .rank import RankSpec, parse_rank_spec, rank_for_energy, rank_for_tol, select_rank, vbmf_rank
from .structured import circulant, ldr, toeplitz
from .svd import randomized_svd, svd
from .tt import balanced_factorization, tt, tt_matrix, tt_matrix_num_params, tt_num_params, tt_round
from .tucker import tucker, tucker_params
from .whitened import WhitenedSVDFactors, whitened_svd

__all__ = [
    # methods
    "svd", "randomized_svd", "whitened_svd", "tucker", "cp", "tt", "tt_matrix", "tt_round", "btd", "pq", "kmeans",
    "toeplitz", "circulant", "ldr", "whitened_tucker2", "weighted_pq", "output_sq_error",
    # factor objects
    "Factorization", "SVDFactors", "WhitenedSVDFactors", "TuckerFactors", "CPFactors", "TTFactors",
    "TTMatrixFactors", "BlockTermFactors", "ProductQuantized", "ToeplitzFactors", "CirculantFactors", "LDRFactors",
    # rank selection and accounting
    "RankSpec", "parse_rank_spec", "rank_for_energy", "rank_for_tol", "select_rank", "vbmf_rank",
    "tucker_params", "tt_num_params", "tt_matrix_num_params", "balanced_factorization", "pq_size_bits",
]
