"""The same checks on every device (fixture ``device``: cpu, and cuda where a GPU is present).

`pytest -m cuda` runs only the CUDA cases: the first stage of benchmarks/gpu_check.py. Stated
tolerances: the OTFace loss under autocast (fp16 / bf16 backbone outputs) equals the float32
loss to AUTOCAST_RTOL; the OT term alone (computed in float32 whatever the input) to OT_RTOL.
"""
import numpy as np
import pytest
import torch
from conftest import NO_UPSTREAM, UPSTREAM

from otface_plugin.losses import OTFaceLoss, OTFaceTerm, margin_logits
from otface_plugin.mining import hardest_pairs, mine_triplets
from otface_plugin.ot import cosine_cost, sinkhorn

ot = pytest.importorskip("ot", reason="POT is the reference solver (pip install pot>=0.9.6)")
import ot.batch  # noqa: E402

# relative tolerances of the loss under autocast vs float32, per half type (input rounding:
# fp16 keeps 11 significant bits, bf16 8; the margin head's logits are scaled by s = 64)
AUTOCAST_RTOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
OT_RTOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


def problem(device, B=4, N=9, M=11, D=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    C = cosine_cost(torch.randn(B, N, D, generator=g, dtype=dtype), torch.randn(B, M, D, generator=g, dtype=dtype))
    a = torch.rand(B, N, generator=g, dtype=dtype) + 0.1
    b = torch.rand(B, M, generator=g, dtype=dtype) + 0.1
    return C.to(device), (a / a.sum(1, keepdim=True)).to(device), (b / b.sum(1, keepdim=True)).to(device)


@pytest.mark.parametrize("method", ["lse", "kernel", "scaling"])
def test_solver_matches_pot_batch_on_device(device, method):
    C, a, b = problem(device)
    ours = sinkhorn(C, a, b, eps=0.05, iters=20, method=method)
    ref = ot.batch.solve_batch(C, 0.05, a, b, max_iter=20, tol=0.0)  # default log_sinkhorn (POT 0.9.6 and 0.9.7)
    assert ours.cost.device.type == device.type
    torch.testing.assert_close(ours.cost, ref.value_linear, atol=1e-9, rtol=0)
    torch.testing.assert_close(ours.plan, ref.plan, atol=1e-9, rtol=0)


@pytest.mark.parametrize("loop", ["cudagraph", "compile"])
def test_captured_loops_equal_eager(device, loop):
    if loop == "compile" and device.type == "cpu":
        pytest.skip("compiled loop on CPU: tests/test_ot.py::test_compiled_loop_equals_eager (slow)")
    C, a, b = problem(device, B=8, N=49, M=49, D=32, dtype=torch.float32)
    eager = sinkhorn(C, a, b, eps=0.05, iters=10, method="scaling")
    for _ in range(2):  # the second call replays the captured graph on new inputs
        C = C.flip(0)
        eager = sinkhorn(C, a.flip(0), b.flip(0), eps=0.05, iters=10, method="scaling")
        got = sinkhorn(C, a.flip(0), b.flip(0), eps=0.05, iters=10, method="scaling", loop=loop)
        torch.testing.assert_close(got.cost, eager.cost, atol=1e-6, rtol=1e-5)


def conv_batch(device, P=4, K=4, C=32, HW=5, seed=0):
    """Embeddings and conv maps of a P x K batch, identity structure plus noise."""
    g = torch.Generator().manual_seed(seed)
    proto_e = torch.randn(P, 24, generator=g)
    proto_f = torch.randn(P, C, HW, HW, generator=g)
    emb = proto_e.repeat_interleave(K, 0) + 1.2 * torch.randn(P * K, 24, generator=g)
    feats = proto_f.repeat_interleave(K, 0) + 1.2 * torch.randn(P * K, C, HW, HW, generator=g)
    return emb.to(device), feats.to(device), torch.arange(P).repeat_interleave(K).to(device)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_otface_loss_under_autocast_equals_float32(device, half):
    emb, feats, labels = conv_batch(device)
    torch.manual_seed(0)
    loss_fn = OTFaceLoss(num_classes=4, embedding_size=24, lambda_ot=1.0, eps=0.05, iters=30,
                         term_options=dict(triplet_mode="all", ot_form="softplus")).to(device)
    ref = loss_fn(emb, labels, features=feats)
    ref_ot = loss_fn.components()["ot"]
    # a mixed-precision backbone hands over half-precision outputs; the loss runs under autocast
    e16 = emb.to(half).requires_grad_()
    f16 = feats.to(half).requires_grad_()
    with torch.autocast(device_type=device.type, dtype=half):
        got = loss_fn(e16, labels, features=f16)
    assert got.dtype == torch.float32
    got.backward()
    c = loss_fn.components()
    assert abs(c["ot"] - ref_ot) <= OT_RTOL[half] * abs(ref_ot), (c["ot"], ref_ot)
    got, ref = float(got.detach()), float(ref.detach())
    assert abs(got - ref) <= AUTOCAST_RTOL[half] * abs(ref), (got, ref)
    assert torch.isfinite(e16.grad.float()).all() and torch.isfinite(f16.grad.float()).all()
    assert f16.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["hard", "all"])
