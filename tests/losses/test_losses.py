"""Margin heads (against a reference derivation and, when available, the recipe's own code)
and the OTFace loss."""
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F
import torch.nn.functional as F

from otface_plugin.features import FeatureCapture
from otface_plugin.losses import OTFaceLoss, OTFaceTerm, margin_logits
from otface_plugin.losses.components import COMPONENTS
from helpers import TinyBackbone, random_cosines, recipe_losses_module

MARGINS = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4), "sphereface-like": (1.35, 0.0, 0.0),
           "combined": (1.0, 0.3, 0.2)}


def reference_logits(cos, labels, s, m1, m2, m3):
    """Combined margin, derived independently in numpy float64: target -> cos(m1*acos(c)+m2)-m3."""
    out = cos.astype(np.float64).copy()
    for i, y in enumerate(labels):
        if y >= 0:
            out[i, y] = math.cos(m1 * math.acos(cos[i, y]) + m2) - m3
    return out * s


@pytest.mark.parametrize("name", list(MARGINS))
def test_margin_logits_match_reference_derivation(name):
    m1, m2, m3 = MARGINS[name]
    cos, labels = random_cosines(seed=len(name))
    got = margin_logits(cos, labels, 64.0, m1, m2, m3).double().numpy()
    np.testing.assert_allclose(got, reference_logits(cos.numpy(), labels.numpy(), 64.0, m1, m2, m3), atol=1e-4)


@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_recipe_gradient_is_straight_through_on_the_angle(name):
    # arcface_torch edits the target logit under no_grad, so d loss / d cos = s * (softmax - onehot) / B
    m1, m2, m3 = MARGINS[name]
    cos, labels = random_cosines(seed=1)
    labels[3] = 2
    cos.requires_grad_()
    logits = margin_logits(cos, labels, 64.0, m1, m2, m3)
    F.cross_entropy(logits, labels).backward()
    expected = 64.0 * (torch.softmax(logits.detach(), 1) - F.one_hot(labels, 10)) / len(labels)
    torch.testing.assert_close(cos.grad, expected, atol=1e-5, rtol=1e-4)


def test_exact_gradient_differentiates_the_formula():
    cos, labels = random_cosines(seed=2)
    labels[3] = 0
    cos = cos.double().requires_grad_()
    torch.autograd.gradcheck(lambda c: margin_logits(c, labels, 8.0, 1.0, 0.5, 0.1, grad="exact"), (cos,))


def test_interclass_filtering_zeroes_non_target_cosines():
    cos = torch.tensor([[0.5, 0.45, -0.2], [0.41, 0.1, 0.9]])
    out = margin_logits(cos, torch.tensor([0, 2]), 1.0, 1.0, 0.0, 0.0, interclass_filtering_threshold=0.4)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.0, -0.2], [0.0, 0.1, 0.9]]))


@pytest.mark.upstream
@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_equal_to_recipe_combined_margin_loss(name):
    recipe = recipe_losses_module()
    m1, m2, m3 = MARGINS[name]
    cos, labels = random_cosines(seed=3)
    theirs_in = cos.clone().requires_grad_()
    ours_in = cos.clone().requires_grad_()
    theirs = recipe.CombinedMarginLoss(64, m1, m2, m3)(theirs_in * 1.0, labels.view(-1, 1))
    ours = margin_logits(ours_in, labels, 64.0, m1, m2, m3)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    valid = labels != -1
    F.cross_entropy(theirs[valid], labels[valid]).backward()
    F.cross_entropy(ours[valid], labels[valid]).backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-5, rtol=1e-4)


