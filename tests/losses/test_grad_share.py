"""The OT term's share of the gradient at the features it reads, and lambda_ot="auto".

The probe's numbers are checked against autograd.grad of each part separately; the adaptive
lambda must reach its target share on a toy problem, stay identical on 2 gloo ranks, and continue
exactly after a resume.
"""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from helpers import TinyBackbone
from otface_plugin.features import FeatureCapture
from otface_plugin import build_loss
from otface_plugin.losses import OTFaceLoss
from otface_plugin.losses.grad_share import share_and_cosine


def batch(step: int, rank: int = 0, classes: int = 4, k: int = 4):
    g = torch.Generator().manual_seed(1000 * rank + step)
    labels = torch.arange(classes).repeat_interleave(k) + classes * rank
    images = torch.randn(len(labels), 3, 16, 16, generator=g) + 0.3 * labels.view(-1, 1, 1, 1).float()
    return images, labels


def make(lam, feature="conv", **options):
    torch.manual_seed(0)
    net = TinyBackbone(dim=16, widths=(8, 16))
    # the flat form (a config's otface: block): the probe's and the term's options beside the loss's
    loss_fn = build_loss("otface", num_classes=8, embedding_size=16, s=16.0, triplet_mode="all", lambda_ot=lam,
                         feature=feature, **options)
    return net, loss_fn


@pytest.mark.parametrize("feature", ["conv", "embedding"])
def test_probe_splits_the_gradient_at_the_features_exactly(feature):
    # embedding: one batch-level problem whose hinge may be inactive; softplus always sends a gradient
    net, loss_fn = make(0.7, feature, ot_form="hinge" if feature == "conv" else "softplus")
    capture = FeatureCapture(net, "layer4")
    images, labels = batch(0)
    emb = net(images)
    feats = capture.pop()
    loss = loss_fn(emb, labels, features=feats)
    at = feats if feature == "conv" else emb
    g_margin, = torch.autograd.grad(loss_fn.margin_loss(emb, labels.clone()), at, retain_graph=True)
    g_total, = torch.autograd.grad(loss, at, retain_graph=True)
    g_ot = g_total - g_margin
    loss.backward()
    ot_norm, margin_norm, dot, lam = loss_fn.grad_stats.tolist()
    assert lam == pytest.approx(0.7)
    assert ot_norm == pytest.approx(float(g_ot.norm()), rel=1e-4) and ot_norm > 0
    assert margin_norm == pytest.approx(float(g_margin.norm()), rel=1e-4)
    assert dot == pytest.approx(float((g_ot * g_margin).sum()), rel=1e-3, abs=1e-9)
    c = loss_fn.components()
    assert c["grad_share"] == pytest.approx(float(g_ot.norm() / g_margin.norm()), rel=1e-4)
    assert -1 <= c["grad_cos"] <= 1


def test_share_is_linear_in_lambda_and_zero_without_triplets():
    shares = {}
    for lam in (0.5, 2.0):
        net, loss_fn = make(lam)
        capture = FeatureCapture(net, "layer4")
        images, labels = batch(0)
        loss_fn(net(images), labels, features=capture.pop()).backward()
        shares[lam] = loss_fn.components()["grad_share"]
    assert shares[2.0] == pytest.approx(4 * shares[0.5], rel=1e-4)
    # one identity per batch: no negative, no triplet, the OT term sends no gradient
    net, loss_fn = make(1.0)
    capture = FeatureCapture(net, "layer4")
    images, _ = batch(0)
    loss_fn(net(images), torch.zeros(len(images), dtype=torch.long), features=capture.pop()).backward()
    c = loss_fn.components()
    assert c["triplets"] == 0 and c["grad_share"] == 0 and c["grad_cos"] == 0


def train(net, loss_fn, steps, start=0, opt=None, rank=0):
    capture = FeatureCapture(net, "layer4")
    opt = opt or torch.optim.SGD([*net.parameters(), *loss_fn.parameters()], lr=0.05)
    shares = []
    for step in range(start, start + steps):
        images, labels = batch(step, rank)
        loss = loss_fn(net(images), labels, features=capture.pop())
        opt.zero_grad()
        loss.backward()
        opt.step()
        shares.append(loss_fn.components()["grad_share"])
    capture.remove()
    return opt, shares


@pytest.mark.parametrize("target", [0.01, 0.5])
def test_auto_lambda_reaches_its_target_share(target):
    net, loss_fn = make("auto", grad_share=target, lambda_rate=0.2)
    fixed_net, fixed = make(1.0)
    _, fixed_shares = train(fixed_net, fixed, 60)
    _, shares = train(net, loss_fn, 60)
    late = sum(shares[-20:]) / 20
    assert late == pytest.approx(target, rel=0.35), (late, shares[-5:])
    assert abs(sum(fixed_shares[-20:]) / 20 - target) > abs(late - target)  # lambda 1 would not
    lam = float(loss_fn.lambda_auto)
    assert 0.01 <= lam <= 1000 and lam != 1.0
    assert loss_fn.components()["lambda"] == pytest.approx(lam)


