"""Sinkhorn solver: against POT, closed-form cases, gradients and precision corner cases."""
import numpy as np
import pytest
import torch

from otface_plugin.ot import KERNEL_SPAN_LIMIT, cosine_cost, pick_method, sinkhorn

ot = pytest.importorskip("ot", reason="POT is the reference solver (pip install pot>=0.9.7)")
import ot.batch  # noqa: E402


def random_problem(B=3, N=6, M=8, D=5, seed=0, dtype=torch.float64, weights=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=dtype)
    y = torch.randn(B, M, D, generator=g, dtype=dtype)
    C = cosine_cost(x, y)
    if not weights:
        return C, None, None
    a = torch.rand(B, N, generator=g, dtype=dtype) + 0.1
    b = torch.rand(B, M, generator=g, dtype=dtype) + 0.1
    return C, a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


@pytest.mark.parametrize("method", ["lse", "kernel", "scaling"])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_matches_pot_sinkhorn2_at_convergence(method, weights, eps):
    C, a, b = random_problem(weights=weights, seed=int(eps * 100) + weights)
    ours = sinkhorn(C, a, b, eps=eps, iters=1000, method=method)
    B, N, M = C.shape
    for i in range(B):
        ai = np.full(N, 1 / N) if a is None else a[i].numpy()
        bi = np.full(M, 1 / M) if b is None else b[i].numpy()
        ref_plan = ot.sinkhorn(ai, bi, C[i].numpy(), eps, method="sinkhorn_log", numItermax=5000, stopThr=1e-13)
        ref_cost = ot.sinkhorn2(ai, bi, C[i].numpy(), eps, method="sinkhorn_log", numItermax=5000, stopThr=1e-13)
        assert abs(float(ours.cost[i]) - float(ref_cost)) < 1e-5
        np.testing.assert_allclose(ours.plan[i].numpy(), ref_plan, atol=1e-5)


@pytest.mark.parametrize("method", ["lse", "kernel", "scaling"])
@pytest.mark.parametrize("iters", [1, 7, 50])
def test_matches_pot_batch_solver_iteration_for_iteration(method, iters):
    # Same update order as ot.batch's log-Sinkhorn: equal after any fixed number of iterations.
    C, a, b = random_problem(B=5, weights=True, seed=iters)
    ours = sinkhorn(C, a, b, eps=0.05, iters=iters, method=method)
    ref = ot.batch.solve_batch(C, 0.05, a, b, max_iter=iters, tol=0.0)  # default log_sinkhorn (POT 0.9.6 and 0.9.7)
    torch.testing.assert_close(ours.cost, ref.value_linear, atol=1e-10, rtol=0)
    torch.testing.assert_close(ours.plan, ref.plan, atol=1e-10, rtol=0)


def test_float32_matches_float64_reference():
    C64, a, b = random_problem(B=4, N=49, M=49, D=64, weights=True, seed=3)
    ours = sinkhorn(C64.float(), a.float(), b.float(), eps=0.05, iters=50)
    ref = ot.batch.solve_batch(C64, 0.05, a, b, max_iter=50, tol=0.0)  # default log_sinkhorn (POT 0.9.6 and 0.9.7)
    assert ours.cost.dtype == torch.float32
    torch.testing.assert_close(ours.cost.double(), ref.value_linear, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.plan.double(), ref.plan, atol=1e-5, rtol=0)


def test_kernel_and_lse_agree():
    C, a, b = random_problem(B=6, N=20, M=30, D=8, weights=True, seed=4, dtype=torch.float32)
    r1 = sinkhorn(C, a, b, eps=0.05, iters=30, method="lse")
    r2 = sinkhorn(C, a, b, eps=0.05, iters=30, method="kernel")
    torch.testing.assert_close(r1.cost, r2.cost, atol=1e-6, rtol=1e-5)


def test_plan_marginals():
    C, a, b = random_problem(B=4, N=10, M=12, weights=True, seed=5)
    plan = sinkhorn(C, a, b, eps=0.05, iters=1000).plan
    torch.testing.assert_close(plan.sum(2), a, atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sum(1), b, atol=1e-9, rtol=0)  # last update fixes the columns
    assert (plan >= 0).all()


def test_identical_clouds_cost_nearly_zero():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 20, 32, generator=g, dtype=torch.float64)
    res = sinkhorn(cosine_cost(x, x), eps=0.01, iters=200)
    assert res.cost.abs().max() < 1e-3
    # and the plan is (nearly) the identity coupling
    torch.testing.assert_close(res.plan, torch.eye(20, dtype=torch.float64).expand(3, 20, 20) / 20, atol=1e-4, rtol=0)