def test_mining_on_device_equals_cpu(device, mode):
    emb, _, labels = conv_batch(torch.device("cpu"), P=6, K=4, seed=1)
    ref = mine_triplets(emb, labels, mode=mode, margin=0.3)
    got = mine_triplets(emb.to(device), labels.to(device), mode=mode, margin=0.3)
    assert ref[0].numel() > 0
    for r, g_ in zip(ref, got):
        assert g_.device.type == device.type
        assert torch.equal(g_.cpu(), r)


@pytest.mark.parametrize("ot_compile, max_triplets", [("cudagraph", None), ("cudagraph", 5), ("compile", None)])
def test_fixed_shape_term_equals_eager_term(device, ot_compile, max_triplets):
    """Padded, masked triplets (no host sync) give the eager term's value and gradients."""
    if ot_compile == "compile" and device.type == "cpu":
        pytest.skip("compiled loop on CPU: slow; covered by tests/test_ot.py")
    emb, feats, labels = conv_batch(device, P=4, K=4, seed=2)
    values, grads = [], []
    for mode in ("none", ot_compile):
        term = OTFaceTerm(eps=0.05, iters=20, triplet_mode="hard", triplet_margin=0.3,
                          max_triplets=max_triplets, ot_compile=mode)
        f = feats.clone().requires_grad_()
        value = term(emb, labels, features=f)
        value.backward()
        values.append((float(value), term.components()["triplets"], term.components()["w_ap"]))
        grads.append(f.grad)
    assert values[0][1] > 0
    np.testing.assert_allclose(values[1], values[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-7, rtol=1e-4)


def test_fixed_shape_term_without_triplets_is_zero(device):
    emb, feats, _ = conv_batch(device, P=4, K=4)
    labels = torch.arange(16, device=device)  # no label twice: no positive anywhere
    term = OTFaceTerm(iters=5, ot_compile="cudagraph")
    f = feats.clone().requires_grad_()
    value = term(emb, labels, features=f)
    value.backward()
    assert float(value) == 0.0 and term.components()["triplets"] == 0.0
    assert torch.isfinite(f.grad).all()


@pytest.mark.upstream
@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4)], ids=["arcface", "cosface"])
def test_margin_heads_equal_recipe_on_device(device, margins):
    if UPSTREAM is None:
        pytest.skip(NO_UPSTREAM)
    from helpers import random_cosines, recipe_losses_module

    recipe = recipe_losses_module()
    cos, labels = random_cosines(seed=5)
    cos, labels = cos.to(device), labels.to(device)
    theirs = recipe.CombinedMarginLoss(64, *margins)(cos.clone() * 1.0, labels.view(-1, 1))
    ours = margin_logits(cos.clone(), labels, 64.0, *margins)
    assert ours.device.type == device.type
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)


def test_pk_sampler_batches_unchanged_by_device(device):
    """The sampler is host-side: the same plan whatever the device RNG did, and every anchor of
    its batches has a positive and a negative once the labels are on the device."""
    from otface_plugin.data import IdentityIndex, PKSampler

    counts = np.array([3, 7, 4, 12, 5, 9, 6, 8])
    starts = 1 + np.concatenate([[0], np.cumsum(counts)[:-1]])  # record 0 is the .rec header
    index = IdentityIndex.from_ranges(starts, starts + counts)
    labels_of = index.labels()

    def plan():
        return PKSampler(index, batch_size=8, num_instances=4, num_replicas=1, rank=0, seed=3).epoch_indices()

    before = plan()
    torch.randn(64, device=device)  # touch the device's generator
    if device.type == "cuda":
        torch.cuda.manual_seed_all(123)
    assert np.array_equal(plan(), before)
    for batch in before.reshape(-1, 8):
        lab = torch.as_tensor(labels_of[batch], device=device)
        x = torch.nn.functional.normalize(torch.randn(8, 16, device=device), dim=1)
        _, _, valid = hardest_pairs(x @ x.t(), lab)
        assert bool(valid.all())


def test_ot_compile_option_checked_and_accepted_by_recipe_configs():
    from otface_plugin.arcface_torch.config import ConfigError, check_otface_options

    with pytest.raises(ValueError, match="ot_compile"):
        OTFaceTerm(ot_compile="graph")
    check_otface_options({"ot_compile": "cudagraph", "lambda_ot": 0.1})
    with pytest.raises(ConfigError, match="ot_compile"):
        check_otface_options({"ot_compile": "graph"})


def test_fixed_shape_embedding_mode_equals_eager(device):
    # one OT problem over the selected anchors: padded slots carry zero weight
    emb, _, labels = conv_batch(device, P=4, K=4, seed=3)
    values, grads = [], []
    for mode in ("none", "cudagraph"):
        term = OTFaceTerm(eps=0.1, iters=30, feature="embedding", triplet_mode="hard", triplet_margin=-0.05,
                          ot_form="softplus", ot_compile=mode)
        e = emb.clone().requires_grad_()
        value = term(e, labels)
        value.backward()
        values.append((float(value), term.components()["triplets"], term.components()["w_an"]))
        grads.append(e.grad)
    assert 0 < values[0][1] < 16
    np.testing.assert_allclose(values[1], values[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-7, rtol=1e-4)
    none = OTFaceTerm(feature="embedding", ot_compile="cudagraph")
    e = emb.clone().requires_grad_()
    value = none(e, torch.arange(16, device=device))  # no positives: zero, finite gradients
    value.backward()
    assert float(value) == 0.0 and torch.isfinite(e.grad).all()
