"""OT solver benchmark: the r50 layer4 case of OTFace.

B triplet problems (default 128), each between two sets of 49 descriptors of D=512 (7 x 7
layer4 maps), cosine cost, eps=0.05, 50 iterations, forward + backward down to the descriptors.
Compared side by side, in one run, interleaved round by round so that machine noise hits all
of them alike:

* otface   - the public default, ``sinkhorn(C, eps)`` (``method="auto"``: for these cosine costs
  the scaling form, two row-vector bmms + two divisions per iteration on the row-shifted
  kernel; OTFaceTerm runs the same form, picked once from the known span)
* otface-scaling, otface-kernel, otface-lse - the same solver, same iterates, each form by name
* otface-cudagraph - (CUDA only) the scaling loop captured once as a CUDA graph, then replayed
* pot-batch - POT's ot.batch.solve_batch (its default log_sinkhorn), tol=0 so it runs all iterations
* pot-loop - POT's ot.sinkhorn2(method="sinkhorn_log") problem by problem (torch backend)
* geomloss - geomloss.SamplesLoss("sinkhorn", p=2, backend="tensorized"); on unit vectors its
  cost |x-y|^2/2 equals 1 - <x,y>; it anneals eps itself, `scaling` is set so that it runs about
  the same number of iterations, and it returns the entropic objective, not <P, C>.

Accuracy: each method's value against a float64 reference of the same quantity (a
2000-iteration solve). Peak memory: the increase of the peak RSS (VmHWM) over the RSS before the run, one method
alone in a fresh subprocess (CPU, Linux), or torch.cuda.max_memory_allocated (GPU).

Dispatched operations per Sinkhorn iteration of each eager form are counted with a
TorchDispatchMode (every aten op the loop issues: on a GPU each is at least one kernel launch).

    python benchmarks/bench_ot.py [--B 128] [--rounds 7] [--device cpu] [--smoke] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from otface_plugin.ot import cosine_cost, sinkhorn

METHODS = ["otface", "otface-scaling", "otface-kernel", "otface-lse", "otface-cudagraph", "pot-batch", "pot-loop",
           "geomloss"]
# name -> sinkhorn's (method, loop); "otface" passes neither: the default path
OURS = {"otface": ("auto", "eager"), "otface-scaling": ("scaling", "eager"), "otface-kernel": ("kernel", "eager"),
        "otface-lse": ("lse", "eager"), "otface-cudagraph": ("scaling", "cudagraph")}
TARGET_VS_POT = {"cpu": 3.0, "cuda": 3.0}  # issues 10, 21: the default path / POT batched, same error


def make_inputs(B, N, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Descriptor sets of positive-like pairs: shared structure plus noise, unit norm.
    base = torch.randn(B, N, D, generator=g)
    x = torch.nn.functional.normalize(base + 0.8 * torch.randn(B, N, D, generator=g), dim=2)
    y = torch.nn.functional.normalize(base[:, torch.randperm(N, generator=g)] + 0.8 * torch.randn(B, N, D, generator=g), dim=2)
    return x.to(device), y.to(device)


def geomloss_scaling(eps, iters, diameter=2.0):
    # geomloss's eps schedule goes from diameter^p to blur^p = eps by factors scaling^p (p = 2).
    return math.exp(math.log(eps / diameter**2) / (2 * max(iters - 2, 1)))


def run_method(name, x, y, eps, iters):
    """Forward + backward; returns the (B,) values (detached)."""
    x = x.detach().requires_grad_()
    y = y.detach().requires_grad_()
    if name == "otface":  # the defaults (iters is 50, the default, unless --iters/--smoke says otherwise)
        w = sinkhorn(cosine_cost(x, y, normalize=False), eps=eps, iters=iters).cost
    elif name in OURS:
        method, loop = OURS[name]
        w = sinkhorn(cosine_cost(x, y, normalize=False), eps=eps, iters=iters, method=method, loop=loop).cost
    elif name == "pot-batch":
        import ot.batch
        w = ot.batch.solve_batch(cosine_cost(x, y, normalize=False), eps, max_iter=iters, tol=0.0,
                                 grad="envelope").value_linear  # default log_sinkhorn (POT 0.9.6, 0.9.7)
    elif name == "pot-loop":
        import ot
        C = cosine_cost(x, y, normalize=False)
        w = torch.stack([ot.sinkhorn2(torch.full((C.shape[1],), 1 / C.shape[1], device=C.device),
                                      torch.full((C.shape[2],), 1 / C.shape[2], device=C.device),
                                      C[i], eps, method="sinkhorn_log", numItermax=iters, stopThr=0.0)
                         for i in range(C.shape[0])])
    elif name == "geomloss":
        from geomloss import SamplesLoss
        loss = SamplesLoss("sinkhorn", p=2, blur=math.sqrt(eps), scaling=geomloss_scaling(eps, iters),
                           debias=False, backend="tensorized")
        w = loss(x, y)
    else:
        raise ValueError(name)
    w.sum().backward()
    return w.detach()


def reference(x, y, eps):
    """float64, 2000 iterations: <P, C> and the entropic objective <P, C> + eps * KL(P | a b^T)."""
    C = cosine_cost(x.double(), y.double(), normalize=False)
    res = sinkhorn(C, eps=eps, iters=2000, method="lse")
    P = res.plan
    N, M = C.shape[1:]
    kl = (P * (torch.log(P.clamp_min(1e-300)) + math.log(N * M))).sum(dim=(1, 2))
    return res.cost, res.cost + eps * kl


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_iteration(method, device, n=6, iters=(5, 25)):
    """aten ops per Sinkhorn iteration of an eager form: the slope between two iteration counts."""
    C = cosine_cost(*make_inputs(2, n, 8, device), normalize=False)
    counts = []
    for k in iters:
        with OpCounter() as counter:
            sinkhorn(C, eps=0.05, iters=k, method=method)
        counts.append(counter.count)
    return (counts[1] - counts[0]) / (iters[1] - iters[0])


def time_all(args, available):
    x, y = make_inputs(args.B, args.N, args.D, args.device)
    times = {m: [] for m in available}
    values = {}
    for m in available:  # warm-up, and the values for the accuracy check
        values[m] = run_method(m, x, y, args.eps, args.iters).double().cpu()
    for r in range(args.rounds):
        for m in available:
            if m == "pot-loop" and r >= args.loop_rounds:
                continue
            sync(args.device)
            t = time.perf_counter()
            run_method(m, x, y, args.eps, args.iters)
            sync(args.device)
            times[m].append(time.perf_counter() - t)
    linear, entropic = reference(x.cpu(), y.cpu(), args.eps)
    errors = {m: (values[m] - (entropic if m == "geomloss" else linear)).abs().max().item() for m in available}
    return {m: statistics.median(ts) for m, ts in times.items()}, errors


def peak_memory(args, method):
    """Peak memory increase of one method run alone, in MiB."""
    if args.device.startswith("cuda"):
        x, y = make_inputs(args.B, args.N, args.D, args.device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_method(method, x, y, args.eps, args.iters)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, "--child-memory", method, "--B", str(args.B), "--N", str(args.N),
           "--D", str(args.D), "--eps", str(args.eps), "--iters", str(args.iters)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def child_memory(args):
    # Inputs built in place, so building them does not set a peak higher than the run's.
    x = torch.randn(args.B, args.N, args.D)
    x /= x.norm(dim=2, keepdim=True)
    y = torch.randn(args.B, args.N, args.D)
    y /= y.norm(dim=2, keepdim=True)
    run_method(args.child_memory, x[:2], y[:2], args.eps, 2)  # imports and lazily built state first
    before = _reset_peak_rss()
    run_method(args.child_memory, x, y, args.eps, args.iters)
    print((_peak_rss() - before) / 2**20)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss():
    """Current RSS in bytes, with the peak reset to it. ru_maxrss would not do: a child started
    by fork + exec inherits its parent's maximum."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (Linux >= 4.0)
    return _status_kib("VmRSS") * 1024


