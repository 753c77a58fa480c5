"""Side-by-side timings in one run: compute_kfac vs the gradient floor, eig, and the exact path.

Usage: python -m benchmarks.compare [--n 2048] [--n-cnn 256] [--repeats 3] [--device cpu|cuda]
       [--workloads mlp,cnn] [--skip-exact]
Prints a markdown report section by section. Ratios are measured in the same run, interleaved. The load average
is printed before and after every workload: on a shared machine other processes' load changes the ratios (torch's
multithreaded LAPACK calls suffer most from oversubscribed cores).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import time

import numpy as np
import torch
from scipy.sparse.linalg import eigsh

import kfac_hessian as kh
from benchmarks.models import workload


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def interleaved(cases: dict, repeats: int, device) -> dict:
    """Run every case once per round, ``repeats`` rounds; return (median, min, max) seconds per case."""
    times = {name: [] for name in cases}
    for fn in cases.values():  # warm-up round
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn, device)[0])
    return {name: (statistics.median(t), min(t), max(t)) for name, t in times.items()}


def matmul_rate(device, n=2048, dtype=torch.float32) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    t, _ = timed(lambda: [a @ a for _ in range(5)], device)
    return 5 * 2 * n**3 / t / 1e9


def gradient_pass(model, loss_fn, data):
    for X, y in data:
        loss = loss_fn(model(X), y) * len(y)
        torch.autograd.grad(loss, list(model.parameters()))


def c_backward_passes(model, loss_fn, data, c=10):
    params = list(model.parameters())
    for X, _ in data:
        out = model(X)
        for k in range(c):
            torch.autograd.grad(out[:, k].sum(), params, retain_graph=k < c - 1)


def covariance_multiply_adds(model, data) -> tuple[float, float]:
    """``(A, G)`` multiply-adds of the covariance products, counted as in docs/performance.md ("counted floor"): rows ×
    width² per Kronecker layer (convolutions with unfolded patches of width c_in·k_h·k_w; the bias adds 1 to A's
    width), halved for symmetry; G for one backpropagated column."""
    counts = [0.0, 0.0]

    def count(module, args, output):
        kind = kh.layers.kind_for(module)
        rows, layout = kind.input_rows(module, args[0].detach()), kind.layout(module)
        locations = rows.shape[0] * rows.shape[1]
        counts[0] += layout.groups * locations * layout.width**2 / 2
        counts[1] += layout.groups * locations * layout.d_out**2 / 2

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))]
    handles = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():
            for X, _ in data:
                model(X)
    finally:
        for h in handles:
            h.remove()
    return counts[0], counts[1]


def power_iteration(op, k, tol, max_matvecs=5000, seed=0):
    """Power iteration with deflation (PyHessian's method): returns eigenvalues and matvec count."""
    g = torch.Generator().manual_seed(seed)
    found, vals, matvecs = [], [], 0
    for _ in range(k):
        v = torch.randn(op.shape[0], generator=g, dtype=op.dtype)
        v /= v.norm()
        value = None
        while matvecs < max_matvecs:
            for u in found:
                v -= (u @ v) * u
            v /= v.norm()
            hv = op @ v
            matvecs += 1
            new = float(v @ hv)
            v = hv
            if value is not None and abs(new - value) <= tol * abs(new):
                break
            value = new
        found.append(v / v.norm())
        vals.append(new)
    return np.array(vals), matvecs


def peer_cases(model, loss_fn, data) -> dict:
    """curvlinops' KFACLinearOperator computing the same factors (when curvlinops is installed), and the user's job
    on its side: factors, then ``torch.linalg.eigh`` of every factor (eigenvalues and eigenvectors)."""
    try:
        from curvlinops import EKFACLinearOperator, KFACLinearOperator
    except ImportError:
        return {}
    params = [p for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for p in m.parameters()]

    def run(fisher_type, eigh=False):
        op = KFACLinearOperator(model, loss_fn, params, data, fisher_type=fisher_type, separate_weight_and_bias=False,
                                check_deterministic=False)
        op.compute_kronecker_factors()
        if eigh:
            for factors in (op._input_covariances, op._gradient_covariances):
                for matrix in factors.values():
                    torch.linalg.eigh(matrix)

    def ekfac(fisher_type):
        op = EKFACLinearOperator(model, loss_fn, params, data, fisher_type=fisher_type, separate_weight_and_bias=False,
                                 check_deterministic=False)
        op._maybe_compute_ekfac()  # its factors, their eigenvectors and the eigenvalue correction

    cases = {f"curvlinops KFAC {t}": (lambda t=t: run(t)) for t in ("type-2", "mc", "empirical")}
    with torch.no_grad():
        two_dimensional = model(data[0][0][:1]).dim() == 2
    if two_dimensional:  # its EKFAC takes 2d outputs only
        cases |= {f"curvlinops EKFAC {t}": (lambda t=t: ekfac(t)) for t in ("mc", "empirical")}
    cases |= {f"user's job, curvlinops {t}: factors + eigh of every factor": (lambda t=t: run(t, eigh=True))
              for t in ("type-2", "mc")}
    return cases


def users_job(model, loss_fn, data, curvature, sorted_spectrum=False):
    """Every layer's full spectrum and its top-20 eigenpairs, with the default API: ``eig()`` (every factor
    eigenvalue: the whole spectrum, as the products) and ``topk(20)`` (eigenvalues and ``(20, P)`` eigenvectors);
    ``sorted_spectrum`` also lists all ``P`` eigenvalues sorted (``eigenvalues``)."""
    kfac = kh.compute_kfac(model, loss_fn, data, curvature=curvature, seed=0)
    for eig in kfac.eig().values():
        eig.topk(min(20, eig.num_params))
        if sorted_spectrum:
            _ = eig.eigenvalues  # the property sorts all P products: that sort is the cost measured


def serial_eig(kfac):
    """``kfac.eig()`` with one tridiagonalization at a time (``spectra.EIG_THREADS = 1``)."""
    import kfac_hessian.spectra as spectra

    spectra.EIG_THREADS = 1
    try:
        return kfac.eig()
    finally:
        spectra.EIG_THREADS = None


def workload_cases(model, loss_fn, data) -> dict:
    """Every timed case of one workload, by name; each a function of no arguments."""
    cases = {
        "floor: forward + 1 backward": lambda: gradient_pass(model, loss_fn, data),
        "forward + 10 backward passes": lambda: c_backward_passes(model, loss_fn, data),
        "compute_kfac ggn": lambda: kh.compute_kfac(model, loss_fn, data, curvature="ggn"),
        "compute_kfac ggn, 9 columns in one vmapped pass": lambda: kh.compute_kfac(
            model, loss_fn, data, curvature="ggn", column_chunk=9
        ),
        "compute_kfac mc": lambda: kh.compute_kfac(model, loss_fn, data, curvature="mc", seed=0),
        "compute_kfac empirical": lambda: kh.compute_kfac(model, loss_fn, data, curvature="empirical"),
        "compute_ekfac mc (its compute_kfac, eigenvectors, correction pass)": lambda: kh.compute_ekfac(
            model, loss_fn, data, curvature="mc", seed=0),
        "compute_ekfac empirical": lambda: kh.compute_ekfac(model, loss_fn, data, curvature="empirical"),
        "compute_kronecker_fit mc, 3 passes after compute_kfac": lambda: kh.compute_kronecker_fit(
            model, loss_fn, data, curvature="mc", seed=0, iterations=3, tol=0.0),
    }
    cases.update(peer_cases(model, loss_fn, data))
    for curvature in ("ggn", "mc"):
        cases[f"user's job, ours {curvature}: compute_kfac + eig() + topk(20) of every layer"] = (
            lambda c=curvature: users_job(model, loss_fn, data, c))
        cases[f"user's job, ours {curvature}: … + every sorted spectrum (eigenvalues)"] = (
            lambda c=curvature: users_job(model, loss_fn, data, c, sorted_spectrum=True))
    kfac = kh.compute_kfac(model, loss_fn, data)
    kfac_mc = kh.compute_kfac(model, loss_fn, data, curvature="mc", seed=0)
    cases["eig, all factors (values)"] = lambda: kfac.eig(vectors=False)
    cases["eig, all factors (values), one tridiagonalization at a time"] = lambda: serial_eig(kfac)
    cases["eig, all factors (vectors)"] = lambda: kfac.eig(vectors=True)
    cases["eig, all factors: torch.linalg.eigh one factor at a time"] = lambda: [
        torch.linalg.eigh(m) for f in kfac.values() for m in (f.A, f.G)]
    cases["eig, all factors: torch.linalg.eigvalsh one factor at a time"] = lambda: [
        torch.linalg.eigvalsh(m) for f in kfac.values() for m in (f.A, f.G)]
    cases["eig values + top-10 eigenpairs of every layer"] = lambda: [
        e.topk(10) for e in kfac.eig(vectors=False).values()]
    cases["compute_ekfac mc, kfac= given (eigenvectors + correction pass)"] = lambda: kh.compute_ekfac(
        model, loss_fn, data, kfac=kfac_mc, seed=0)
    cases["user's job without the pass: eig() + topk(20) of every layer of the mc factors"] = lambda: [
        e.topk(min(20, e.num_params)) for e in kfac_mc.eig().values()]
    return cases


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average (1/5/15 min): {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} CPUs"


def fmt(t):
    return f"{t[0]:.3f} ({t[1]:.3f}–{t[2]:.3f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2048, help="samples for the MLP")
    parser.add_argument("--n-cnn", type=int, default=256, help="samples for the CNN (its A factor dominates on CPU)")
    parser.add_argument("--n-seq", type=int, default=256, help="sequences (of 32 positions) for the sequence model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--exact-n", type=int, default=512, help="samples for the exact-path comparison")
    parser.add_argument("--workloads", default="mlp,cnn", help="comma-separated: mlp, cnn, seq (empty for none)")
    parser.add_argument("--skip-exact", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only the cases naming one (and the "
                                                   "floor and compute_kfac mc/empirical they are compared with)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    lines = [f"# kfac_hessian benchmark ({device}, torch {torch.__version__}, {torch.get_num_threads()} threads)", ""]
    try:
        lines.append(f"curvlinops-for-pytorch {importlib.metadata.version('curvlinops-for-pytorch')}")
    except importlib.metadata.PackageNotFoundError:
        lines.append("curvlinops-for-pytorch not installed: no peer rows")
    rate = matmul_rate(device)
    lines.append(f"matmul rate (float32, 2048²): {rate:.0f} GFLOP/s")
    for name in [w for w in args.workloads.split(",") if w]:
        lines.append(f"{name}: before, {load_average()}")
        n = {"mlp": args.n, "cnn": args.n_cnn, "seq": args.n_seq}[name]
        model, loss_fn, data = workload(name, n)
        model = model.to(device)
        data = [(X.to(device), y.to(device)) for X, y in data]
        cases = workload_cases(model, loss_fn, data)
        if args.only:
            keep = ["floor", "compute_kfac mc", "compute_kfac empirical"] + args.only.split(",")
            cases = {c: fn for c, fn in cases.items() if any(c.startswith(k) or k in c for k in keep)}
        result = interleaved(cases, args.repeats, device)
        floor = result["floor: forward + 1 backward"][0]
        a_macs, g_macs = covariance_multiply_adds(model, data)
        columns = 9  # cross-entropy with 10 classes: rank C − 1
        result["counted floor, mc/empirical: floor + (A + G products) at the matmul rate"] = (
            (floor + 2 * (a_macs + g_macs) / (rate * 1e9),) * 3)
        if "forward + 10 backward passes" in result:
            result["counted floor, ggn: forward + 10 backward + (A + 9·G products) at the matmul rate"] = (
                (result["forward + 10 backward passes"][0] + 2 * (a_macs + columns * g_macs) / (rate * 1e9),) * 3)
        n_params = sum(p.numel() for p in model.parameters())
        lines.append(f"{name}: after, {load_average()}")
        lines += ["", f"## {name}: {n_params / 1e6:.2f}M parameters, N={n}, CE, float32", "",
                  "| what | seconds: median (min–max) | / floor |", "|---|---|---|"]
        for case, t in result.items():
            lines.append(f"| {case} | {fmt(t)} | {t[0] / floor:.2f} |")
        for t in ("mc", "empirical"):
            suffix = " (its compute_kfac, eigenvectors, correction pass)" if t == "mc" else ""
            ours, factors, peer = (result.get(f"compute_ekfac {t}{suffix}"), result.get(f"compute_kfac {t}"),
                                   result.get(f"curvlinops EKFAC {t}"))
            if ours and factors:
                lines.append(f"| → compute_ekfac {t} / compute_kfac {t} (medians; goal ≤ 2) | "
                             f"{ours[0] / factors[0]:.2f} | |")
            if ours and peer:
                lines.append(f"| → compute_ekfac {t}: ours / curvlinops EKFAC (medians) | {ours[0] / peer[0]:.2f} | |")
        for ours, theirs in (("ggn", "type-2"), ("mc", "mc")):
            peer = next((t for c, t in result.items() if c.startswith(f"user's job, curvlinops {theirs}:")), None)
            for case, t in result.items():
                if peer and case.startswith(f"user's job, ours {ours}:"):
                    lines.append(f"| → {case.split(': ', 1)[1]} ({ours}): ours / curvlinops (medians) | "
                                 f"{t[0] / peer[0]:.2f} | |")
        print("\n".join(lines), flush=True)
        lines = []
    if not args.skip_exact:
        lines += exact_section(args, device)
    print("\n".join(lines), flush=True)


def exact_section(args, device):
    """Exact top-k of one MLP layer: our Lanczos vs scipy eigsh vs power iteration; Kronecker top-k vs Lanczos."""
    model, loss_fn, data = workload("mlp", args.exact_n)
    model = model.to(device)
    data = [(X.to(device), y.to(device)) for X, y in data]
    layer = "4"  # the 1024→10 output layer: P = 10,250
    lines = ["", f"## exact path: layer {layer} of the MLP (P = 10,250), GGN, N={args.exact_n}", "",
             "| method | k | seconds | matvecs | max rel. error of top-k vs reference |", "|---|---|---|---|---|"]
    for k in (10, 20):
        lines += exact_rows(model, loss_fn, data, layer, k, device)
        print("\n".join(lines), flush=True)
        lines = []
    return lines


def exact_rows(model, loss_fn, data, layer, k, device) -> list[str]:
    """The exact-path table's rows for one ``k``: each method timed on a fresh operator (its own matvec count)."""
    op = kh.layer_operator(model, loss_fn, data, layer, kind="ggn")
    ref = kh.lanczos(op, k, tol=1e-10, max_iter=400, seed=0, dense_limit=0)
    reference = ref.eigenvalues.double().cpu().numpy()

    def error(values):
        return np.max(np.abs(np.sort(np.asarray(values))[::-1][:k] - reference) / reference)

    lines = []
    op_l = kh.layer_operator(model, loss_fn, data, layer, kind="ggn")
    t_l, ours = timed(lambda: kh.lanczos(op_l, k, tol=1e-3, seed=1, dense_limit=0), device)
    lines.append(f"| kh.lanczos (residual tol 1e-3) | {k} | {t_l:.2f} | {op_l.n_matvecs} | "
                 f"{error(ours.eigenvalues.cpu().numpy()):.1e} |")
    op_s = kh.layer_operator(model, loss_fn, data, layer, kind="ggn")
    t_s, vals = timed(lambda: eigsh(op_s.to_scipy(), k=k, which="LA", tol=1e-3)[0], device)
    lines.append(f"| scipy eigsh (tol 1e-3) | {k} | {t_s:.2f} | {op_s.n_matvecs} | {error(vals):.1e} |")
    op_p = kh.layer_operator(model, loss_fn, data, layer, kind="ggn")
    t_p, (vals, count) = timed(lambda: power_iteration(op_p, k, tol=1e-6), device)
    lines.append(f"| power iteration + deflation (eigenvalue change 1e-6) | {k} | {t_p:.2f} | {count} | "
                 f"{error(vals):.1e} |")
    t_k, kfac = timed(lambda: kh.compute_kfac(model, loss_fn, data, layers=[layer]), device)
    t_e, _ = timed(lambda: kfac[layer].eig().topk(k), device)
    lines.append(f"| Kronecker top-k (factors + eig + topk) | {k} | {t_k + t_e:.3f} | 0 | (approximation) |")
    lines.append(f"| → speed ratio kh.lanczos / Kronecker | {k} | {t_l / (t_k + t_e):.0f}× | | |")
    return lines


if __name__ == "__main__":
    main()
