"""Batched entropic optimal transport by log-domain Sinkhorn.

Solves, for each problem b of a batch, ``min_P <P, C_b> + eps * sum P log P`` subject to
``P 1 = a_b`` and ``P^T 1 = b_b`` (Cuturi 2013, "Sinkhorn Distances"), keeping the dual
potentials in the log domain (Peyre & Cuturi 2019, "Computational Optimal Transport", 4.4).

Design points:

* Everything runs in float32 (or float64 if given float64), autocast disabled, so fp16
  features from a mixed-precision backbone do not overflow ``exp(-C / eps)``.
* A fixed number of iterations and no convergence test: no host synchronisation inside the loop,
  which matters on GPUs where every ``.item()`` stalls the stream.
* Two exact ways to evaluate the log-sum-exp of an iteration. ``"lse"`` takes the log-sum-exp
  of the whole (B, N, M) tensor each half-iteration. ``"kernel"`` factors it as
  ``rowmax + log(E @ exp(v - max v))`` with ``E = exp(K - rowmax K)`` computed once, turning each
  half-iteration into a batched mat-vec. The factorisation cannot underflow while
  ``span(C) / eps`` stays below the floating-point exponent range (see ``KERNEL_SPAN_LIMIT``).
  ``"scaling"`` runs the same iterates in the scaling domain
  (Cuturi's ``u = a / (K v)``, ``v = b / (K^T u)``) on that row-shifted kernel: two batched
  mat-vecs and two divisions per iteration, four operations in all, with fixed shapes, so the
  loop is cheap to dispatch eagerly and easy to capture in a CUDA graph or ``torch.compile``.
  Same span limit as ``"kernel"``: the scalings then stay within the float exponent range.
  The default, ``"auto"``, is the fastest form at equal error for the costs given
  (:func:`pick_method`): ``"scaling"`` while the span allows it (about 2.4x the kernel form on
  the r50 case of ``benchmarks/bench_ot.py``), else ``"lse"``, the only form exact at any span.
  Every form stays available by name.
* Gradients: ``"envelope"`` detaches the plan and differentiates ``<P, C>`` through ``C`` only
  (Danskin / envelope theorem for the entropic problem); ``"autodiff"`` unrolls the loop.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["OTResult", "sinkhorn", "cosine_cost", "pick_method", "scaling_loop", "KERNEL_SPAN_LIMIT", "LOOPS",
           "METHODS"]

# Largest span(C)/eps for which exp(-span/eps) stays a normal number with margin to spare.
KERNEL_SPAN_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}

_GRAD_MODES = ("envelope", "autodiff")
METHODS = ("auto", "lse", "kernel", "scaling")


def pick_method(span: float, eps: float, dtype: torch.dtype = torch.float32) -> str:
    """The form ``method="auto"`` runs for costs of this span (max - min) at this eps: the
    fastest exact one, ``"scaling"``, while ``span / eps <= KERNEL_SPAN_LIMIT[dtype]``, else
    ``"lse"``. A caller that knows the span (cosine costs: 2) calls this once and passes the
    result, saving ``"auto"``'s one read of the span (a host synchronisation on a GPU)."""
    return "scaling" if span / eps <= KERNEL_SPAN_LIMIT[dtype] else "lse"


