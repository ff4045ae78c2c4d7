"""The registered margin heads against reference implementations written here from the papers'
formulas, following the authors' public code conventions (clamps, eps, when the running
statistics move, what is detached): mk-minchul/AdaFace head.py, HuangYG123/CurricularFace
head/metrics.py, fdbtrs/ElasticFace utils/losses.py. The references use the authors' layout
(kernel (D, C), normalised by columns, in-place edits) so they are an independent check of the
plugin's out-of-place formulation."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from otface_plugin import build_loss
from otface_plugin.losses import HEADS, build_margin, heads_table, plugin_heads

C, D, B = 12, 16, 24


def unit_cols(k):
    return k / torch.norm(k, 2, 0, True)


def unit_rows(x):
    return x / torch.norm(x, 2, 1, True)


class RefAdaFace:
    """AdaFace (Kim et al. 2022), the authors' conventions."""

    def __init__(self, kernel, m=0.4, h=0.333, s=64.0, t_alpha=0.01):
        self.kernel, self.m, self.h, self.s, self.t_alpha, self.eps = kernel, m, h, s, t_alpha, 1e-3
        self.batch_mean, self.batch_std = torch.ones(1) * 20, torch.ones(1) * 100

    def __call__(self, emb, norms, label):
        cosine = torch.mm(emb, unit_cols(self.kernel)).clamp(-1 + self.eps, 1 - self.eps)
        safe = torch.clip(norms, min=0.001, max=100).clone().detach()
        with torch.no_grad():
            self.batch_mean = safe.mean() * self.t_alpha + (1 - self.t_alpha) * self.batch_mean
            self.batch_std = safe.std() * self.t_alpha + (1 - self.t_alpha) * self.batch_std
        scaler = torch.clip((safe - self.batch_mean) / (self.batch_std + self.eps) * self.h, -1, 1)
        onehot = torch.zeros_like(cosine).scatter_(1, label.view(-1, 1), 1.0)
        theta = torch.clip(cosine.acos() + onehot * (-self.m * scaler), min=self.eps, max=math.pi - self.eps)
        return (theta.cos() - onehot * (self.m + self.m * scaler)) * self.s


class RefCurricularFace:
    """CurricularFace (Huang et al. 2020), the authors' conventions."""

    def __init__(self, kernel, m=0.5, s=64.0):
        self.kernel, self.m, self.s, self.t = kernel, m, s, torch.zeros(1)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.threshold, self.mm = math.cos(math.pi - m), math.sin(math.pi - m) * m

    def __call__(self, emb, label):
        cos = torch.mm(unit_rows(emb), unit_cols(self.kernel)).clamp(-1, 1)
        target = cos[torch.arange(cos.shape[0]), label].view(-1, 1)
        cos_m = target * self.cos_m - torch.sqrt(1.0 - target ** 2) * self.sin_m
        mask = cos > cos_m
        final = torch.where(target > self.threshold, cos_m, target - self.mm)
        hard = cos[mask]
        with torch.no_grad():
            self.t = target.mean() * 0.01 + 0.99 * self.t
        cos[mask] = hard * (self.t + hard)
        cos.scatter_(1, label.view(-1, 1), final)
        return cos * self.s


class RefElastic:
    """ElasticFace-Arc / -Cos (Boutros et al. 2022), the authors' conventions."""

    def __init__(self, kernel, arc, m, std, plus, s=64.0):
        self.kernel, self.arc, self.m, self.std, self.plus, self.s = kernel, arc, m, std, plus, s

    def __call__(self, emb, label):
        cos = torch.mm(unit_rows(emb), unit_cols(self.kernel)).clamp(-1, 1)
        index = torch.where(label != -1)[0]
        m_hot = torch.zeros(index.size(0), cos.size(1))
        margin = torch.normal(mean=self.m, std=self.std, size=label[index, None].size())
        if self.plus:
            with torch.no_grad():
                _, order = torch.sort(cos[index, label.view(-1)].detach().clone(), dim=0, descending=True)
                margin, _ = torch.sort(margin, dim=0)
            m_hot.scatter_(1, label[index, None], margin[order])
        else:
            m_hot.scatter_(1, label[index, None], margin)
        if self.arc:
            cos.acos_()
            cos[index] += m_hot
            return cos.cos_().mul_(self.s)
        cos[index] -= m_hot
        return cos * self.s


