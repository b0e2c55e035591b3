"""tensorly interop: every format tensorly has converts both ways exactly, and our CP / Tucker / TT /
TT-matrix fits are at least as accurate as tensorly's at the same rank (small slack for local optima)."""
import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import parafac, tensor_train, tensor_train_matrix
from tensorly.decomposition import tucker as tl_tucker

from decomp_toolkit.decomp import (CPFactors, TTFactors, TTMatrixFactors, TuckerFactors, cp, from_tensorly, pq,
                                   to_tensorly, tt, tt_matrix, tucker)


def low_rank_plus_noise(shape, rank, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=gen, dtype=torch.float64) for n in shape]
    signal = torch.einsum("ir,jr,kr->ijk", *factors)
    return signal + noise * float(signal.norm()) / signal.numel() ** 0.5 * torch.randn(shape, generator=gen,
                                                                                     dtype=torch.float64)


def fro(x):
    return float(np.linalg.norm(np.asarray(x).ravel()))


@pytest.mark.parametrize("seed", [0, 1])
def test_cp_matches_or_beats_tensorly(seed):
    A = low_rank_plus_noise((9, 8, 7), 4, 0.1, seed)
    ours = cp(A, rank=4, n_iter_max=200)
    theirs = parafac(A.numpy(), 4, n_iter_max=200, init="svd", tol=1e-10)
    their_error = fro(A.numpy() - tl.cp_to_tensor(theirs))
    assert ours.error <= their_error * (1 + 1e-3) + 1e-12
    assert ours.error == pytest.approx(fro(A - ours.to_tensor()), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_tucker_matches_or_beats_tensorly(seed):
    A = low_rank_plus_noise((10, 9, 8), 3, 0.3, seed)
    ours = tucker(A, rank=(4, 3, 3))
    theirs = tl_tucker(A.numpy(), rank=[4, 3, 3], n_iter_max=100, tol=1e-10)
    their_error = fro(A.numpy() - tl.tucker_to_tensor(theirs))
    assert ours.error <= their_error * (1 + 1e-3) + 1e-12
    assert fro(A - ours.to_tensor()) <= ours.error_bound * (1 + 1e-9)


def test_tt_and_tt_matrix_match_tensorly():
    A = low_rank_plus_noise((6, 5, 7), 3, 0.2, 2)
    ours = tt(A, rank=3)
    theirs = tensor_train(A.numpy(), rank=[1, 3, 3, 1])
    assert ours.error <= fro(A.numpy() - tl.tt_to_tensor(theirs)) * (1 + 1e-9) + 1e-12
    W = torch.randn(12, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours_m = tt_matrix(W, rank=4, out_shape=(3, 4), in_shape=(4, 5))
    theirs_m = tensor_train_matrix(W.numpy().reshape(3, 4, 4, 5), rank=[1, 4, 1])
    assert ours_m.error <= fro(W.numpy() - tl.tt_matrix_to_matrix(theirs_m)) * (1 + 1e-9) + 1e-12


def test_conversions_round_trip_exactly():
    A = low_rank_plus_noise((6, 5, 4), 2, 0.1, 4)
    W = A.reshape(6, 20)
    fits = [cp(A, rank=3), tucker(A, rank=2), tucker(A, rank=(3, 2), modes=(0, 2)), tt(A, rank=2),
            tt_matrix(W, rank=3, out_shape=(3, 2), in_shape=(4, 5))]
    reconstruct = {CPFactors: tl.cp_to_tensor, TuckerFactors: tl.tucker_to_tensor, TTFactors: tl.tt_to_tensor,
                   TTMatrixFactors: tl.tt_matrix_to_matrix}
    for f in fits:
        theirs = to_tensorly(f)
        np.testing.assert_allclose(reconstruct[type(f)](theirs), f.to_tensor().numpy(), rtol=0, atol=1e-13)
        back = from_tensorly(theirs, reference=f.to_tensor())
        assert type(back) is type(f) and back.rank == f.rank and back.num_params == f.num_params
        np.testing.assert_allclose(back.to_tensor(), f.to_tensor().numpy(), rtol=0, atol=1e-13)
        assert back.error <= 1e-12 * back.norm and back.error_bound is None
    cp_f = fits[0]
    again = CPFactors.from_tensorly(cp_f.to_tensorly())
    assert again.error is None and again.norm is None and again.relative_error is None
    np.testing.assert_array_equal(again.weights, cp_f.weights.numpy())
    for ours, theirs in zip(again.factors, cp_f.factors):
        np.testing.assert_array_equal(ours, theirs.numpy())


def test_from_tensorly_measures_against_reference_and_refuses_other_objects():
    A = low_rank_plus_noise((6, 5, 4), 2, 0.3, 5)
    f = from_tensorly(parafac(A.numpy(), 2, init="svd"), reference=A)
    assert f.error == pytest.approx(fro(A - torch.as_tensor(f.to_tensor())), rel=1e-12)
    assert f.relative_error == pytest.approx(f.error / float(A.norm()))
    with pytest.raises(TypeError, match="expected a tensorly CPTensor"):
        from_tensorly(A.numpy())
    with pytest.raises(TypeError, match="ProductQuantized has no tensorly equivalent"):
        to_tensorly(pq(A, 4, block_size=2))


def test_pytorch_backend_keeps_torch_tensors():
    tl.set_backend("pytorch")
    f = cp(low_rank_plus_noise((5, 4, 3), 2, 0.1, 6), rank=2)
    theirs = f.to_tensorly()
    assert isinstance(theirs.factors[0], torch.Tensor)
    back = from_tensorly(theirs)
    torch.testing.assert_close(back.to_tensor(), f.to_tensor(), rtol=0, atol=1e-13)


def test_full_tucker_of_a_kernel_becomes_its_tucker2_exactly():
    K = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    full = from_tensorly(tl_tucker(K.numpy(), rank=[3, 2, 2, 3]), reference=K)
    two = full.keeping_modes((0, 1))
    assert two.modes == (0, 1) and two.core.shape == (3, 2, 3, 3) and two.error == full.error
    np.testing.assert_allclose(two.to_tensor(), full.to_tensor(), rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="not decomposed"):
        tucker(K, rank=2, modes=(0, 1)).keeping_modes((2,))