@dataclass
class OTResult:
    """Result of :func:`sinkhorn`.

    ``cost`` is the (B,) transport cost ``<P, C>`` (the linear term, as POT's ``sinkhorn2`` and
    ``value_linear``). ``log_u`` and ``log_v`` are the (B, N) and (B, M) log-scalings, so that
    ``P = exp(-C / eps + log_u[:, :, None] + log_v[:, None, :])``; the plan is built on request
    because it is as large as the cost tensor.
    """

    cost: torch.Tensor
    log_u: torch.Tensor
    log_v: torch.Tensor
    cost_matrix: torch.Tensor
    eps: float

    @property
    def plan(self) -> torch.Tensor:
        return torch.exp(-self.cost_matrix / self.eps + self.log_u[:, :, None] + self.log_v[:, None, :])

    @property
    def potentials(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dual potentials (f, g) in cost units."""
        return self.eps * self.log_u, self.eps * self.log_v


def cosine_cost(x: torch.Tensor, y: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Cost ``1 - <x_i, y_j>`` between descriptor sets (B, N, D) and (B, M, D) -> (B, N, M).

    With ``normalize`` (default) the descriptors are L2-normalised first, so the cost lies in
    [0, 2]. Computed in float32 at least, whatever the input dtype.
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"cosine_cost expects (B, N, D) and (B, M, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.to(dtype)
        y = y.to(dtype)
        if normalize:
            x = torch.nn.functional.normalize(x, dim=-1)
            y = torch.nn.functional.normalize(y, dim=-1)
        return 1.0 - torch.bmm(x, y.transpose(1, 2))


def sinkhorn(
    cost: torch.Tensor,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    eps: float = 0.05,
    iters: int = 50,
    grad: str = "envelope",
    eps_start: Optional[float] = None,
    anneal_iters: Optional[int] = None,
    method: str = "auto",
    loop: str = "eager",
) -> OTResult:
    """Entropic OT for a batch of cost matrices by log-domain Sinkhorn.

    Args:
        cost: (B, N, M) costs. Any float dtype; computed in float32 (float64 stays float64).
        a, b: (B, N) and (B, M) non-negative weights, each row summing to the same mass;
            uniform when omitted.
        eps: entropic regularisation, in cost units (> 0).
        iters: number of Sinkhorn iterations (each updates both potentials), fixed.
        grad: ``"envelope"`` (plan detached; gradient only through ``cost``) or ``"autodiff"``
            (unrolled; memory grows with ``iters``).
        eps_start: if given, eps-annealing (epsilon scaling): eps decreases geometrically from
            ``eps_start`` to ``eps`` over the first ``anneal_iters`` iterations (default:
            half of ``iters``), then stays at ``eps``.
        method: ``"auto"`` (default: ``"scaling"`` when ``span(C)/eps`` allows it, else
            ``"lse"``; see :func:`pick_method`), or a form by name: ``"scaling"``, ``"kernel"``,
            ``"lse"`` (see the module docstring). ``"auto"`` reads ``span(C)`` once before the
            loop, which is one host synchronisation on a GPU; pass
            ``pick_method(span, eps)`` when the span is known (cosine costs: 2).
        loop: how the ``"scaling"`` loop runs: ``"eager"``; ``"compile"`` (``torch.compile``,
            one compiled graph per shape and iteration count); ``"cudagraph"`` (captured once
            per shape in a CUDA graph and replayed: one launch per solve; CUDA only, eager
            elsewhere and with ``grad="autodiff"``). Only for the scaling form: with
            ``method="scaling"``, or ``"auto"`` where it picks that form.

    Returns:
        :class:`OTResult` with the (B,) transport cost ``<P, C>``.
    """
    _check_inputs(cost, a, b, eps, iters, grad, eps_start, method)
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    if loop != "eager" and method not in ("scaling", "auto"):
        raise ValueError(f"loop={loop!r} needs method='scaling', got method={method!r}")
    dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=cost.device.type, enabled=False):
        C = cost.to(dtype)
        B, N, M = C.shape
        log_a = _log_weights(a, B, N, C)
        log_b = _log_weights(b, B, M, C)
        schedule = _eps_schedule(eps, iters, eps_start, anneal_iters)

        if method == "auto":
            low, high = torch.aminmax(C.detach())  # one pass, one host read
            span = float((high - low).item())
            method = pick_method(span, min(schedule), dtype)
            if loop != "eager" and method != "scaling":
                raise ValueError(f"loop={loop!r} runs the scaling form, which span(C)/eps = {span / min(schedule):.4g} "
                                 f"exceeds (KERNEL_SPAN_LIMIT {KERNEL_SPAN_LIMIT[dtype]:g}); use loop='eager'")

        solve_grad = grad == "autodiff" and torch.is_grad_enabled()
        with torch.set_grad_enabled(solve_grad):
            C_solve = C if solve_grad else C.detach()
            if method == "scaling":
                log_u, log_v = _iterate_scaling(C_solve, log_a, log_b, schedule, loop if not solve_grad else "eager")
            else:
                log_u, log_v = _iterate(C_solve, log_a, log_b, schedule, method)

        # Envelope: the plan is a constant, so the gradient of <P, C> reaches C only directly.
        C_plan = C if solve_grad else C.detach()
        plan = torch.exp(-C_plan / eps + log_u[:, :, None] + log_v[:, None, :])
        transport = (plan * C).sum(dim=(1, 2))
    return OTResult(cost=transport, log_u=log_u, log_v=log_v, cost_matrix=C, eps=eps)


def _iterate(C, log_a, log_b, schedule, method):
    B, N, M = C.shape
    log_u = torch.zeros(B, N, dtype=C.dtype, device=C.device)
    log_v = _initial_log_v(log_b)
    prev_eps = None
    for eps in schedule:
        if eps != prev_eps:
            if prev_eps is not None:
                # Keep the potentials f = eps * log_u fixed across an eps change (epsilon scaling).
                log_u = log_u * (prev_eps / eps)
                log_v = log_v * (prev_eps / eps)
            prev_eps = eps
            K = -C / eps
            if method == "kernel":
                row_max, E, col_max, Et = _shifted_kernels(K)
        if method == "kernel":
            log_u = log_a - _lse_kernel(E, row_max, log_v)
            log_v = log_b - _lse_kernel(Et, col_max, log_u)
        else:
            log_u = log_a - torch.logsumexp(K + log_v[:, None, :], dim=2)
            log_v = log_b - torch.logsumexp(K + log_u[:, :, None], dim=1)
    return log_u, log_v


def _iterate_scaling(C, log_a, log_b, schedule, loop="eager"):
    """Sinkhorn in the scaling domain with P = u~ * exp(K - rowmax K) * v, u~ = u * exp(rowmax K).

    Exactly the iterates of the log-domain loop (same update order), in exp form. Between eps
    segments the scalings go back to the log domain so the potentials carry over.
    """
    B, N, M = C.shape
    log_u = torch.zeros(B, N, dtype=C.dtype, device=C.device)
    log_v = _initial_log_v(log_b)
    # Row vectors (B, 1, n): a (1, M) x (M, N) bmm is several times faster on CPU than the
    # (N, M) x (M, 1) mat-vec of the same product.
    a, b = torch.exp(log_a).unsqueeze(1), torch.exp(log_b).unsqueeze(1)
    prev_eps = None
    for eps, count in _segments(schedule):
        if prev_eps is not None:
            log_u = log_u * (prev_eps / eps)
            log_v = log_v * (prev_eps / eps)
        prev_eps = eps
        K = -C / eps
        row_max = K.amax(dim=2, keepdim=True)
        E = torch.exp(K - row_max)  # (B, N, M), each row's largest entry is 1
        Et = E.transpose(1, 2).contiguous()
        shift = log_v.amax(dim=1, keepdim=True)  # 0 on the first segment: v starts at exactly 1
        v = torch.exp(log_v - shift).unsqueeze(1)
        u, v = _LOOP_RUNNERS[loop](E, Et, a, b, v, count)
        log_u = torch.log(u).squeeze(1) - row_max.squeeze(2) - shift
        log_v = torch.log(v).squeeze(1) + shift
    return log_u, log_v


def scaling_loop(E, Et, a, b, v, count: int):
    """``count`` Sinkhorn iterations in the scaling domain on fixed shapes: four ops each."""
    u = a
    for _ in range(count):
        u = a / torch.bmm(v, Et)  # u~_i = a_i / sum_j E_ij v_j
        v = b / torch.bmm(u, E)  # v_j = b_j / sum_i u~_i E_ij
    return u, v


_COMPILED: dict = {}


def _loop_compiled(E, Et, a, b, v, count):
    fn = _COMPILED.get("fn")
    if fn is None:
        fn = _COMPILED["fn"] = torch.compile(scaling_loop, dynamic=False, fullgraph=True)
    return fn(E, Et, a, b, v, count)


_GRAPHS: "OrderedDict[tuple, tuple]" = OrderedDict()
MAX_GRAPHS = 8  # captured shapes kept; fixed-shape training needs one


def _loop_cudagraph(E, Et, a, b, v, count):
    """Replay a CUDA graph of :func:`scaling_loop` captured for these shapes (eager off CUDA)."""
    if E.device.type != "cuda" or torch.is_grad_enabled():
        return scaling_loop(E, Et, a, b, v, count)
    inputs = (E, Et, a, b, v)
    key = (tuple(tuple(t.shape) for t in inputs), E.dtype, E.device, count)
    entry = _GRAPHS.get(key)
    if entry is None:
        static = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream(device=E.device)
        side.wait_stream(torch.cuda.current_stream(E.device))
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
            scaling_loop(*static, count)
        torch.cuda.current_stream(E.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a data-loader thread pinning memory meanwhile must not void the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = scaling_loop(*static, count)
        entry = (graph, static, out)
        _GRAPHS[key] = entry
        while len(_GRAPHS) > MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    graph, static, out = entry
    for dst, src in zip(static, inputs):
        dst.copy_(src)
    graph.replay()
    return tuple(t.clone() for t in out)


_LOOP_RUNNERS = {"eager": scaling_loop, "compile": _loop_compiled, "cudagraph": _loop_cudagraph}
LOOPS = tuple(_LOOP_RUNNERS)


def _segments(schedule):
    """[(eps, run length)] of a schedule's consecutive equal values."""
    out = []
    for eps in schedule:
        if out and out[-1][0] == eps:
            out[-1][1] += 1
        else:
            out.append([eps, 1])
    return [(e, n) for e, n in out]


def _initial_log_v(log_b):
    """v = 1 on the support of b and 0 off it, so zero-weight points (padding) are absent from
    the first update too and the iterates equal those of the problem without them."""
    return torch.zeros_like(log_b).masked_fill(torch.isneginf(log_b), -math.inf)


def _shifted_kernels(K):
    row_max = K.amax(dim=2)
    E = torch.exp(K - row_max[:, :, None])
    Kt = K.transpose(1, 2)
    col_max = Kt.amax(dim=2)
    Et = torch.exp(Kt - col_max[:, :, None]).contiguous()
    return row_max, E, col_max, Et


def _lse_kernel(E, row_max, log_w):
    """log sum_j exp(K_ij + log_w_j) given E = exp(K - row_max)."""
    w_max = log_w.amax(dim=1, keepdim=True)
    s = torch.bmm(E, torch.exp(log_w - w_max).unsqueeze(2)).squeeze(2)
    return row_max + w_max + torch.log(s)


def _log_weights(w, B, n, like):
    if w is None:
        return torch.full((B, n), -math.log(n), dtype=like.dtype, device=like.device)
    w = w.detach().to(like.dtype)
    return torch.log(w)


def _eps_schedule(eps, iters, eps_start, anneal_iters):
    if eps_start is None or eps_start <= eps:
        return [float(eps)] * iters
    n = iters // 2 if anneal_iters is None else min(int(anneal_iters), iters)
    if n <= 1:
        return [float(eps)] * iters
    ratio = (eps / eps_start) ** (1.0 / (n - 1))
    return [float(eps_start * ratio**k) for k in range(n - 1)] + [float(eps)] * (iters - n + 1)


def _check_inputs(cost, a, b, eps, iters, grad, eps_start, method):
    if not torch.is_tensor(cost) or cost.dim() != 3:
        raise ValueError(f"cost must be a (B, N, M) tensor, got {getattr(cost, 'shape', type(cost))}")
    if not cost.is_floating_point():
        raise TypeError(f"cost must be a floating tensor, got {cost.dtype}")
    B, N, M = cost.shape
    if N == 0 or M == 0:
        raise ValueError(f"cost has an empty support: shape {tuple(cost.shape)}")
    for name, w, n in (("a", a, N), ("b", b, M)):
        if w is not None and tuple(w.shape) != (B, n):
            raise ValueError(f"{name} must have shape {(B, n)}, got {tuple(w.shape)}")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if eps_start is not None and not (eps_start > 0 and math.isfinite(eps_start)):
        raise ValueError(f"eps_start must be a positive finite number, got {eps_start!r}")
    if not (isinstance(iters, int) and iters >= 1):
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    if grad not in _GRAD_MODES:
        raise ValueError(f"grad must be one of {_GRAD_MODES}, got {grad!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