def pk_batch(P=4, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(P, 3, 16, 16, generator=g)
    images = protos.repeat_interleave(K, 0) + 0.8 * torch.randn(P * K, 3, 16, 16, generator=g)
    return images, torch.arange(P).repeat_interleave(K)


def test_otface_loss_finite_and_gradients_reach_conv_features():
    torch.manual_seed(0)
    net = TinyBackbone()
    capture = FeatureCapture(net, "layer4")
    loss_fn = OTFaceLoss(num_classes=4, embedding_size=32, lambda_ot=1.0, term_options=dict(triplet_mode="all"))
    images, labels = pk_batch()
    emb = net(images)
    conv = capture.pop()
    conv.retain_grad()
    loss = loss_fn(emb, labels, features=conv)
    loss.backward()
    c = loss_fn.components()
    assert set(c) == set(COMPONENTS)
    assert math.isfinite(c["loss"]) and c["triplets"] == 16 and c["ot"] > 0
    assert c["loss"] == pytest.approx(c["margin"] + c["lambda"] * c["ot"], rel=1e-6)
    assert torch.isfinite(conv.grad).all() and conv.grad.abs().sum() > 0
    # the OT part alone moves the conv stage
    net.zero_grad()
    emb = net(images)
    loss_fn.ot_term(emb, labels, capture.pop()).backward()
    assert net.layer4.weight.grad.abs().sum() > 0


def test_ot_term_matches_manual_computation():
    from otface_plugin.mining import mine_triplets
    from otface_plugin.ot import cosine_cost, sinkhorn

    torch.manual_seed(1)
    emb, feats = torch.randn(8, 16), torch.randn(8, 12, 3, 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    term = OTFaceTerm(triplet_mode="all", ot_margin=0.5, eps=0.1, iters=80)
    value = term(emb, labels, feats)
    a, p, n = mine_triplets(emb, labels, mode="all")
    d = F.normalize(feats.flatten(2).transpose(1, 2), dim=2)
    w_ap = sinkhorn(cosine_cost(d[a], d[p]), eps=0.1, iters=80, method="lse").cost
    w_an = sinkhorn(cosine_cost(d[a], d[n]), eps=0.1, iters=80, method="lse").cost
    torch.testing.assert_close(value, torch.relu(w_ap - w_an + 0.5).mean(), atol=1e-6, rtol=1e-5)


def test_no_triplets_gives_zero_not_nan():
    loss_fn = OTFaceLoss(num_classes=8, embedding_size=16)
    emb = torch.randn(8, 16, requires_grad=True)
    loss = loss_fn(emb, torch.arange(8), features=torch.randn(8, 4, 2, 2))
    loss.backward()
    c = loss_fn.components()
    assert c["ot"] == 0.0 and c["triplets"] == 0 and torch.isfinite(emb.grad).all()


def test_ignored_labels_take_no_part_in_the_ot_term():
    # -1 samples were once mined as each other's positives; a batch of only -1 was NaN
    torch.manual_seed(3)
    emb, feats = torch.randn(8, 16), torch.randn(8, 4, 2, 2)
    labels = torch.tensor([0, 0, 1, 1, -1, -1, -1, -1])
    term = OTFaceTerm(triplet_mode="all", ot_margin=0.5)
    value = term(emb, labels, feats)
    assert term.components()["triplets"] == 4
    # the -1 samples' features do not matter: change them, same value
    feats2 = feats.clone()
    feats2[4:] = torch.randn(4, 4, 2, 2)
    torch.testing.assert_close(term(emb, labels, feats2), value)
    loss_fn = OTFaceLoss(num_classes=4, embedding_size=16, lambda_ot=1.0, term_options=dict(triplet_mode="all"))
    emb = torch.randn(8, 16, requires_grad=True)
    loss = loss_fn(emb, torch.full((8,), -1), features=feats)
    loss.backward()
    c = loss_fn.components()
    assert c["ot"] == 0.0 and c["triplets"] == 0 and c["loss"] == 0.0 and torch.isfinite(emb.grad).all()


def test_empty_batch_gives_zero():
    loss_fn = OTFaceLoss(num_classes=4, embedding_size=16, term_options=dict(triplet_mode="all"))
    emb = torch.zeros(0, 16, requires_grad=True)
    loss = loss_fn(emb, torch.zeros(0, dtype=torch.long), features=torch.zeros(0, 4, 2, 2))
    loss.backward()
    assert loss.item() == 0.0 and loss_fn.components()["ot"] == 0.0


@pytest.mark.parametrize("where", ["embeddings", "conv features"])
def test_non_finite_inputs_are_a_clear_error(where):
    from otface_plugin.mining import NonFiniteError

    emb, feats = torch.randn(8, 16), torch.randn(8, 4, 2, 2)
    (emb if where == "embeddings" else feats)[6].view(-1)[0] = float("nan")
    loss_fn = OTFaceLoss(num_classes=4, embedding_size=16)
    with pytest.raises(NonFiniteError, match=rf"^{where} hold 1 NaN/inf values .*batch samples \[6\]"):
        loss_fn(emb, torch.arange(4).repeat_interleave(2), features=feats)


@pytest.mark.parametrize("ot_compile", ["none", "cudagraph", "compile"])
@pytest.mark.parametrize("where, feature", [("embeddings", "conv"), ("conv features", "conv"),
                                            ("embeddings", "embedding")])
def test_non_finite_inputs_raise_the_same_error_on_every_path(where, feature, ot_compile):
    from otface_plugin.mining import NonFiniteError

    emb, feats = torch.randn(8, 16), torch.randn(8, 4, 2, 2)
    bad = emb if where == "embeddings" else feats
    bad[6].view(-1)[0] = float("nan")
    bad[2].view(-1)[1] = float("inf")
    loss_fn = OTFaceLoss(num_classes=4, embedding_size=16, feature=feature, term_options=dict(ot_compile=ot_compile))
    with pytest.raises(NonFiniteError) as err:
        loss_fn(emb, torch.arange(4).repeat_interleave(2), features=feats if feature == "conv" else None)
    assert str(err.value).startswith(f"{where} hold 2 NaN/inf values of {bad.numel()} (batch samples [2, 6])")


def test_embedding_feature_mode():
    loss_fn = OTFaceLoss(num_classes=4, embedding_size=16, feature="embedding", lambda_ot=1.0,
                         term_options=dict(triplet_mode="all"))
    emb = torch.randn(16, 16, requires_grad=True)
    loss = loss_fn(emb, torch.arange(4).repeat_interleave(4))
    loss.backward()
    assert loss_fn.components()["triplets"] == 16 and torch.isfinite(emb.grad).all()


def test_misclassified_mode_uses_own_head_logits():
    torch.manual_seed(2)
    loss_fn = OTFaceLoss(num_classes=4, embedding_size=16, feature="embedding",
                         term_options=dict(triplet_mode="misclassified"))
    emb = torch.randn(16, 16)
    labels = torch.arange(4).repeat_interleave(4)
    loss_fn(emb, labels)
    cosine = F.linear(F.normalize(emb), F.normalize(loss_fn.margin_loss.weight.detach()))
    wrong = (cosine.argmax(1) != labels).sum().item()
    assert loss_fn.components()["triplets"] == wrong > 0


def test_warmup_and_step_buffer_resume():
    loss_fn = OTFaceLoss(num_classes=4, embedding_size=16, lambda_ot=0.2, warmup_steps=4, feature="embedding")
    emb, labels = torch.randn(8, 16), torch.arange(4).repeat_interleave(2)
    lambdas = []
    for _ in range(6):
        loss_fn(emb, labels)
        lambdas.append(loss_fn.components()["lambda"])
    assert lambdas == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2])
    resumed = OTFaceLoss(num_classes=4, embedding_size=16, lambda_ot=0.2, warmup_steps=4, feature="embedding")
    resumed.load_state_dict(loss_fn.state_dict())
    assert int(resumed.step) == 6
    loss_fn.eval()
    loss_fn(emb, labels)
    assert int(loss_fn.step) == 6  # evaluation does not advance the schedule