def batch(step, spread=True):
    """Embeddings near their class centres with varied norms (AdaFace needs a spread of norms)."""
    g = torch.Generator().manual_seed(1000 + step)
    centres = torch.randn(C, D, generator=torch.Generator().manual_seed(7))
    labels = torch.randint(0, C, (B,), generator=g)
    x = unit_rows(centres[labels]) + 0.8 * torch.randn(B, D, generator=g)
    scale = torch.empty(B, 1).uniform_(2, 40, generator=g) if spread else torch.ones(B, 1)
    return unit_rows(x) * scale, labels


def ours_vs_ref(name, make_ref, steps=5, options=None, seeded=False):
    """Run the plugin's head and the reference on the same centres, inputs and (initial) running
    state for several steps; compare loss and both gradients at every step."""
    ours = build_loss(name, num_classes=C, embedding_size=D, **(options or {}))
    kernel = ours.weight.detach().t().clone().requires_grad_(True)  # authors' (D, C) layout
    ref = make_ref(kernel)
    for step in range(steps):
        x, y = batch(step)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ours.zero_grad()
        kernel.grad = None
        if seeded:
            torch.manual_seed(step)
        loss = ours(x1, y)
        loss.backward()
        if seeded:
            torch.manual_seed(step)
        if isinstance(ref, RefAdaFace):
            norms = torch.norm(x2, 2, 1, True)
            logits = ref(x2 / norms, norms, y)
        else:
            logits = ref(x2, y)
        ref_loss = F.cross_entropy(logits, y)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5, msg=f"{name} loss, step {step}")
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5, msg=f"{name} input grad, step {step}")
        torch.testing.assert_close(ours.weight.grad, kernel.grad.t(), rtol=1e-5, atol=1e-5,
                                   msg=f"{name} weight grad, step {step}")
    return ours, ref


@pytest.mark.parametrize("t_alpha", [0.01, 0.5])
def test_adaface_equals_reference_over_steps(t_alpha):
    ours, ref = ours_vs_ref("adaface", lambda k: RefAdaFace(k, t_alpha=t_alpha), options={"t_alpha": t_alpha})
    torch.testing.assert_close(ours.margin.batch_mean, ref.batch_mean.view(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.margin.batch_std, ref.batch_std.view(1), rtol=1e-6, atol=1e-6)
    if t_alpha == 0.5:  # the statistics really moved, and the margin really varies per sample
        assert float(ours.margin.batch_std) < 50  # norms spread over [2, 40]: std ~11, from 100


def test_curricularface_equals_reference_over_steps():
    ours, ref = ours_vs_ref("curricularface", RefCurricularFace)
    assert float(ours.margin.t) != 0
    torch.testing.assert_close(ours.margin.t, ref.t.view(1), rtol=1e-6, atol=1e-7)


def test_curricularface_reference_has_hard_negatives():
    """The comparison above means something only if some negatives are modulated."""
    x, y = batch(0)
    ours = build_loss("curricularface", num_classes=C, embedding_size=D)
    cos = F.linear(F.normalize(x), F.normalize(ours.weight)).detach()
    target = cos[torch.arange(B), y]
    cos_m = torch.cos(torch.acos(target) + 0.5)
    hard = (cos > cos_m[:, None]).sum() - (target > cos_m).sum()
    assert hard > 0


@pytest.mark.parametrize("name,arc,m", [("elasticface_arc", True, 0.5), ("elasticface_cos", False, 0.35)])
@pytest.mark.parametrize("plus", [False, True])
def test_elasticface_equals_reference_with_the_same_draws(name, arc, m, plus):
    ours_vs_ref(name, lambda k: RefElastic(k, arc, m, 0.05, plus), options={"plus": plus}, seeded=True)


@pytest.mark.parametrize("name,m", [("elasticface_arc", 0.5), ("elasticface_cos", 0.35)])
def test_elasticface_margins_follow_the_normal(name, m):
    head = build_margin(name, std=0.05)
    labels = torch.arange(20000) % C
    cosine = torch.rand(20000, C) * 2 - 1
    _, rows, cols = head.targets(labels)
    drawn = head.margins(cosine, rows, cols)
    assert abs(float(drawn.mean()) - m) < 0.002 and abs(float(drawn.std()) - 0.05) < 0.002


def test_elasticface_plus_gives_sorted_margins_in_the_authors_order():
    head = build_margin("elasticface_arc", plus=True)
    cosine = torch.rand(B, C) * 2 - 1
    labels = torch.randint(0, C, (B,))
    _, rows, cols = head.targets(labels)
    torch.manual_seed(3)
    got = head.margins(cosine, rows, cols)
    torch.manual_seed(3)
    drawn = torch.normal(0.5, 0.05, size=(B, 1)).view(-1)
    order = torch.sort(cosine[rows, cols], descending=True)[1]
    torch.testing.assert_close(got, torch.sort(drawn)[0][order])


@pytest.mark.parametrize("name", sorted(HEADS))
def test_running_state_round_trips_through_the_state_dict(name):
    a = build_loss(name, num_classes=C, embedding_size=D)
    for step in range(3):
        a(*batch(step)).backward()
    b = build_loss(name, num_classes=C, embedding_size=D)
    b.load_state_dict(a.state_dict())
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value)
    torch.manual_seed(0)
    la = a(*batch(9))
    torch.manual_seed(0)
    lb = b(*batch(9))
    torch.testing.assert_close(la, lb)


