"""Shared test configuration: hypothesis profiles and small helpers."""
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", deadline=None, max_examples=25, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(int(os.environ.get("DECOMP_TEST_THREADS", "1")))


def decaying_matrix(m, n, decay=0.5, seed=0, dtype=torch.float64):
    """A matrix with singular values decay**i (like trained weights, unlike flat noise)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    s = torch.tensor([decay ** (i / max(1, k / 8)) for i in range(k)], dtype=torch.float64)
    return ((U * s) @ V.T).to(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def tensorly_numpy_backend():
    """Every test starts on tensorly's default numpy backend, whatever an earlier test set."""
    try:
        import tensorly as tl
    except ImportError:  # pragma: no cover - tensorly is a dependency
        yield
        return
    previous = tl.get_backend()
    tl.set_backend("numpy")
    yield
    tl.set_backend(previous)
