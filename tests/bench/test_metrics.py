"""Verification metrics of otface-bench against hand-computed cases."""
import numpy as np
import pytest

from otface_plugin.bench import metrics as M


def test_best_threshold_separable_and_with_one_error():
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    same = np.array([0, 0, 0, 1, 1, 1], bool)
    t, acc = M.best_threshold(scores, same)
    assert acc == 1.0 and 0.3 < t < 0.7
    # one negative above every positive: best is 5/6 (threshold between 0.3 and 0.7)
    scores2 = np.array([0.1, 0.2, 0.95, 0.7, 0.8, 0.9])
    t2, acc2 = M.best_threshold(scores2, same)
    assert acc2 == pytest.approx(5 / 6) and 0.2 < t2 < 0.7


def test_best_threshold_ties_are_not_split():
    # a tie between a positive and a negative cannot be separated: best is 2/3 or all-accept
    scores = np.array([0.5, 0.5, 0.9])
    same = np.array([0, 1, 1], bool)
    t, acc = M.best_threshold(scores, same)
    assert acc == pytest.approx(2 / 3)
    assert ((scores > t) == same).mean() == pytest.approx(acc)


def test_kfold_accuracy_on_separable_set_is_one():
    rng = np.random.default_rng(0)
    same = np.tile(np.r_[np.ones(10, bool), np.zeros(10, bool)], 10)  # 10 balanced folds of 20
    scores = np.where(same, rng.uniform(0.6, 1.0, 200), rng.uniform(-1.0, 0.4, 200))
    out = M.kfold_accuracy(scores, same, 10)
    assert out["accuracy"] == 1.0 and out["std"] == 0.0 and out["correct"].all()
    assert all(0.4 <= t <= 0.6 for t in out["thresholds"])


def test_kfold_uses_consecutive_folds_and_train_folds_threshold():
    # fold 0 (pairs 0..1) is "inverted" relative to folds 1..9: the threshold learnt on the
    # other folds must misclassify both of its pairs, so held-out accuracy is 18/20 overall.
    same = np.tile([True, False], 10)
    scores = np.where(same, 0.9, 0.1)
    scores[0], scores[1] = 0.05, 0.95
    out = M.kfold_accuracy(scores, same, 10)
    assert out["fold_accuracy"][0] == 0.0 and all(a == 1.0 for a in out["fold_accuracy"][1:])
    assert out["accuracy"] == pytest.approx(0.9)
    assert out["correct"].sum() == 18


def test_tar_at_far_constructed():
    # 1000 negatives 0.000..0.999; positives 0.9955..: FAR=1e-2 allows 10 negatives above t,
    # so t = 0.989 (the 11th highest negative) and positives above it count.
    neg = np.arange(1000) / 1000
    pos = np.array([0.5, 0.985, 0.9895, 0.995, 1.2])
    scores = np.r_[pos, neg]
    same = np.r_[np.ones(5, bool), np.zeros(1000, bool)]
    tar, t = M.tar_at_far(scores, same, 1e-2)
    assert t == pytest.approx(0.989) and tar == pytest.approx(3 / 5)
    assert (neg > t).sum() == 10
    tar3, t3 = M.tar_at_far(scores, same, 1e-3)  # one false accept allowed: t = 0.998
    assert t3 == pytest.approx(0.998) and tar3 == pytest.approx(1 / 5)


def test_tar_at_far_with_too_few_negatives_is_zero_false_accepts():
    scores = np.array([0.9, 0.8, 0.7, 0.85])
    same = np.array([1, 1, 0, 0], bool)
    tar, t = M.tar_at_far(scores, same, 1e-3)
    assert t == 0.85 and tar == 0.5


def test_roc_curve_endpoints_and_monotone():
    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.1])
    same = np.array([1, 1, 0, 0, 1], bool)
    far, tar = M.roc_curve(scores, same)
    assert far[0] == 0 and tar[0] == 0 and far[-1] == 1 and tar[-1] == 1
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0)
    # the tie at 0.8 is one threshold: (FAR 1/2, TAR 2/3) directly after (0, 1/3)
    assert list(zip(far, tar))[1:3] == [(0.0, pytest.approx(1 / 3)), (0.5, pytest.approx(2 / 3))]


def test_hard_pairs_selects_extremes():
    ref = np.array([0.9, 0.2, 0.5, 0.8, 0.1, 0.7, 0.3, 0.6, 0.4, 0.05,
                    0.0, 0.95, 0.2, 0.1, 0.3, 0.5, 0.4, 0.45, 0.35, 0.25])
    same = np.r_[np.ones(10, bool), np.zeros(10, bool)]
    mask = M.hard_pairs(ref, same, 0.2)
    assert sorted(np.flatnonzero(mask)) == [4, 9, 11, 15]  # lowest positives 0.05, 0.1; highest negatives 0.95, 0.5


def test_evaluate_and_mean_std():
    same = np.tile([True, False], 50)
    scores = np.where(same, 0.8, 0.2)
    ev = M.evaluate(scores, same, 10)
    assert ev["accuracy"] == 1.0 and ev["tar@far=0.01"] == 1.0 and ev["tar@far=0.001"] == 1.0
    s = M.mean_std([0.5, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert M.mean_std([0.3])["std"] == 0.0