def test_combined_margin_is_a_head_the_recipe_computes_itself():
    assert {"arcface", "cosface", "combined"} <= set(HEADS)
    assert not {"arcface", "cosface", "combined"} & set(plugin_heads())
    assert {"adaface", "curricularface"} <= set(plugin_heads())


def _no_target_batches():
    x, y = batch(0)
    return {"all ignored": (x, torch.full_like(y, -1)), "empty": (x[:0], y[:0])}


@pytest.mark.parametrize("case", ["all ignored", "empty"])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_batch_without_labels_gives_zero_and_finite_gradients(name, case):
    x, y = _no_target_batches()[case]
    x = x.clone().requires_grad_()
    loss = build_loss(name, num_classes=C, embedding_size=D)
    value = loss(x, y)
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(loss.weight.grad).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(b).all() for b in loss.buffers())  # running statistics not poisoned


@pytest.mark.parametrize("case", ["all ignored", "empty"])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_otface_with_any_head_gives_zero_on_a_batch_without_labels(name, case):
    from otface_plugin.losses import OTFaceLoss

    x, y = _no_target_batches()[case]
    x = x.clone().requires_grad_()
    loss = OTFaceLoss(num_classes=C, embedding_size=D, margin=name, feature="embedding", lambda_ot=1.0)
    value = loss(x, y)
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(loss.head.weight.grad).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", sorted(HEADS))
def test_labels_minus_one_are_ignored(name):
    x, y = batch(0)
    y2 = y.clone()
    y2[::3] = -1
    loss = build_loss(name, num_classes=C, embedding_size=D)
    assert torch.isfinite(loss(x, y2))


@pytest.mark.parametrize("name,options,match", [
    ("adaface", {"m": -0.1}, "adaface option m must be >= 0"),
    ("adaface", {"t_alpha": 2}, "t_alpha"),
    ("curricularface", {"s": 0}, "curricularface option s must be > 0"),
    ("elasticface_arc", {"plus": "yes"}, "plus must be true or false"),
    ("elasticface_cos", {"std": True}, "std must be a finite number"),
])
def test_bad_options_are_clear_errors(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_loss(name, num_classes=C, **options)


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(TypeError, match="accepted options: .*t_alpha"):
        build_loss("adaface", num_classes=C, alpha=0.1)
    with pytest.raises(TypeError, match="unknown option.*'curricularface'"):
        build_margin("curricularface", std=0.1)


def test_adaface_without_norms_is_a_clear_error():
    head = build_margin("adaface")
    with pytest.raises(ValueError, match="embedding norm"):
        head(torch.zeros(4, C), torch.zeros(4, dtype=torch.long))


def test_heads_table_lists_every_head_with_its_defaults():
    table = heads_table()
    for name in HEADS:
        assert f"`{name}`" in table
    assert "`t_alpha=0.01`" in table and "`std=0.05`" in table


# ----------------------------------------------------------------------------------------------
# inside the recipe's PartialFC_V2 (upstream module, CPU-patched copy), 2 gloo ranks
def _pfc_worker(rank, world, port, root, name, options, out):
    import os
    import sys

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sys.path.insert(0, root)
    from partial_fc_v2 import PartialFC_V2

    from otface_plugin.arcface_torch.hooks import install_margin

    # 20 classes per rank, 10 sampled; at most 8 positives per step, so every step draws the
    # random negatives (and each rank consumes the generator alike)
    classes, dim, local_batch = 40, 16, 4
    pfc = PartialFC_V2(lambda logits, labels: logits, dim, classes, sample_rate=0.5)
    install_margin(pfc, build_margin(name, **options))
    rng = {}  # the generator state the margin function starts from (ElasticFace draws from it)
    pfc.margin_softmax.register_forward_pre_hook(lambda module, args: rng.update(state=torch.get_rng_state()))
    weight = torch.randn(classes, dim, generator=torch.Generator().manual_seed(5))
    pfc.weight.data.copy_(weight[pfc.class_start:pfc.class_start + pfc.num_local])
    standalone = build_loss(name, num_classes=classes, embedding_size=dim, **options)
    rows = slice(rank * local_batch, (rank + 1) * local_batch)
    result = {"loss": [], "ref": [], "grad_diff": [], "sampled": []}
    for step in range(4):
        g = torch.Generator().manual_seed(50 + step)
        labels = torch.randint(0, classes, (world * local_batch,), generator=g)
        x = unit_rows(weight[labels] + torch.randn(world * local_batch, dim, generator=g))
        x = x * torch.empty(world * local_batch, 1).uniform_(2, 40, generator=g)
        local = x[rows].clone().requires_grad_(True)
        torch.manual_seed(1000 + step)  # the same on every rank, as the recipe's setup_seed
        loss = pfc(local, labels[rows].clone())
        loss.backward()
        # the sampled class centres of every rank, in rank order: PartialFC_V2's column order
        index = pfc.class_start + pfc.weight_index
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([index.numel()]))
        padded = torch.full((int(max(sizes)),), -1, dtype=torch.long)
        padded[:index.numel()] = index
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        sampled = torch.cat([p[:int(n)] for p, n in zip(parts, sizes)])
        # the standalone head on the gathered batch over those centres (no sampling of its own)
        position = torch.full((classes,), -1, dtype=torch.long)
        position[sampled] = torch.arange(sampled.numel())
        standalone.weight = torch.nn.Parameter(weight[sampled].clone())
        xr = x.clone().requires_grad_(True)
        torch.set_rng_state(rng["state"])
        ref = standalone(xr, position[labels])
        ref.backward()
        result["loss"].append(float(loss.detach()))
        result["ref"].append(float(ref.detach()))
        # PartialFC_V2's all-gather scales the input gradient by the world size (DDP averages it)
        result["grad_diff"].append(float((local.grad / world - xr.grad[rows]).abs().max()))
        result["sampled"].append(sampled.numel())
    result["state"] = {k: v.clone() for k, v in pfc.margin_softmax.state_dict().items()}
    result["ref_state"] = {k: v.clone() for k, v in standalone.margin.state_dict().items()}
    out[rank] = result
    dist.destroy_process_group()


