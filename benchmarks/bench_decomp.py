"""Decomposition pipeline benchmark: our decompositions next to torch / sklearn / tensorly, same run.

Run: ``.venv/bin/python benchmarks/bench_decomp.py [--iters 100] [--quick] [--threads 1]``
(the harness, ``benchmarks/_timing.py``: 1 torch thread by default, and numpy/OpenMP
libraries limited to the same count with threadpoolctl; each one-shot step reports wall time
and the measuring thread's CPU time, the figure other processes on a shared machine cannot
inflate). Writes ``benchmarks/results/bench_decomp.md``. Tables:

1. the CP target: a 256x256x3x3 kernel with a trained-like spectrum (decaying
   spectra in every unfolding, plus 1% noise) at rank 64, our cp (default mixed precision,
   and all-float64) vs tensorly ``parafac(init='svd')`` with the same iteration budget
   (tol=0: both run every sweep), the error and time ratios;
2. randomized SVD of a trained-like 2048x2048 matrix at rank 128: ours (default float64
   math with a certified bound; ``compute_dtype=float32``) vs ``torch.svd_lowrank`` at the
   same sketch size and power iterations, error / Eckart-Young optimum;
3. k-means on PQ-like sub-vectors (65,536 points of dimension 8, 256 centroids): ours
   vs sklearn ``KMeans(n_init=1, algorithm="lloyd")`` at the same iteration budgets, inertia;
4. real pretrained kernels (ccexam's MNIST CNN: conv2 ``features.3.weight`` 64x32x3x3, and
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
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _timing import Bench, add_bench_args  # noqa: E402

import numpy as np  # noqa: E402
import tensorly as tl  # noqa: E402
from tensorly.decomposition import parafac, tensor_train  # noqa: E402
from tensorly.decomposition import tucker as tl_tucker  # noqa: E402

from decomp_toolkit.decomp import btd, cp  # noqa: E402
from decomp_toolkit.decomp import tt as our_tt  # noqa: E402
from decomp_toolkit.decomp import tucker as our_tucker  # noqa: E402

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


BENCH = None  # the run's Bench (set in main)


def timed(fn):
    """``(result, wall s, thread-CPU s)`` of one call."""
    return BENCH.time_once(fn)


def secs(wall, cpu):
    return f"{wall:.2f} / {cpu:.2f}"


def cp_table(iters):
    T = trained_like()
    Tn = T.numpy()
    c, w1, c1 = timed(lambda: cp(T, rank=64, n_iter_max=iters, convergence_tol=0))
    c64, w2, c2 = timed(lambda: cp(T, rank=64, n_iter_max=iters, convergence_tol=0, mixed_precision=False))
    (weights, factors), w3, c3 = timed(lambda: parafac(Tn, 64, n_iter_max=iters, init="svd", tol=0))
    ref = rel(Tn, tl.cp_to_tensor((weights, factors)))
    rows = [["decomp.cp (mixed precision, default)", secs(w1, c1), f"{c.relative_error:.4f}",
             f"{c.relative_error / ref:.4f}", f"{c3 / c1:.1f}x",
             f"{c.info['float32_sweeps']} float32 sweeps, {c.info['linesearch_accepted']} extrapolations"],
            ["decomp.cp (all float64)", secs(w2, c2), f"{c64.relative_error:.4f}", f"{c64.relative_error / ref:.4f}",
             f"{c3 / c2:.1f}x", ""],
            ["tensorly parafac(init='svd')", secs(w3, c3), f"{ref:.4f}", "1.0000", "1.0x", "numpy backend"]]
    BENCH.section(f"CP of a trained-like 256x256x3x3 kernel, rank 64, {iters} sweeps (tol=0)",
                  ["method", "wall / CPU s", "rel. error", "error / tensorly's", "tensorly CPU / ours", "notes"], rows)


def randomized_svd_table():
    from decomp_toolkit.decomp import svd
    from decomp_toolkit.decomp.svd import optimal_error

    gen = torch.Generator().manual_seed(0)
    n, k, oversample = 2048, 128, 10
    W = torch.randn(n, 256, generator=gen) @ torch.randn(256, n, generator=gen) / 16 + 0.05 * torch.randn(
        n, n, generator=gen)
    best = optimal_error(W, k)
    rows, torch_cpu = [], {}
    for n_iter in (2, 4):
        (U, S, V), wall, cpu = timed(lambda: torch.svd_lowrank(W, q=k + oversample, niter=n_iter))
        error = float((W - (U[:, :k] * S[:k]) @ V[:, :k].T).norm()) / best
        torch_cpu[n_iter] = cpu
        rows.append([f"torch.svd_lowrank(q={k + oversample}, niter={n_iter})", secs(wall, cpu), f"{error:.4f}",
                     "1.0x", "no bound"])
        for label, extra in (("float64 math (default)", {}), ("compute_dtype=float32", dict(
                compute_dtype=torch.float32))):
            f, wall, cpu = timed(lambda: svd(W, rank=k, algorithm="randomized", oversample=oversample,
                                             n_iter=n_iter, random_state=0, **extra))
            error = float((W - f.to_tensor()).norm()) / best
            rows.append([f"decomp.svd randomized n_iter={n_iter}, {label}", secs(wall, cpu), f"{error:.4f}",
                         f"{torch_cpu[n_iter] / cpu:.2f}x", "certified error_bound"])
    f, wall, cpu = timed(lambda: svd(W, rank=k))
    rows.append(["decomp.svd exact (LAPACK)", secs(wall, cpu), "1.0000", f"{torch_cpu[4] / cpu:.2f}x vs niter=4",
                 "optimal"])
    BENCH.section(f"Randomized SVD of a trained-like {n}x{n} float32 matrix, rank {k}",
                  ["method", "wall / CPU s", "error / optimum", "torch CPU / ours (same niter)", "notes"], rows)


def kmeans_table():
    import importlib

    pq_module = importlib.import_module("decomp_toolkit.decomp.pq")
    gen = torch.Generator().manual_seed(0)
    n, d, k = 65536, 8, 256
    X = torch.randn(n, d, generator=gen) @ torch.randn(d, d, generator=gen)
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        KMeans = None
    rows = []
    for iters in (10, 25, 50):
        (C, codes, history), wall, cpu = timed(lambda: pq_module.kmeans(X[None], k, n_iter=iters, convergence_tol=0,
                                                                        random_state=0))
        row = [str(iters), secs(wall, cpu), f"{history[-1]:.6g}"]
        if KMeans is None:
            rows.append(row + ["sklearn not installed", "-", "-"])
            continue
        km, wall2, cpu2 = timed(lambda: KMeans(k, n_init=1, max_iter=iters, tol=0, random_state=0,
                                               algorithm="lloyd").fit(X.numpy()))
        rows.append(row + [secs(wall2, cpu2), f"{km.inertia_:.6g}", f"{cpu2 / cpu:.2f}x",
                           f"{history[-1] / km.inertia_:.4f}"])
    BENCH.section(f"k-means, {n} points in R^{d}, {k} centroids (k-means++ seeding, Lloyd, tol=0)",
                  ["iterations", "ours wall / CPU s", "ours inertia", "sklearn wall / CPU s", "sklearn inertia",
                   "sklearn CPU / ours", "inertia ours / sklearn"], rows)


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
    rows = []

    def row(label, method, wall, cpu, error, params):
        rows.append([label, method, secs(wall, cpu), f"{error:.4f}", str(params), f"{dense / params:.2f}x"])

    for ratio in (0.5, 0.25):
        label = f"{name} {tuple(W.shape)} {1 / ratio:.0f}x"
        sweeps = 100 if ratio * dense / sum(T.shape) <= 256 else 15  # huge CP ranks: a short budget
        c, wall, cpu = timed(lambda: cp(T, ratio=ratio, n_iter_max=sweeps))
        row(label, f"decomp.cp R={c.rank} ({sweeps} sweeps max)", wall, cpu, c.relative_error, c.num_params)
        (w, f), wall, cpu = timed(lambda: parafac(Tn, c.rank, init="svd", n_iter_max=sweeps))
        row(label, f"tensorly parafac R={c.rank} ({sweeps} sweeps max)", wall, cpu, rel(Tn, tl.cp_to_tensor((w, f))),
            c.num_params)
        b, wall, cpu = timed(lambda: btd(T, n_blocks=4, ratio=ratio, n_iter_max=30))
        row(label, f"decomp.btd 4x{b.rank[0]} (30 sweeps)", wall, cpu, b.relative_error, b.num_params)
        t, wall, cpu = timed(lambda: our_tucker(T, ratio=ratio))
        row(label, f"decomp.tucker {t.rank}", wall, cpu, t.relative_error, t.num_params)
        (core, fs), wall, cpu = timed(lambda: tl_tucker(Tn, rank=list(t.rank)))
        row(label, f"tensorly tucker {t.rank}", wall, cpu, rel(Tn, tl.tucker_to_tensor((core, fs))), t.num_params)
        x, wall, cpu = timed(lambda: our_tt(T, ratio=ratio))
        row(label, f"decomp.tt {x.rank}", wall, cpu, x.relative_error, x.num_params)
        cores, wall, cpu = timed(lambda: tensor_train(Tn, rank=list(x.rank)))
        row(label, f"tensorly tensor_train {x.rank}", wall, cpu, rel(Tn, tl.tt_to_tensor(cores)), x.num_params)
    return rows


def real_table():
    weights = mnist_weights()
    header = ["layer", "method", "wall / CPU s", "rel. error", "params", "compression"]
    if weights is None:
        BENCH.section("Real pretrained kernels at 2x / 4x parameter reduction", header,
                      [["ccexam not installed: skipped", "", "", "", "", ""]])
        return
    rows = real_rows("mnist conv2", weights["features.3.weight"])
    fc = [k for k, v in weights.items() if v.ndim == 2 and tuple(v.shape) == (128, 3136)]
    if fc:
        rows += real_rows("mnist fc1 as 128x64x7x7", weights[fc[0]].reshape(128, 64, 7, 7))
    BENCH.section("Real pretrained kernels at 2x / 4x parameter reduction", header, rows)


def main():
    global BENCH
    parser = add_bench_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--iters", type=int, default=100, help="sweep budget of the CP comparison")
    parser.add_argument("--quick", action="store_true", help="skip the 256x256x3x3 CP comparison")
    parser.add_argument("--only", nargs="*", default=(), help="tables to run: cp svd kmeans real")
    args = parser.parse_args()
    BENCH = Bench("bench_decomp" + ("_quick" if args.quick else ""), args)
    from threadpoolctl import threadpool_limits

    BENCH.note(BENCH.environment() + f"; tensorly {tl.__version__}; numpy/OpenMP pools limited to {args.threads}")
    tables = dict(cp=lambda: cp_table(args.iters), svd=randomized_svd_table, kmeans=kmeans_table, real=real_table)
    with threadpool_limits(args.threads):
        for name, table in tables.items():
            if (not args.only or name in args.only) and not (args.quick and name == "cp"):
                table()
    BENCH.write()


if __name__ == "__main__":
    main()
