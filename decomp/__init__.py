"""Pure decomposition core: arrays in (numpy or torch), factor objects out. No torch.nn."""
from .factors import Factorization, SVDFactors
from .rank import RankSpec, parse_rank_spec, rank_for_energy, rank_for_tol, select_rank, vbmf_rank
from .svd import randomized_svd, svd

__all__ = [
    "Factorization", "SVDFactors", "RankSpec", "parse_rank_spec", "rank_for_energy", "rank_for_tol",
    "select_rank", "vbmf_rank", "svd", "randomized_svd",
]

from .factors import CirculantFactors, LDRFactors, ProductQuantized, ToeplitzFactors  # noqa: E402
from .pq import kmeans, pq, pq_size_bits  # noqa: E402
from .structured import circulant, ldr, toeplitz  # noqa: E402

__all__ += ["ProductQuantized", "ToeplitzFactors", "CirculantFactors", "LDRFactors", "pq", "kmeans",
            "pq_size_bits", "toeplitz", "circulant", "ldr"]

from .factors import TTFactors, TTMatrixFactors, TuckerFactors  # noqa: E402
from .tt import balanced_factorization, tt, tt_matrix, tt_matrix_num_params, tt_num_params, tt_round  # noqa: E402
from .tucker import tucker, tucker_params  # noqa: E402

__all__ += ["TuckerFactors", "TTFactors", "TTMatrixFactors", "tucker", "tucker_params", "tt", "tt_round",
            "tt_matrix", "tt_num_params", "tt_matrix_num_params", "balanced_factorization"]

from .btd import btd  # noqa: E402
from .cp import cp  # noqa: E402
from .factors import BlockTermFactors, CPFactors  # noqa: E402

__all__ += ["CPFactors", "BlockTermFactors", "cp", "btd"]

from .whitened import WhitenedSVDFactors, whitened_svd  # noqa: E402

__all__ += ["WhitenedSVDFactors", "whitened_svd"]