def test_external_margin_loss_is_used():
    calls = []

    def margin(emb, labels):
        calls.append(labels.shape)
        labels.squeeze_()  # as PartialFC_V2 does
        return emb.sum() * 0 + 1.5

    loss_fn = OTFaceLoss(head=margin, feature="embedding", lambda_ot=0.0)
    out = loss_fn(torch.randn(6, 8), torch.tensor([[0], [0], [1], [1], [2], [2]]))
    assert out.item() == 1.5 and calls == [torch.Size([6])]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eps=0.0), "eps"),
        (dict(eps=1e-6), "eps"),
        (dict(lambda_ot=float("nan")), "lambda_ot"),
        (dict(lambda_ot=-1.0), "lambda_ot"),
        (dict(feature="pixels"), "feature"),
        (dict(triplet_mode="semi"), "triplet_mode"),
        (dict(ot_form="square"), "ot_form"),
        (dict(iters=0), "iters"),
        (dict(warmup_steps=-3), "warmup_steps"),
        (dict(margin="sphereface"), "margin"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    from otface_plugin import build_loss

    with pytest.raises(ValueError, match=message):
        build_loss("otface", num_classes=4, embedding_size=8, **kwargs)


def test_conv_mode_without_features_is_a_clear_error():
    loss_fn = OTFaceLoss(num_classes=4, embedding_size=8)
    with pytest.raises(ValueError, match="conv feature maps"):
        loss_fn(torch.randn(4, 8), torch.tensor([0, 0, 1, 1]))


def test_standalone_training_separates_identities():
    """A few steps of the documented standalone loop reduce the loss."""
    torch.manual_seed(3)
    net = TinyBackbone()
    capture = FeatureCapture(net, "layer4")
    loss_fn = OTFaceLoss(num_classes=4, embedding_size=32, s=16.0, lambda_ot=0.5)
    opt = torch.optim.SGD(list(net.parameters()) + list(loss_fn.parameters()), lr=0.05, momentum=0.9)
    images, labels = pk_batch(seed=4)
    losses = []
    for _ in range(30):
        loss = loss_fn(net(images), labels, features=capture.pop())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_margin_triple_is_one_rule_for_loss_and_config():
    from otface_plugin.arcface_torch.config import ConfigError, check_job
    from otface_plugin.losses.margin import margin_triple

    assert margin_triple("cosface") == (1.0, 0.0, 0.4)
    assert margin_triple([1, 0.5, 0]) == (1.0, 0.5, 0.0)
    assert margin_triple(np.array([1.0, 0.3, 0.2])) == (1.0, 0.3, 0.2)
    for bad in ("sphereface", [1.0, 0.5], [1.0, True, 0.0], 0.5):
        with pytest.raises(ValueError, match="margin"):
            margin_triple(bad)
        with pytest.raises(ValueError, match="margin"):
            OTFaceLoss(num_classes=4, embedding_size=8, margin=bad)
    with pytest.raises(ConfigError, match=r"^job.yaml: key 'margin_list' must be three numbers"):
        check_job({"margin_list": [1.0, 0.5]}, where="job.yaml")


def test_components_log_line_round_trip():
    from otface_plugin.losses.components import COMPONENTS, PARTS, format_components, parse_components

    loss_fn = OTFaceLoss(num_classes=4, embedding_size=8, feature="embedding", term_options=dict(triplet_mode="all"))
    torch.manual_seed(0)
    emb = torch.randn(8, 8, requires_grad=True)
    loss_fn(emb, torch.arange(4).repeat(2)).backward()
    c = loss_fn.components()
    assert tuple(c) == COMPONENTS and PARTS == COMPONENTS[1:]
    assert c["grad_share"] > 0 and math.isfinite(c["grad_cos"])
    line = format_components(120, c)
    # the line train_v2.py has always written, with the gradient share at the end (tests/integration/test_recipe_train.py
    # reads it too)
    assert line == ("OTFace   Global Step: 120   Loss %.4f   Margin %.4f   OT %.4f   Lambda %.4f   HardTriplets %d   "
                    "W(a,p) %.4f   W(a,n) %.4f   GradShare %.4f   GradCos %.4f"
                    % (c["loss"], c["margin"], c["ot"], c["lambda"], int(c["triplets"]), c["w_ap"], c["w_an"],
                       c["grad_share"], c["grad_cos"]))
    nan_line = format_components(7, {**c, "ot": float("nan"), "w_an": float("-inf")})
    rows = parse_components(f"2026-01-01 INFO: {line}\nTraining: other\n{nan_line.replace('   ', ' ')}\n")
    assert set(rows) == {120, 7} and set(rows[120]) == set(COMPONENTS)
    for k in COMPONENTS:
        assert rows[120][k] == pytest.approx(c[k], abs=5e-5)
    assert math.isnan(rows[7]["ot"]) and rows[7]["w_an"] == -math.inf


def test_head_is_stored_under_the_checkpoint_name_margin_loss():
    # the deprecated margin_loss= keyword is gone (0.1, no users); the submodule keeps its name,
    # so state dict keys (margin_loss.*) and checkpoints stay as they were
    head = torch.nn.Linear(8, 1)
    loss = OTFaceLoss(head=head, feature="embedding")
    assert loss.head is head and loss.margin_loss is head and "margin_loss.weight" in loss.state_dict()
    assert build_loss_otface(head=head).head is head
    with pytest.raises(TypeError, match="margin_loss"):
        OTFaceLoss(head=head, margin_loss=head, feature="embedding")


def build_loss_otface(**options):
    from otface_plugin import build_loss

    return build_loss("otface", feature="embedding", **options)


def _triplet_batch(seed=0):
    torch.manual_seed(seed)
    labels = torch.arange(6).repeat_interleave(4)
    return torch.randn(24, 16), labels, torch.randn(24, 8, 4, 4)


@pytest.mark.parametrize("feature", ["conv", "embedding"])
@pytest.mark.parametrize("ot_compile", ["none", "compile"])
def test_indices_tuple_replaces_mining(feature, ot_compile):
    from otface_plugin.mining import mine_triplets

    emb, labels, maps = _triplet_batch()
    term = OTFaceTerm(feature=feature, triplet_mode="all", ot_compile=ot_compile)
    if ot_compile != "none":
        term.loop = "eager"  # the fixed-shape path without torch.compile: same values, no compile time on CPU
    mined = mine_triplets(emb, labels, "all")
    features = maps if feature == "conv" else None
    own = term(emb, labels, features)
    given = term(emb, labels, features, indices_tuple=mined)
    assert torch.allclose(given, own, atol=1e-6) and term.components()["triplets"] == mined[0].numel()
    a, p, n = mined
    other = term(emb, labels, features, indices_tuple=(a[:5], p[:5], n[:5]))
    assert term.components()["triplets"] == 5 and not torch.allclose(other, own)
    assert float(term(emb, labels, features, indices_tuple=(a[:0], p[:0], n[:0]))) == 0.0


def test_indices_tuple_through_the_loss_equals_mining():
    from otface_plugin.mining import mine_triplets

    emb, labels, maps = _triplet_batch(1)
    torch.manual_seed(0)
    loss_fn = OTFaceLoss(num_classes=6, embedding_size=16)
    mined = mine_triplets(emb, labels, "hard", 0.1)
    assert mined[0].numel() > 0
    own = loss_fn(emb, labels, features=maps)
    assert torch.equal(loss_fn(emb, labels, features=maps, indices_tuple=mined), own)


@pytest.mark.parametrize("bad, message", [
    ("aaa", "three index tensors"),
    ((torch.tensor([0]), torch.tensor([1])), "three index tensors"),
    ((torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2])), "one length"),
    ((torch.tensor([[0]]), torch.tensor([[1]]), torch.tensor([[2]])), "1-D"),
    ((torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([2.0])), "integer"),
    ((torch.tensor([0]), torch.tensor([1]), torch.tensor([24])), "index 24, outside the batch of 24"),
    ((torch.tensor([-1]), torch.tensor([1]), torch.tensor([2])), "index -1"),
])
def test_indices_tuple_bad_input_is_a_clear_error(bad, message):
    emb, labels, maps = _triplet_batch()
    with pytest.raises(ValueError, match=message):
        OTFaceLoss(num_classes=6, embedding_size=16)(emb, labels, features=maps, indices_tuple=bad)