def _peak_rss():
    return _status_kib("VmHWM") * 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=128)
    p.add_argument("--N", type=int, default=49)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--loop-rounds", type=int, default=3, help="rounds for the (slow) per-problem POT loop")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, no memory runs: checks the script works")
    p.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory:
        return child_memory(args)
    if args.smoke:
        args.B, args.N, args.D, args.iters, args.rounds, args.loop_rounds = 4, 9, 16, 10, 2, 1
    kind = torch.device(args.device).type

    available = []
    for m in METHODS:
        if m == "otface-cudagraph" and kind != "cuda":
            continue
        try:
            if m.startswith("pot"):
                import ot.batch  # noqa: F401
            if m == "geomloss":
                import geomloss  # noqa: F401
            available.append(m)
        except ImportError:
            print(f"skipping {m}: not installed")
    medians, errors = time_all(args, available)
    memory = {m: (float("nan") if args.smoke else peak_memory(args, m)) for m in available}
    ops = {m: ops_per_iteration(OURS[m][0], args.device) for m in ("otface", "otface-scaling", "otface-kernel",
                                                                   "otface-lse")}
    ours = medians["otface"]
    threads = torch.get_num_threads()
    print(f"\nB={args.B} problems of {args.N}x{args.N}, D={args.D}, eps={args.eps}, {args.iters} iterations, "
          f"forward+backward, device={args.device}, torch {torch.__version__}, {threads} threads, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'method':<16} {'median ms':>10} {'vs otface':>10} {'max |err|':>10} {'peak MiB':>9}")
    print("-" * 59)
    for m in available:
        print(f"{m:<16} {1000 * medians[m]:>10.1f} {medians[m] / ours:>9.2f}x {errors[m]:>10.1e} {memory[m]:>9.1f}")
    print("\naten ops dispatched per Sinkhorn iteration (TorchDispatchMode; eager, each at least one "
          "kernel launch on a GPU):")
    for m, n in ops.items():
        print(f"  {m:<14} {n:>5.1f}  (method={OURS[m][0]})")
    print("  otface-cudagraph  0 per iteration: the whole loop is one graph replay per solve (CUDA only)")
    summary = {}
    if "pot-batch" in medians:
        best = "otface"  # the issue-21 claim is about the default path, not the best of our forms
        speedup = medians["pot-batch"] / medians[best]
        target = TARGET_VS_POT.get(kind, 2.0)
        summary = {"best": best, "speedup_vs_pot_batch": speedup, "target": target,
                   "error_ours": errors[best], "error_pot_batch": errors["pot-batch"],
                   "pass": speedup >= target and errors[best] <= errors["pot-batch"] * 1.01 + 1e-7}
        print(f"\n{best} is {speedup:.2f}x faster than POT's batched solver (target >= {target:g}x on {kind}), "
              f"max |err| {errors[best]:.2e} vs POT's {errors['pot-batch']:.2e} against the same reference")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device_name": _device_name(args.device), "torch": torch.__version__,
                       "threads": threads, "median_s": medians, "max_abs_error": errors,
                       "peak_mib": {m: (None if v != v else v) for m, v in memory.items()},
                       "ops_per_iteration": ops, "summary": summary}, f, indent=2)


def _device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    import platform
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