def test_permuted_cloud_approaches_exact_assignment():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 12, 3, generator=g, dtype=torch.float64)
    perm = torch.randperm(12, generator=g)
    y = x[:, perm] + 0.3 * torch.randn(1, 12, 3, generator=g, dtype=torch.float64)
    C = cosine_cost(x, y)
    exact = ot.emd2(np.full(12, 1 / 12), np.full(12, 1 / 12), C[0].numpy())
    gaps = []
    for eps in (0.3, 0.1, 0.03, 0.01, 0.003):
        w = sinkhorn(C, eps=eps, iters=3000, eps_start=1.0).cost.item()
        gaps.append(abs(w - exact))
    assert all(g2 <= g1 + 1e-12 for g1, g2 in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 2e-3 and gaps[0] > 10 * gaps[-1], gaps


def test_eps_annealing_converges_faster_at_small_eps():
    C, _, _ = random_problem(B=2, N=30, M=30, D=4, seed=8)
    converged = sinkhorn(C, eps=0.005, iters=3000, eps_start=1.0, anneal_iters=500).cost
    torch.testing.assert_close(converged, sinkhorn(C, eps=0.005, iters=6000).cost, atol=2e-5, rtol=0)
    plain = sinkhorn(C, eps=0.005, iters=60).cost
    annealed = sinkhorn(C, eps=0.005, iters=60, eps_start=1.0).cost
    assert 10 * (annealed - converged).abs().max() < (plain - converged).abs().max()


@pytest.mark.parametrize("grad", ["envelope", "autodiff"])
def test_finite_at_small_eps_and_fp16_inputs(grad):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(8, 49, 64, generator=g).half().requires_grad_()
    y = torch.randn(8, 49, 64, generator=g).half().requires_grad_()
    res = sinkhorn(cosine_cost(x, y), eps=1e-3, iters=50, grad=grad)
    assert res.cost.dtype == torch.float32 and torch.isfinite(res.cost).all()
    res.cost.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert x.grad.abs().sum() > 0


def test_fp32_under_autocast():
    x = torch.randn(4, 16, 8, requires_grad=True)
    y = torch.randn(4, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = sinkhorn(cosine_cost(x, y), eps=0.05, iters=20)
    assert res.cost.dtype == torch.float32
    ref = sinkhorn(cosine_cost(x.detach(), y), eps=0.05, iters=20)
    torch.testing.assert_close(res.cost.detach(), ref.cost, atol=1e-6, rtol=0)


def test_gradcheck_autodiff():
    C, a, b = random_problem(B=2, N=4, M=5, D=3, weights=True, seed=10)
    C.requires_grad_()
    torch.autograd.gradcheck(lambda c: sinkhorn(c, a, b, eps=0.1, iters=10, grad="autodiff").cost, (C,))


def test_gradcheck_envelope():
    # Envelope theorem: at the optimum, d/dC of the entropic objective <P,C> + eps*sum P(log P - 1)
    # is P. Build that objective with the entropy part held constant in backward, so the
    # analytical gradient is exactly what the solver's envelope mode provides.
    C, a, b = random_problem(B=2, N=4, M=5, D=3, weights=True, seed=11)
    C.requires_grad_()
    eps = 0.1

    def objective(c):
        res = sinkhorn(c, a, b, eps=eps, iters=2000, grad="envelope")
        P = res.plan.detach()
        entropy = eps * (P * (torch.log(P) - 1)).sum(dim=(1, 2))
        return res.cost + (entropy - entropy.detach()) + entropy.detach()

    torch.autograd.gradcheck(objective, (C,), atol=1e-6)
    # and the gradient of the transport cost is the plan
    res = sinkhorn(C, a, b, eps=eps, iters=2000)
    (grad,) = torch.autograd.grad(res.cost.sum(), C)
    torch.testing.assert_close(grad, res.plan.detach())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eps=0.0), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(iters=0), "iters"),
        (dict(grad="implicit"), "grad"),
        (dict(method="fast"), "method"),
    ],
)
def test_bad_arguments(kwargs, message):
    C = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match=message):
        sinkhorn(C, **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="B, N, M"):
        sinkhorn(torch.rand(3, 4))
    with pytest.raises(ValueError, match="shape"):
        sinkhorn(torch.rand(2, 3, 4), a=torch.rand(2, 4))
    with pytest.raises(ValueError, match="B, N, D"):
        cosine_cost(torch.rand(2, 3, 4), torch.rand(2, 3, 5))


def test_scaling_equals_lse_with_eps_annealing():
    # eps segments hand the potentials over through the log domain, as the log-domain loop does
    C, a, b = random_problem(B=3, N=30, M=25, D=4, weights=True, seed=12)
    r1 = sinkhorn(C, a, b, eps=0.005, iters=60, eps_start=1.0, method="lse")
    r2 = sinkhorn(C, a, b, eps=0.005, iters=60, eps_start=1.0, method="scaling")
    torch.testing.assert_close(r2.cost, r1.cost, atol=1e-12, rtol=0)
    torch.testing.assert_close(r2.plan, r1.plan, atol=1e-12, rtol=0)


