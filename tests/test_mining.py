"""Hard-triplet mining on hand-built batches."""
import math

import pytest
import torch

from otface_plugin.mining import NonFiniteError, mine_triplets


def unit(angles_deg):
    t = torch.tensor(angles_deg, dtype=torch.float32) * math.pi / 180
    return torch.stack([torch.cos(t), torch.sin(t)], dim=1)


def test_hardest_positive_and_negative():
    # identity 0 at 0, 10, 50 degrees; identity 1 at 80, 170 degrees.
    emb = unit([0, 10, 50, 80, 170]) * torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.0]])  # norms must not matter
    labels = torch.tensor([0, 0, 0, 1, 1])
    a, p, n = mine_triplets(emb, labels, mode="all")
    got = {int(i): (int(j), int(k)) for i, j, k in zip(a, p, n)}
    assert got == {0: (2, 3), 1: (2, 3), 2: (0, 3), 3: (4, 2), 4: (3, 2)}


def test_hard_mode_keeps_only_margin_violations():
    # Only the anchor at 70 degrees is hard: its positive is 60 degrees away, a negative 10.
    emb = unit([0, 20, 70, 130, 60])
    labels = torch.tensor([0, 0, 1, 1, 2])
    a, p, n = mine_triplets(emb, labels, mode="hard", margin=0.1)
    assert (a.tolist(), p.tolist(), n.tolist()) == ([2], [3], [4])
    assert mine_triplets(emb, labels, mode="all")[0].tolist() == [0, 1, 2, 3]


def test_margin_widens_selection():
    torch.manual_seed(0)
    emb = torch.randn(32, 16)
    labels = torch.arange(8).repeat_interleave(4)
    counts = [mine_triplets(emb, labels, margin=m)[0].numel() for m in (-2.1, 0.0, 0.2, 2.1)]
    assert counts == sorted(counts)
    assert counts[0] == 0 and counts[-1] == 32


def test_no_positive_pairs_gives_empty():
    emb = torch.randn(6, 8)
    a, p, n = mine_triplets(emb, torch.arange(6), mode="all")
    assert a.numel() == p.numel() == n.numel() == 0 and a.dtype == torch.int64


def test_single_identity_has_no_negatives():
    a, _, _ = mine_triplets(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), mode="all")
    assert a.numel() == 0


def test_misclassified_mode_from_logits_and_mask():
    emb = unit([0, 10, 90, 100])
    labels = torch.tensor([0, 0, 1, 1])
    logits = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.7, 0.3]])  # samples 1 and 3 wrong
    a, _, _ = mine_triplets(emb, labels, mode="misclassified", logits=logits)
    assert a.tolist() == [1, 3]
    a, _, _ = mine_triplets(emb, labels, mode="misclassified", misclassified=torch.tensor([1, 0, 0, 0]))
    assert a.tolist() == [0]
    with pytest.raises(ValueError, match="logits"):
        mine_triplets(emb, labels, mode="misclassified")


def test_runs_without_grad_and_rejects_bad_input():
    emb = torch.randn(8, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    a, p, n = mine_triplets(emb, labels, mode="all")
    assert not a.requires_grad and a.numel() == 8
    with pytest.raises(ValueError, match="mode"):
        mine_triplets(emb, labels, mode="semi-hard")
    with pytest.raises(ValueError, match="labels"):
        mine_triplets(emb, labels[:5])


def test_ignored_label_is_never_anchor_positive_or_negative():
    # -1 ("no identity here") samples were once each other's positives
    torch.manual_seed(1)
    emb = torch.randn(10, 8)
    labels = torch.tensor([-1, -1, -1, 0, 0, 1, 1, -1, 2, 2])
    for mode in ("all", "hard"):
        a, p, n = mine_triplets(emb, labels, mode=mode, margin=2.1)
        used = torch.cat([a, p, n])
        assert a.numel() > 0 and not (labels[used] == -1).any(), mode
    a, p, n = mine_triplets(emb, labels, mode="all")
    assert sorted(a.tolist()) == [3, 4, 5, 6, 8, 9]
    # a -1 sample that is the closest to an anchor is still not its hardest negative
    emb = unit([0, 30, 1, 100, 130])
    a, p, n = mine_triplets(emb, torch.tensor([0, 0, -1, 1, 1]), mode="all")
    assert dict(zip(a.tolist(), n.tolist()))[0] == 3


def test_ignored_labels_with_misclassified_mode():
    emb = unit([0, 10, 90, 100, 50])
    labels = torch.tensor([0, 0, 1, 1, -1])
    logits = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.7, 0.3], [0.5, 0.5]])
    a, _, n = mine_triplets(emb, labels, mode="misclassified", logits=logits)
    assert a.tolist() == [1, 3] and 4 not in n.tolist()


def test_only_ignored_labels_and_empty_batch_give_no_triplets():
    a, _, _ = mine_triplets(torch.randn(6, 8), torch.full((6,), -1), mode="all")
    assert a.numel() == 0
    a, p, n = mine_triplets(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), mode="all")
    assert a.numel() == p.numel() == n.numel() == 0 and a.dtype == torch.int64


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_embeddings_are_an_error(bad):
    emb = torch.randn(8, 4)
    emb[5, 2] = bad
    with pytest.raises(NonFiniteError, match=r"embeddings hold 1 NaN/inf values of 32 \(batch samples \[5\]\)"):
        mine_triplets(emb, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))


@pytest.mark.parametrize("bad_rows", [[], [3], [0, 5, 9], list(range(2, 14))])
def test_sync_free_finite_summary_gives_require_finites_message(bad_rows):
    from otface_plugin.mining import NonFiniteError, _non_finite_summary, _summary_message, require_finite

    x = torch.randn(16, 3, 2)
    for i, row in enumerate(bad_rows):
        x[row].view(-1)[i % 6] = float("nan") if i % 2 else float("inf")
    got = _summary_message("conv features", x.numel(), _non_finite_summary(x).tolist())
    if not bad_rows:
        assert got == ""
        return
    with pytest.raises(NonFiniteError) as err:
        require_finite("conv features", x)
    assert got == str(err.value)
