"""Bad input to the losses is one ValueError line naming the argument, option or checkpoint key
and the bad value or shape, never an IndexError from deep inside or a silently wrong loss."""
from __future__ import annotations

import pytest
import torch

from otface_plugin import build_loss
from otface_plugin.losses import HEADS, OTFaceLoss, OTFaceTerm

C, D, B = 6, 16, 12


def _batch():
    torch.manual_seed(0)
    return torch.randn(B, D), torch.arange(C).repeat_interleave(2)


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("bad, message", [
    (C, rf"labels hold class {C}, outside 0 \.\. {C - 1} \(num_classes={C}\); -1 marks no label"),
    (-2, rf"labels hold class -2, outside 0 \.\. {C - 1} \(num_classes={C}\); -1 marks no label"),
])
def test_labels_outside_the_classes_are_named(name, bad, message):
    emb, labels = _batch()
    labels[3] = bad
    for loss in (build_loss(name, num_classes=C, embedding_size=D),
                 OTFaceLoss(num_classes=C, embedding_size=D, margin=name, feature="embedding")):
        with pytest.raises(ValueError, match=message) as err:
            loss(emb, labels)
        _one_line(err)


@pytest.mark.parametrize("make", [
    lambda: build_loss("arcface", num_classes=C, embedding_size=D),
    lambda: build_loss("adaface", num_classes=C, embedding_size=D),
    lambda: OTFaceLoss(num_classes=C, embedding_size=D, feature="embedding"),
    lambda: OTFaceTerm(feature="embedding"),
], ids=["arcface", "adaface", "otface", "term"])
@pytest.mark.parametrize("args, message", [
    (lambda e, l: (e[:, :-1], l), r"embeddings must be \(B, 16\)|embeddings must be \(B, D\)"),
    (lambda e, l: (e.view(B, 4, 4), l), r"embeddings must be \(B, (16|D)\).*got shape \(12, 4, 4\)"),
    (lambda e, l: (e[0], l), r"embeddings must be \(B, (16|D)\).*got shape \(16,\)"),
    (lambda e, l: (e, l.tolist()), r"labels must be a tensor of class indices, got a list"),
    (lambda e, l: (e, l[:-1]), r"labels must hold one class per embedding \(12\), got 11"),
    (lambda e, l: (e, l.view(3, 4)), r"labels must be \(B,\) or \(B, 1\), got shape \(3, 4\)"),
    (lambda e, l: (e, l.float() + 0.5), r"labels must be integer class indices, got dtype torch.float32"),
], ids=["size", "rank3", "rank1", "list", "length", "shape", "float"])
def test_bad_embeddings_and_labels_are_one_line(make, args, message):
    emb, labels = _batch()
    if message.startswith(r"embeddings must be \(B, 16\)|") and isinstance(make(), OTFaceTerm):
        pytest.skip("the OT term reads any embedding size")
    with pytest.raises(ValueError, match=message) as err:
        make()(*args(emb, labels))
    _one_line(err)


@pytest.mark.parametrize("value", [True, False, 0, -1, 2.0, "4"])
def test_max_triplets_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match=rf"max_triplets must be a positive integer or None, got {value!r}"):
        OTFaceTerm(max_triplets=value)


def _trained(lambda_ot):
    loss = OTFaceLoss(num_classes=C, embedding_size=D, feature="embedding", lambda_ot=lambda_ot)
    emb, labels = _batch()
    loss(emb.requires_grad_(), labels).backward()
    return loss


@pytest.mark.parametrize("key, value, message", [
    ("step", torch.tensor(-3), r"checkpoint key 'step' holds -3: the step count must be an integer >= 0"),
    ("lambda_auto", torch.tensor(float("nan")), r"checkpoint key 'lambda_auto' holds nan: .*finite number > 0"),
    ("lambda_auto", torch.tensor(-0.5), r"checkpoint key 'lambda_auto' holds -0.5: .*finite number > 0"),
    ("grad_stats", torch.tensor([float("nan"), 1.0, 0.0, 1.0]), r"checkpoint key 'grad_stats' holds NaN/inf"),
])
def test_corrupt_loss_buffers_are_refused_on_load(key, value, message):
    loss = _trained("auto")
    state = loss.state_dict()
    state[key] = value
    fresh = OTFaceLoss(num_classes=C, embedding_size=D, feature="embedding", lambda_ot="auto")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=message) as err:
        fresh.load_state_dict(state)
    _one_line(err)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing half loaded


def test_corrupt_key_is_named_with_its_prefix():
    outer = torch.nn.ModuleDict({"loss": _trained(0.1)})
    state = outer.state_dict()
    state["loss.step"] = torch.tensor(-1)
    with pytest.raises(ValueError, match=r"checkpoint key 'loss.step' holds -1"):
        outer.load_state_dict(state)


def test_corrupt_head_buffer_is_refused_on_load():
    loss = build_loss("adaface", num_classes=C, embedding_size=D)
    state = loss.state_dict()
    state["margin.batch_std"] = torch.tensor([float("nan")])
    with pytest.raises(ValueError, match=r"checkpoint key 'margin.batch_std' holds NaN/inf") as err:
        build_loss("adaface", num_classes=C, embedding_size=D).load_state_dict(state)
    _one_line(err)


@pytest.mark.parametrize("saved, loading, message", [
    (0.1, "auto", r"checkpoint has no key 'lambda_auto': it was trained with a fixed lambda_ot, this loss has "
                  r"lambda_ot='auto'; set lambda_ot to that run's number to resume it"),
    ("auto", 0.1, r"checkpoint key 'lambda_auto' holds an adaptive lambda \(lambda_ot='auto'\), this loss has "
                  r"lambda_ot=0.1; set lambda_ot: auto to resume that run"),
])
def test_lambda_mode_mismatch_on_resume_is_one_line(saved, loading, message):
    state = _trained(saved).state_dict()
    fresh = OTFaceLoss(num_classes=C, embedding_size=D, feature="embedding", lambda_ot=loading)
    with pytest.raises(ValueError, match=message) as err:
        fresh.load_state_dict(state)
    _one_line(err)
    with pytest.raises(ValueError, match=message):  # torch hands every module strict=True: one rule
        fresh.load_state_dict(state, strict=False)
