"""Pure decomposition core: arrays in (numpy or torch), factor objects out; no layer modules.

One function per method, ``f(A, rank, *, ...)``; every result follows the protocol of
:mod:`decomp.formats.base` (``to_tensor()``, ``num_params``, ``shape``, ``rank``, ``error``,
``error_bound``, ``norm``) and every method takes the rank specification of :mod:`decomp.rank`.
Layout: :mod:`decomp.formats` holds one module per format (the factor object, its
reconstruction and its parameter counting); one module per method beside it
(``svd``, ``whitened``, ``tucker``, ``cp``, ``tt``, ``btd``, ``pq``, ``structured``, ``data_aware``,
``interpolative``: column selection with a least-squares refit, whose result is a column subset and
an ``InterpolativeFit``, not a factor format);
``_kernels`` the shared tensor kernels; :mod:`decomp.interop` the tensorly conversions.
Vocabulary: ``algorithm=`` the variant of a method, ``convergence_tol=`` the stopping
tolerance of an iteration (``tol=`` is always the rank spec's error target), ``n_iter_max=``
ALS / HOOI sweeps, ``n_iter=`` power iterations and k-means steps, ``random_state=`` the seed
(None = seed 0, see :func:`decomp._backend.make_generator`).
"""
from .btd import btd
from .cp import cp
from .data_aware import output_sq_error, weighted_pq, whitened_tucker2
from .formats import (BlockTermFactors, CirculantFactors, CPFactors, Factorization, LDRFactors, ProductQuantized,
                      SVDFactors, ToeplitzFactors, TTFactors, TTMatrixFactors, TuckerFactors, WeightedPQFactors,
                      WhitenedSVDFactors, WhitenedTucker2Factors, btd_num_params, cp_num_params, pq_size_bits,
                      svd_num_params, tt_matrix_num_params, tt_num_params, tucker_params)
from .interop import from_tensorly, to_tensorly
from .pq import kmeans, pq
from .rank import RankSpec, parse_rank_spec, rank_for_energy, rank_for_tol, select_rank, vbmf_rank
from .structured import circulant, ldr, toeplitz
from .svd import randomized_svd, svd
from .tt import balanced_factorization, tt, tt_matrix, tt_round
from .tucker import tucker
from .whitened import whitened_svd
from .asymmetric import AsymmetricFit, asymmetric_svd
from .interpolative import InterpolativeFit, greedy_columns, interpolative_fit

__all__ = [
    # methods
    "svd", "randomized_svd", "whitened_svd", "asymmetric_svd", "AsymmetricFit", "tucker", "cp", "tt", "tt_matrix",
    "tt_round", "btd", "pq", "kmeans", "interpolative_fit", "InterpolativeFit", "greedy_columns",
    "toeplitz", "circulant", "ldr", "whitened_tucker2", "weighted_pq", "output_sq_error",
    # factor objects
    "Factorization", "SVDFactors", "WhitenedSVDFactors", "TuckerFactors", "WhitenedTucker2Factors", "CPFactors",
    "TTFactors", "TTMatrixFactors", "BlockTermFactors", "ProductQuantized", "WeightedPQFactors", "ToeplitzFactors",
    "CirculantFactors", "LDRFactors",
    # tensorly interop
    "to_tensorly", "from_tensorly",
    # rank selection and accounting
    "RankSpec", "parse_rank_spec", "rank_for_energy", "rank_for_tol", "select_rank", "vbmf_rank",
    "svd_num_params", "tucker_params", "cp_num_params", "tt_num_params", "tt_matrix_num_params", "btd_num_params",
    "balanced_factorization", "pq_size_bits",
]