def test_combined_margin_defaults_are_margin_logits_defaults():
    import inspect

    from otface_plugin.losses.margin import CombinedMargin

    def options(fn, skip):
        return [(n, p.default) for n, p in inspect.signature(fn).parameters.items() if n not in skip]

    assert options(margin_logits, ("cosine", "labels")) == options(
        CombinedMargin.__init__, ("self",))


def test_otface_loss_takes_the_tuned_options_and_passes_the_knobs_through():
    import inspect

    from otface_plugin import build_loss
    from otface_plugin.arcface_torch.config import otface_loss_options
    from otface_plugin.losses.otface import PROBE_OPTIONS, TERM_OPTIONS, otface_options

    loss = inspect.signature(OTFaceLoss.__init__).parameters
    own = [n for n in loss if n not in ("self", "head", "term_options", "probe_options")]
    assert own == ["num_classes", "embedding_size", "margin", "s", "lambda_ot", "warmup_steps", "grad_share", "eps",
                   "iters", "triplet_margin", "ot_margin", "feature"]
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in loss.values())
    assert "__signature__" not in vars(OTFaceLoss.__init__)
    term = inspect.signature(OTFaceTerm.__init__).parameters
    for name in set(own) & set(term):  # the options the loss hands to its term: one default
        assert loss[name].default == term[name].default, name
    assert TERM_OPTIONS == ("triplet_mode", "ot_form", "grad", "eps_start", "max_triplets", "ot_compile")
    assert PROBE_OPTIONS == ("measure_grad_share", "lambda_range", "lambda_rate")
    # the YAML otface: block keeps every key it accepted before the options moved
    assert set(otface_loss_options()) == {
        "margin", "s", "lambda_ot", "warmup_steps", "grad_share", "lambda_range", "lambda_rate", "measure_grad_share",
        "eps", "iters", "feature", "triplet_mode", "triplet_margin", "ot_margin", "ot_form", "grad", "eps_start",
        "max_triplets", "ot_compile"}
    assert set(otface_loss_options()) < set(otface_options())
    built = build_loss("otface", num_classes=4, embedding_size=8, eps=0.2, iters=7, feature="embedding",
                       ot_margin=0.3, max_triplets=5, lambda_rate=0.5)
    t = built.ot_term
    assert (t.eps, t.iters, t.feature, t.ot_margin, t.max_triplets) == (0.2, 7, "embedding", 0.3, 5)
    direct = OTFaceLoss(num_classes=4, embedding_size=8, eps=0.2, feature="embedding",
                        term_options={"max_triplets": 5}, probe_options={"lambda_rate": 0.5})
    assert direct.ot_term.max_triplets == 5 and direct.ot_term.eps == 0.2
    with pytest.raises(TypeError, match="unknown option.*term_options: eps; accepted options: triplet_mode"):
        OTFaceLoss(num_classes=4, term_options={"eps": 0.1})  # a tuned option goes to the loss itself
    with pytest.raises(TypeError, match="unknown option.*'otface': lamda"):
        build_loss("otface", num_classes=4, lamda=0.1)


def test_components_is_the_one_report_of_the_last_step():
    from otface_plugin.losses.components import COMPONENTS

    loss_fn = OTFaceLoss(num_classes=4, embedding_size=16, feature="embedding", lambda_ot=1.0)
    emb = torch.randn(8, 16, requires_grad=True)
    loss_fn(emb, torch.arange(4).repeat_interleave(2)).backward()
    c = loss_fn.components()
    assert tuple(c) == COMPONENTS and all(isinstance(v, float) for v in c.values())
    assert c["triplets"] == loss_fn.ot_term.components()["triplets"]
    for old in ("last", "last_cosine"):
        assert not hasattr(loss_fn, old) and not hasattr(loss_fn.ot_term, old) and not hasattr(loss_fn.head, old)
