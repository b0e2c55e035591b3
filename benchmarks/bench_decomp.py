"""Decomposition pipeline benchmark: our decompositions next to torch / sklearn / tensorly, same run.

Run: ``.venv/bin/python benchmarks/bench_decomp.py [--iters 100] [--quick] [--threads 1]``
(the harness, ``benchmarks/_timing.py``: 1 torch thread by default, and numpy/OpenMP
libraries limited to the same count with threadpoolctl; each one-shot step reports wall time
and the measuring thread's CPU time, the figure other processes on a shared machine cannot
inflate). Writes ``benchmarks/results/bench_decomp.md``. Tables:

1. CP at ``--iters`` sweeps (tol=0): trained-like kernels (decaying spectra in every
   unfolding plus 1% noise: 256x256x3x3 at rank 64, two decay rates; 128x64x3x3 at rank 32)
   and a rank-24 CP tensor plus 10% noise; our cp (defaults) vs tensorly
   ``parafac(init='svd')``, errors and CPU ratio (tensorly's 256-channel runs, ~40 s each,
   are timed once; the others interleaved), plus our ALS without line search for reference;
2. randomized SVD of trained-like float32 matrices (2048x2048 and 4096x1024, ranks
   64/128/256, 2 and 4 power iterations): ours vs ``torch.svd_lowrank`` at the same sketch
   size and power iterations, interleaved, paired CPU ratio, both errors / Eckart-Young optimum
   and our certified bound;
3. k-means on PQ-like sub-vectors (65,536 points of dimension 8, 256 centroids): ours
   vs sklearn ``KMeans(n_init=1, algorithm="lloyd")`` at the same iteration budgets,
   interleaved, paired CPU ratio, inertia, and whether a rerun gives the same codes;
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


def trained_like(shape=(256, 256, 3, 3), seed=0, noise=0.01, decay_div=8):
    """Random core rotated and scaled per mode with decaying spectra 0.5**(i/(I_n/decay_div)), + noise."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(*shape, generator=gen, dtype=torch.float64)
    for size in shape:  # each tensordot contracts the leading mode and appends the new one
        decay = torch.tensor([0.5 ** (i / max(1, size / decay_div)) for i in range(size)], dtype=torch.float64)
        Q = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64)).Q
        X = torch.tensordot(X, Q * decay, dims=([0], [1]))
    scale = noise * X.norm() / math.sqrt(X.numel())
    return X + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def low_rank_cp(shape, rank, seed=0, noise=0.1):
    """An exact rank-``rank`` CP tensor with Gaussian factors plus ``noise`` relative Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(size, rank, generator=gen, dtype=torch.float64) for size in shape]
    X = torch.einsum("az,bz,cz,dz->abcd", *factors)
    return X + noise * X.norm() / math.sqrt(X.numel()) * torch.randn(*shape, generator=gen, dtype=torch.float64)


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
    cases = [("256x256x3x3 trained-like (decay /8)", trained_like(), 64, False),
             ("256x256x3x3 trained-like (decay /16)", trained_like(decay_div=16), 64, False),
             ("128x64x3x3 trained-like (decay /16)", trained_like((128, 64, 3, 3), seed=1, decay_div=16), 32, True),
             ("64x48x3x3 rank-24 CP + 10% noise", low_rank_cp((64, 48, 3, 3), 24, seed=2), 24, True)]
    rows = []
    for name, T, R, interleave_tensorly in cases:
        Tn = T.numpy()
        fns = {"ours": lambda: cp(T, rank=R, n_iter_max=iters, convergence_tol=0),
               "tensorly": lambda: parafac(Tn, R, n_iter_max=iters, init="svd", tol=0)}
        if interleave_tensorly:
            t = BENCH.compare(fns, tag=f"cp {name}", min_sample_s=0)
            ratio, tl_time = paired(t, "tensorly", "ours"), wall_cpu_ms(t["tensorly"])
        else:  # tensorly takes ~40 s a call here: one call, beside our median
            t = BENCH.compare({"ours": fns["ours"]}, tag=f"cp {name}", min_sample_s=0)
            _, wall, cpu = timed(fns["tensorly"])
            ratio, tl_time = f"{cpu / t['ours'].cpu_median:.1f}x (one tensorly call)", f"{wall * 1e3:.0f} / {cpu * 1e3:.0f}"
        c, plain, (weights, factors) = fns["ours"](), cp(T, rank=R, n_iter_max=iters, convergence_tol=0,
                                                         linesearch=False, mixed_precision=False), fns["tensorly"]()
        ref = rel(Tn, tl.cp_to_tensor((weights, factors)))
        rows.append([name, R, wall_cpu_ms(t["ours"]), tl_time, ratio, f"{c.relative_error:.4f}", f"{ref:.4f}",
                     f"{c.relative_error / ref:.4f}", f"{plain.relative_error:.4f}"])
    BENCH.section(f"CP, {iters} sweeps (tol=0): decomp.cp vs tensorly parafac(init='svd')",
                  ["tensor", "rank", "ours wall / CPU ms", "tensorly wall / CPU ms", "tensorly CPU / ours",
                   "ours rel. error", "tensorly rel. error", "error ours / tensorly",
                   "ours without line search (plain float64 ALS)"], rows,
                  note="Ours: default cp (line search, mixed precision); tensorly numpy backend, same init family "
                       "and sweep budget. The last column is our ALS with the extrapolation off, for reference.")


def trained_like_matrix(m, n, gen):
    """A rank-256 signal with a decaying spectrum plus 5% noise, float32 (as trained weights look)."""
    return torch.randn(m, 256, generator=gen) @ torch.randn(256, n, generator=gen) / 16 + 0.05 * torch.randn(
        m, n, generator=gen)


def paired(timings, reference, ours):
    """``"1.23x ±4%"``: median over rounds of reference CPU / our CPU (paired, same rounds)."""
    return str(BENCH.ratio(timings[reference], timings[ours], cpu=True))


def wall_cpu_ms(timing):
    return f"{timing.median * 1e3:.0f} / {timing.cpu_median * 1e3:.0f}"


def randomized_svd_table():
    from decomp_toolkit.decomp import svd
    from decomp_toolkit.decomp.svd import optimal_error, randomized_svd

    gen, oversample, rows = torch.Generator().manual_seed(0), 10, []
    for m, n in ((2048, 2048), (4096, 1024)):
        W = trained_like_matrix(m, n, gen)
        for k in (64, 128, 256):
            best = optimal_error(W, k)
            for n_iter in (2, 4):
                fns = {"torch": lambda: torch.svd_lowrank(W, q=k + oversample, niter=n_iter),
                       "ours": lambda: svd(W, rank=k, algorithm="randomized", oversample=oversample, n_iter=n_iter,
                                           random_state=0),
                       "core": lambda: randomized_svd(W, k + oversample, n_iter=n_iter, random_state=0)}
                t = BENCH.compare(fns, tag=f"svd {m}x{n} k={k} n_iter={n_iter}", min_sample_s=0)
                torch.manual_seed(0)
                f = fns["ours"]()
                U, S, V = fns["torch"]()
                torch_error = truncated_error(W, U, S, V.T, k) / best
                core_error = truncated_error(W, *fns["core"](), k) / best
                ours_error = float((W - f.to_tensor()).norm()) / best
                rows.append([f"{m}x{n}", k, n_iter, wall_cpu_ms(t["torch"]), wall_cpu_ms(t["ours"]),
                             paired(t, "torch", "ours"), paired(t, "torch", "core"), f"{torch_error:.4f}",
                             f"{ours_error:.4f}", f"{core_error:.4f}", f"{f.error_bound / best:.4f}"])
    BENCH.section("Randomized SVD of trained-like float32 matrices: decomp.svd vs torch.svd_lowrank",
                  ["shape", "rank k", "n_iter", "torch wall / CPU ms", "ours wall / CPU ms",
                   "torch CPU / ours (paired)", "torch CPU / randomized_svd (paired)", "torch error / optimum",
                   "ours error / optimum", "randomized_svd error / optimum", "ours error_bound / optimum"], rows,
                  note=f"Same sketch size (k + {oversample}) and power iterations; interleaved rounds. Ours: "
                       f"`decomp.svd(algorithm='randomized')`: float32 sketch, float64 small SVD, error_bound "
                       f"certified for the returned float32 factors (one more product of the matrix with the "
                       f"factors). `randomized_svd`: the same sketch without the certificate, torch.svd_lowrank's "
                       f"contract (factors only; torch.svd_lowrank gives no bound). Errors of the rank-k "
                       f"truncations; optimum = Eckart-Young error at rank k.")


def leading_svd_table():
    """decomp.whitened.leading_svd (the Gram route of whitened_svd / asymmetric_svd) vs torch.linalg.svd."""
    from decomp_toolkit.decomp.whitened import leading_svd

    gen, rows = torch.Generator().manual_seed(0), []
    for m, n in ((576, 576), (192, 576), (1536, 576), (576, 1536), (2048, 2048)):
        M = trained_like_matrix(m, n, gen).double()
        k = int(0.8 * m * n / (m + n))   # rank of a kept parameter ratio of 0.8
        t = BENCH.compare({"svd": lambda: torch.linalg.svd(M, full_matrices=False),
                           "leading": lambda: leading_svd(M, k)}, tag=f"leading {m}x{n}", min_sample_s=0)
        U, S, Vh = leading_svd(M, k)
        U2, S2, Vh2 = torch.linalg.svd(M, full_matrices=False)
        difference = float(((U * S[:k]) @ Vh - (U2[:, :k] * S2[:k]) @ Vh2[:k]).norm() / M.norm())
        rows.append([f"{m}x{n}", k, wall_cpu_ms(t["svd"]), wall_cpu_ms(t["leading"]), paired(t, "svd", "leading"),
                     f"{difference:.1e}"])
    BENCH.section("Leading singular triplets of float64 matrices: leading_svd (Gram route) vs torch.linalg.svd",
                  ["shape", "rank k", "svd wall / CPU ms", "leading_svd wall / CPU ms", "svd CPU / leading_svd",
                   "rank-k difference / ||M||"], rows,
                  note="The SmolLM2 decoder shapes (and one larger) at the rank of a kept parameter ratio 0.8; "
                       "leading_svd takes the eigendecomposition of the smaller Gram when it resolves s_k "
                       "(s_k^2 >= 1e-7 s_1^2), else the SVD.")


def truncated_error(W, U, S, Vh, k) -> float:
    """``||W - U_k diag(S_k) Vh_k||_F``, ``U (m, q)``, ``S (q,)``, ``Vh (q, n)``."""
    return float((W - (U[:, :k] * S[:k]) @ Vh[:k]).norm())


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
        def ours():
            return pq_module.kmeans(X[None], k, n_iter=iters, convergence_tol=0, random_state=0)
        if KMeans is None:
            t = BENCH.compare({"ours": ours}, tag=f"kmeans {iters}", min_sample_s=0)
            rows.append([str(iters), wall_cpu_ms(t["ours"]), f"{ours()[2][-1]:.6g}", "sklearn not installed", "-",
                         "-", "-", "-"])
            continue

        def sklearn():
            return KMeans(k, n_init=1, max_iter=iters, tol=0, random_state=0, algorithm="lloyd").fit(X.numpy())
        t = BENCH.compare({"sklearn": sklearn, "ours": ours}, tag=f"kmeans {iters}", min_sample_s=0)
        (_, codes, history), (_, again, _), sk = ours(), ours(), sklearn().inertia_
        rows.append([str(iters), wall_cpu_ms(t["ours"]), f"{history[-1]:.6g}", wall_cpu_ms(t["sklearn"]), f"{sk:.6g}",
                     paired(t, "sklearn", "ours"), f"{history[-1] / sk:.4f}", str(bool(torch.equal(codes, again)))])
    BENCH.section(f"k-means, {n} points in R^{d}, {k} centroids (k-means++ seeding, Lloyd, tol=0)",
                  ["iterations", "ours wall / CPU ms", "ours inertia", "sklearn wall / CPU ms", "sklearn inertia",
                   "sklearn CPU / ours (paired)", "inertia ours / sklearn", "ours: same codes on a rerun"], rows,
                  note="Interleaved rounds; sklearn KMeans(n_init=1, algorithm='lloyd', tol=0), float32 input for both.")


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
    parser.add_argument("--only", nargs="*", default=(), help="tables to run: cp svd leading kmeans real")
    args = parser.parse_args()
    BENCH = Bench("bench_decomp" + ("_quick" if args.quick else ""), args)
    from threadpoolctl import threadpool_limits

    BENCH.note(BENCH.environment() + f"; tensorly {tl.__version__}; numpy/OpenMP pools limited to {args.threads}")
    tables = dict(cp=lambda: cp_table(args.iters), svd=randomized_svd_table, leading=leading_svd_table,
                  kmeans=kmeans_table, real=real_table)
    with threadpool_limits(args.threads):
        for name, table in tables.items():
            if (not args.only or name in args.only) and not (args.quick and name == "cp"):
                table()
    BENCH.write()


if __name__ == "__main__":
    main()