@pytest.mark.upstream
@pytest.mark.slow
@pytest.mark.parametrize("name,options", [
    ("adaface", {"t_alpha": 0.5}), ("curricularface", {}), ("elasticface_arc", {}),
    ("elasticface_arc", {"plus": True}), ("elasticface_cos", {"plus": True}),
])
def test_partial_fc_v2_with_sampling_equals_the_standalone_head(name, options, tmp_path):
    import torch.multiprocessing as mp

    from conftest import copy_upstream, free_port
    from otface_plugin.arcface_torch import installer

    root = copy_upstream(tmp_path / "arcface_torch")
    installer.install(root)  # the CPU fallback: upstream's PartialFC_V2 calls .cuda()
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_pfc_worker, args=(world, free_port(), str(root), name, options, out), nprocs=world, join=True)
        results = dict(out)
    for rank in range(world):
        r = results[rank]
        assert all(n < 40 for n in r["sampled"]), r["sampled"]  # sampling really dropped classes
        for step, (a, b) in enumerate(zip(r["loss"], r["ref"])):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-5), (rank, step, r["loss"], r["ref"])
        assert max(r["grad_diff"]) < 1e-5, r["grad_diff"]
        for key, value in r["state"].items():  # running state equal to the standalone's, on every rank
            torch.testing.assert_close(value, r["ref_state"][key], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(value, results[0]["state"][key])
    assert results[0]["loss"] == pytest.approx(results[1]["loss"])


# ----------------------------------------------------------------------------------------------
# config keys and the recipe hook
def _cfg(**keys):
    from easydict import EasyDict

    return EasyDict({"margin_list": (1.0, 0.5, 0.0), "batch_size": 16, **keys})


class _FakePFC(torch.nn.Module):
    """What build_head needs of PartialFC_V2: a ``margin_softmax`` submodule and a forward."""

    def __init__(self):
        super().__init__()
        self.margin_softmax = torch.nn.Identity()
        self.weight = torch.nn.Parameter(torch.randn(C, D))

    def forward(self, local_embeddings, local_labels):
        cosine = F.linear(F.normalize(local_embeddings), F.normalize(self.weight)).clamp(-1, 1)
        return F.cross_entropy(self.margin_softmax(cosine, local_labels.view(-1, 1)), local_labels)


@pytest.mark.parametrize("name", sorted(plugin_heads()))
def test_loss_head_installs_the_margin_into_partial_fc(name):
    from otface_plugin.arcface_torch import build_head, prepare_config

    cfg = prepare_config(_cfg(loss=name.upper(), head_options={"s": 32.0}))
    assert cfg.loss == name and cfg.sampler == "distributed" and cfg.margin_list == (1.0, 0.5, 0.0)
    pfc = _FakePFC()
    head = build_head(cfg, pfc, backbone=torch.nn.Linear(2, 2))
    assert head is pfc and isinstance(pfc.margin_softmax, HEADS[name]) and pfc.margin_softmax.s == 32.0
    x, y = batch(0)
    ref = build_loss(name, num_classes=C, embedding_size=D, s=32.0)
    ref.weight = pfc.weight
    torch.manual_seed(0)
    got = pfc(x, y)  # the norms reach AdaFace through the forward pre-hook
    torch.manual_seed(0)
    torch.testing.assert_close(got, ref(x, y))
    assert set(k.split(".")[0] for k in pfc.state_dict()) == {"weight"} | ({"margin_softmax"} if len(list(
        pfc.margin_softmax.buffers())) else set())


def test_otface_margin_head_goes_under_the_ot_term():
    from otface_plugin.arcface_torch import build_head, prepare_config
    from otface_plugin.arcface_torch.hooks import OTFaceHead

    cfg = prepare_config(_cfg(loss="otface", otface={"margin": "curricularface", "feature": "embedding"},
                              head_options={"m": 0.4}))
    assert cfg.sampler == "pk" and cfg.margin_list == (1.0, 0.5, 0.0)
    pfc = _FakePFC()
    head = build_head(cfg, pfc, backbone=torch.nn.Linear(2, 2))
    assert isinstance(head, OTFaceHead) and head.partial_fc is pfc
    assert isinstance(pfc.margin_softmax, HEADS["curricularface"]) and pfc.margin_softmax.m == 0.4
    assert "loss.margin_loss.margin_softmax.t" in head.state_dict()
    x, y = batch(0)
    assert torch.isfinite(head(x, y))


@pytest.mark.parametrize("keys,match", [
    ({"loss": "adaface", "head_options": {"h": -1}}, "head_options.*adaface option h must be >= 0"),
    ({"loss": "adaface", "head_options": {"std": 0.1}}, "head_options.*unknown option.*accepted options: m, h, s, t_alpha"),
    ({"loss": "arcface", "head_options": {"m": 0.4}}, "head_options.*no margin head"),
    ({"head_options": {"m": 0.4}}, "head_options.*no margin head"),
    ({"loss": "curricularface", "otface": {"margin": "adaface"}}, "otface.*loss is 'curricularface'"),
    ({"loss": "otface", "otface": {"margin": "adafce"}}, "otface.margin.*margin head \\(adaface"),
    ({"loss": "adaface", "interclass_filtering_threshold": 0.3}, "interclass_filtering_threshold.*'adaface'"),
])
def test_head_config_errors_name_the_key(keys, match):
    from otface_plugin.arcface_torch import prepare_config
    from otface_plugin.arcface_torch.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        prepare_config(_cfg(**keys))


def test_standalone_otface_loss_takes_a_head_as_its_margin():
    from otface_plugin.losses import OTFaceLoss

    loss = OTFaceLoss(num_classes=C, embedding_size=D, margin="adaface", feature="embedding",
                      term_options=dict(triplet_mode="all"))
    assert isinstance(loss.margin_loss.margin, HEADS["adaface"])
    x, y = batch(0)
    assert torch.isfinite(loss(x.requires_grad_(), y))
    assert "margin_loss.margin.batch_mean" in loss.state_dict()


def test_bench_study_accepts_the_heads():
    from otface_plugin.bench.cli import build_parser, config_from_args
    from otface_plugin.bench.spec import RunSpec, TrainConfig
    from otface_plugin.bench.train import build_run_loss

    cfg = config_from_args(build_parser().parse_args(["data", "--toy", "--route", "plugin",
                                                 "--losses", "arcface,adaface,otface"]))
    assert cfg.losses == ("arcface", "adaface", "otface")
    loss = build_run_loss(RunSpec("curricularface", 0), TrainConfig(), num_classes=C)
    assert isinstance(loss.margin, HEADS["curricularface"]) and loss.margin.s == TrainConfig().scale
    with pytest.raises(SystemExit, match="unknown loss"):
        config_from_args(build_parser().parse_args(["data", "--toy", "--losses", "arcface,adafce"]))


def test_docs_table_is_the_generated_one():
    from conftest import REPO

    assert heads_table() in (REPO / "docs" / "heads.md").read_text()
