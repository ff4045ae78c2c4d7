"""otface-bench training: identical start and data order for every loss, lr schedule, plan."""
import pytest
import torch

from otface_plugin.bench.data import TrainSet, train_batches
from otface_plugin.bench.model import BenchNet
from otface_plugin.bench.study import ABLATION_GRID, StudyConfig, plan_runs
from otface_plugin.bench.spec import RunSpec, TrainConfig
from otface_plugin.bench.train import build_run_loss, lr_at, train_run
from otface_plugin.data import IdentityIndex


def _tiny_train_set(classes=4, per=6, size=32) -> TrainSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(classes).repeat_interleave(per)
    index = IdentityIndex.from_labels(labels.numpy())
    return TrainSet(images, labels, index)


def test_backbone_has_layer4_7x7_at_112():
    net = BenchNet()
    feats = {}
    net.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("x", o))
    emb = net(torch.zeros(2, 3, 112, 112))
    assert emb.shape == (2, 128) and feats["x"].shape == (2, 128, 7, 7)


def test_all_losses_start_from_the_same_weights():
    cfg = TrainConfig()
    heads = {}
    for loss in ("arcface", "cosface", "otface"):
        torch.manual_seed(3)
        net = BenchNet(cfg.widths, cfg.embedding_size)
        lf = build_run_loss(RunSpec(loss, 3), cfg, 10)
        w = lf.margin_loss.weight if loss == "otface" else lf.weight
        heads[loss] = (net.fc.weight.detach().clone(), w.detach().clone())
    for loss in ("cosface", "otface"):
        assert torch.equal(heads[loss][0], heads["arcface"][0])
        assert torch.equal(heads[loss][1], heads["arcface"][1])


def test_batches_depend_only_on_the_seed():
    ts = _tiny_train_set()
    a = list(train_batches(ts, 8, 2, seed=5, steps=7))
    b = list(train_batches(ts, 8, 2, seed=5, steps=7))
    c = list(train_batches(ts, 8, 2, seed=6, steps=7))
    assert len(a) == 7  # more steps than one epoch (24 // 8 = 3): epochs continue
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))
    for x, y in a:  # P x K: 4 identities x 2 images, values in [-1, 1]
        assert sorted(torch.bincount(y).tolist()) == [2, 2, 2, 2]
        assert x.min() >= -1 and x.max() <= 1


def test_lr_schedule_warmup_then_poly_decay():
    cfg = TrainConfig(steps=100, lr=0.1, warmup_fraction=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.01) and lr_at(9, cfg) == pytest.approx(0.1)
    assert lr_at(10, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 1e-3


def test_train_run_is_deterministic_and_logs_ot_components():
    ts = _tiny_train_set()
    cfg = TrainConfig(steps=6, P=4, K=2, widths=(4, 4, 8, 8), embedding_size=16, log_every=2)
    _, h1, timing = train_run(RunSpec("otface", 0), cfg, ts)
    _, h2, _ = train_run(RunSpec("otface", 0), cfg, ts)
    assert h1 == h2 and h1["step"] == [0, 2, 4, 5]
    assert set(h1) >= {"loss", "margin", "ot", "lambda", "triplets", "w_ap", "w_an"}
    assert timing["ms_per_step_median"] > 0


def test_plan_runs_main_grid_then_ablation():
    cfg = StudyConfig(dataset="x", seeds=(0, 1))
    names = [s.name for s in plan_runs(cfg)]
    assert names[:6] == ["arcface-default-s0", "cosface-default-s0", "otface-default-s0",
                         "arcface-default-s1", "cosface-default-s1", "otface-default-s1"]
    assert len(names) == 6 + len(ABLATION_GRID) and all(n.endswith("-s0") for n in names[6:])
    assert len(plan_runs(StudyConfig(dataset="x", seeds=(0,), ablation=False))) == 3


def test_hard_sampler_batches_follow_the_centres(monkeypatch):
    """--sampler hard: batches hold a seed identity and its nearest identity by the head's
    centres (here: identity c's nearest is c ^ 1), refreshed every HARD_REFRESH_STEPS steps."""
    import otface_plugin.bench.data as bench_data

    monkeypatch.setattr(bench_data, "HARD_REFRESH_STEPS", 2)
    ts = _tiny_train_set(classes=16, per=4)
    centres = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)).repeat_interleave(2, 0)
    pk = list(train_batches(ts, 8, 2, seed=1, steps=12))
    hard = list(train_batches(ts, 8, 2, seed=1, steps=12, sampler="hard", centres=lambda: centres))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(pk[:2], hard[:2]))  # before the first refresh
    for _, y in hard[2:]:  # P = 4: round(0.5 * 4) = 2 of them are a seed and its pair
        ids = y[::2]
        assert ids[0] // 2 == ids[1] // 2
    cfg = TrainConfig(steps=3, P=4, K=2, widths=(4, 4, 8, 8), embedding_size=16)
    _, history, _ = train_run(RunSpec("arcface", 0, sampler="hard"), cfg, ts)
    assert len(history["loss"]) >= 1
