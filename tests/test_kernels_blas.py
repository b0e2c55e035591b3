"""The structured BLAS-3 kernels of decomp._kernels: triangular products and symmetric Grams equal the plain
matmuls they replace (up to rounding), for every shape, batch and dtype, on the CPU fast path and off it."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decomp_toolkit.decomp._kernels import symmetric_gram, times_lower_triangular


@settings(max_examples=30)
@given(m=st.integers(1, 40), n=st.integers(1, 40), batch=st.sampled_from([(), (1,), (3,)]),
       shared_factor=st.booleans(), column_major=st.booleans(), float32=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_times_lower_triangular_is_the_product_with_the_lower_triangle(m, n, batch, shared_factor, column_major,
                                                                       float32, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if float32 else torch.float64
    M = torch.randn(*batch, m, n, generator=gen, dtype=dtype)
    L = torch.randn(*(() if shared_factor else batch), n, n, generator=gen, dtype=dtype)
    if column_major:   # stored as LAPACK returns factors (e.g. torch.linalg.cholesky)
        L = L.mT.contiguous().mT
    out = times_lower_triangular(M, L)   # the strict upper part of L is not read
    expected = M.double() @ L.double().tril()
    u = 2.0 ** -24 if float32 else 2.0 ** -53
    bound = 2 * n * u * (M.double().abs() @ L.double().tril().abs()) + 1e-300
    assert out.shape == expected.shape and out.dtype == dtype
    assert bool(((out.double() - expected).abs() <= bound).all())


def test_times_lower_triangular_off_the_blas_path_is_a_matmul():
    M, L = torch.randn(4, 5, dtype=torch.float16), torch.randn(5, 5, dtype=torch.float16).tril()
    assert torch.equal(times_lower_triangular(M, L), M @ L)   # float16: no BLAS trmm, the matmul itself
    empty = torch.zeros(0, 5, dtype=torch.float64)
    assert times_lower_triangular(empty, L.double()).shape == (0, 5)


@settings(max_examples=20)
@given(rows=st.integers(0, 60), cols=st.integers(1, 30), float32=st.booleans(), seed=st.integers(0, 2 ** 16),
       of_rows=st.booleans())
def test_symmetric_gram_is_the_exactly_symmetric_product(rows, cols, float32, seed, of_rows):
    """R^T R (or R R^T with of_rows=True): exactly symmetric, each entry within the dot products' rounding bound."""
    dtype = torch.float32 if float32 else torch.float64
    R = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    G = symmetric_gram(R, of_rows=of_rows)
    A = R.double().T if of_rows else R.double()       # G = A^T A
    u = 2.0 ** -24 if float32 else 2.0 ** -53
    bound = 2 * max(A.shape[0], 1) * u * (A.abs().T @ A.abs()) + 1e-300
    assert G.dtype == dtype and G.shape == (A.shape[1], A.shape[1]) and torch.equal(G, G.T)
    assert bool(((G.double() - A.T @ A).abs() <= bound).all())