def test_scaling_float32_at_the_span_limit():
    # span(C) / eps = 60, the float32 limit of the exp-form methods: the scalings stay finite
    g = torch.Generator().manual_seed(13)
    C = torch.rand(4, 49, 49, generator=g) * 3.0
    C[:, 0, 0], C[:, 0, 1] = 0.0, 3.0
    ref = sinkhorn(C.double(), eps=0.05, iters=200, method="lse")
    ours = sinkhorn(C, eps=0.05, iters=200, method="scaling")
    assert torch.isfinite(ours.log_u).all() and torch.isfinite(ours.log_v).all()
    torch.testing.assert_close(ours.cost.double(), ref.cost, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.plan.sum(1).double(), torch.full((4, 49), 1 / 49, dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_scaling_autodiff_gradient_equals_lse():
    C, a, b = random_problem(B=2, N=5, M=6, D=3, weights=True, seed=14)
    grads = []
    for method in ("lse", "scaling"):
        c = C.clone().requires_grad_()
        sinkhorn(c, a, b, eps=0.1, iters=15, grad="autodiff", method=method).cost.sum().backward()
        grads.append(c.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-12, rtol=0)


def test_loop_option_checked():
    with pytest.raises(ValueError, match="loop"):
        sinkhorn(torch.rand(2, 3, 4), method="scaling", loop="graph")
    with pytest.raises(ValueError, match="method='scaling'"):
        sinkhorn(torch.rand(2, 3, 4), method="kernel", loop="compile")
    # the default method takes a loop where it picks the scaling form
    C = torch.rand(2, 3, 4)
    assert torch.equal(sinkhorn(C, loop="cudagraph").cost, sinkhorn(C, method="scaling").cost)
    with pytest.raises(ValueError, match="KERNEL_SPAN_LIMIT"):
        sinkhorn(C * 100, loop="cudagraph")


def test_cudagraph_loop_is_eager_off_cuda():
    C, a, b = random_problem(B=3, seed=15)
    r1 = sinkhorn(C, eps=0.05, iters=9, method="scaling")
    r2 = sinkhorn(C, eps=0.05, iters=9, method="scaling", loop="cudagraph")
    assert torch.equal(r1.cost, r2.cost)


@pytest.mark.slow
def test_compiled_loop_equals_eager():
    # torch.compile of the unrolled loop (inductor; needs a C compiler on CPU, ~1 min here)
    pytest.importorskip("torch._inductor")
    C, a, b = random_problem(B=3, N=7, M=9, seed=16, dtype=torch.float32, weights=True)
    r1 = sinkhorn(C, a, b, eps=0.05, iters=4, method="scaling")
    r2 = sinkhorn(C, a, b, eps=0.05, iters=4, method="scaling", loop="compile")
    torch.testing.assert_close(r2.cost, r1.cost, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["lse", "kernel", "scaling"])
def test_zero_weight_points_are_absent_at_every_iteration(method):
    # padding (fixed shapes) must not change the iterates: v starts at 0 off the support of b
    C, a, b = random_problem(B=2, N=6, M=7, weights=True, seed=17)
    padded = torch.nn.functional.pad(C, (0, 3, 0, 2), value=0.5)
    a0 = torch.nn.functional.pad(a, (0, 2))
    b0 = torch.nn.functional.pad(b, (0, 3))
    for iters in (1, 5):
        small = sinkhorn(C, a, b, eps=0.05, iters=iters, method=method)
        big = sinkhorn(padded, a0, b0, eps=0.05, iters=iters, method=method)
        torch.testing.assert_close(big.cost, small.cost, atol=1e-12, rtol=0)
        torch.testing.assert_close(big.plan[:, :6, :7], small.plan, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_default_method_is_scaling_within_the_span_limit_else_lse(dtype, monkeypatch):
    # the public default is the fastest exact form for the costs given: scaling while
    # span/eps <= KERNEL_SPAN_LIMIT, log-sum-exp beyond; same numbers as asking for it by name
    import otface_plugin.ot as ot_module

    ran = []
    real_scaling, real_iterate = ot_module._iterate_scaling, ot_module._iterate
    monkeypatch.setattr(ot_module, "_iterate_scaling", lambda *a, **k: ran.append("scaling") or real_scaling(*a, **k))
    monkeypatch.setattr(ot_module, "_iterate", lambda *a, **k: ran.append(a[4]) or real_iterate(*a, **k))
    limit = KERNEL_SPAN_LIMIT[dtype]
    g = torch.Generator().manual_seed(18)
    eps = 0.5
    for span, expected in ((2.0, "scaling"), (limit * eps, "scaling"), (limit * eps * 1.5, "lse")):
        C = (torch.rand(3, 9, 8, generator=g, dtype=torch.float64) * span).to(dtype)
        C[:, 0, 0], C[:, 0, 1] = 0.0, span  # span(C) / eps exactly as given
        assert pick_method(span, eps, dtype) == expected
        ran.clear()
        default = sinkhorn(C, eps=eps, iters=20)
        assert ran == [expected]
        named = sinkhorn(C, eps=eps, iters=20, method=expected)
        assert torch.equal(default.cost, named.cost)
        assert torch.equal(default.log_u, named.log_u) and torch.equal(default.log_v, named.log_v)