def test_auto_lambda_stays_within_its_range():
    net, loss_fn = make("auto", grad_share=10.0, lambda_rate=0.5, lambda_range=(0.1, 3.0))
    train(net, loss_fn, 15)
    assert float(loss_fn.lambda_auto) == pytest.approx(3.0, rel=1e-3)  # exp(log 3) in float32


def test_auto_lambda_resumes_exactly(tmp_path):
    net, loss_fn = make("auto", grad_share=0.3, lambda_rate=0.2, warmup_steps=5)
    train(net, loss_fn, 20)
    straight = (float(loss_fn.lambda_auto), loss_fn.grad_stats.clone(), [p.detach().clone() for p in net.parameters()])

    net, loss_fn = make("auto", grad_share=0.3, lambda_rate=0.2, warmup_steps=5)
    opt, _ = train(net, loss_fn, 10)
    torch.save({"net": net.state_dict(), "loss": loss_fn.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    assert {"lambda_auto", "grad_stats", "step"} <= set(loss_fn.state_dict())
    ck = torch.load(tmp_path / "ck.pt")
    net, loss_fn = make("auto", grad_share=0.3, lambda_rate=0.2, warmup_steps=5)
    net.load_state_dict(ck["net"])
    loss_fn.load_state_dict(ck["loss"])
    opt = torch.optim.SGD([*net.parameters(), *loss_fn.parameters()], lr=0.05)
    opt.load_state_dict(ck["opt"])
    train(net, loss_fn, 10, start=10, opt=opt)
    assert float(loss_fn.lambda_auto) == straight[0]
    assert torch.equal(loss_fn.grad_stats, straight[1])
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), straight[2]))


def test_fixed_lambda_keeps_its_checkpoint_keys():
    _, loss_fn = make(0.1)
    assert set(loss_fn.state_dict()) == {"step", "margin_loss.weight"}
    before = {"step": torch.tensor(7), "margin_loss.weight": loss_fn.margin_loss.weight.detach().clone()}
    loss_fn.load_state_dict(before)  # a checkpoint written before the gradient-share diagnostic
    assert int(loss_fn.step) == 7


def test_eval_and_no_grad_forwards_leave_the_lambda_alone():
    net, loss_fn = make("auto", lambda_rate=0.5)
    train(net, loss_fn, 3)
    lam, stats = float(loss_fn.lambda_auto), loss_fn.grad_stats.clone()
    capture = FeatureCapture(net, "layer4")
    images, labels = batch(5)
    with torch.no_grad():
        loss_fn(net(images), labels, features=capture.pop())
    loss_fn.eval()
    loss_fn(net(images), labels, features=capture.pop())
    assert float(loss_fn.lambda_auto) == lam and torch.equal(loss_fn.grad_stats, stats)


@pytest.mark.parametrize("options, message", [
    ({"lambda_ot": "automatic"}, "lambda_ot must be a number >= 0 or 'auto'"),
    ({"lambda_ot": "auto", "grad_share": 0.0}, "grad_share must be > 0"),
    ({"lambda_ot": "auto", "lambda_rate": 1.5}, r"lambda_rate must be in \(0, 1\]"),
    ({"lambda_ot": "auto", "lambda_range": (1.0, 0.1)}, "lambda_range must have low <= high"),
    ({"lambda_ot": "auto", "lambda_range": (0.0, 1.0)}, "lambda_range must be > 0"),
    ({"lambda_ot": "auto", "lambda_range": 5.0}, r"lambda_range must be a pair \(low, high\)"),
])
def test_bad_adaptive_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        build_loss("otface", num_classes=4, embedding_size=8, **options)


def _rank_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = TinyBackbone(dim=16, widths=(8, 16))
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    loss_fn = OTFaceLoss(num_classes=8, embedding_size=16, s=16.0, lambda_ot="auto", grad_share=0.3,
                         term_options=dict(triplet_mode="all"), probe_options=dict(lambda_rate=0.2))
    capture = FeatureCapture(ddp, "layer4")
    opt = torch.optim.SGD([*ddp.parameters(), *loss_fn.parameters()], lr=0.05)
    lambdas, shares = [], []
    for step in range(12):
        images, labels = batch(step, rank)  # each rank its own identities and images
        loss = loss_fn(ddp(images), labels[:16] % 4 + 4 * rank, features=capture.pop())
        opt.zero_grad()
        loss.backward()
        opt.step()
        lambdas.append(float(loss_fn.lambda_auto))
        shares.append(float(share_and_cosine(loss_fn.grad_stats)[0]))
    out[rank] = {"lambdas": lambdas, "shares": shares}
    dist.destroy_process_group()


@pytest.mark.slow
def test_auto_lambda_is_the_same_on_two_gloo_ranks():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_worker, args=(2, free_port(), out), nprocs=2, join=True)
        r = dict(out)
    assert r[0]["lambdas"] == r[1]["lambdas"]  # bit for bit: all-reduced statistics
    assert r[0]["shares"] != r[1]["shares"]  # from different local batches
    assert r[0]["lambdas"][-1] != 1.0 and all(math.isfinite(x) for x in r[0]["lambdas"])
