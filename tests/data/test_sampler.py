"""PKSampler properties over random index shapes, world sizes, seeds and epochs."""
import numpy as np
import pytest
import torch

from otface_plugin.data import IdentityIndex, PKBatchSampler, PKSampler


def random_index(rng, n_id, max_count=12, contiguous=True):
    counts = rng.integers(1, max_count + 1, size=n_id)
    if contiguous:  # header-built shape
        starts = 1 + np.r_[0, np.cumsum(counts)[:-1]]
        return IdentityIndex.from_ranges(starts, starts + counts)
    labels = np.repeat(np.arange(n_id) * 7, counts)  # scan-built shape, shuffled positions
    return IdentityIndex.from_labels(rng.permutation(labels))


CASES = [  # (n_identities, P, K, world_size, contiguous)
    (40, 4, 4, 1, True),
    (60, 3, 2, 4, False),
    (100, 8, 4, 2, True),
    (33, 5, 3, 3, False),
    (200, 16, 4, 8, True),
    (12, 4, 4, 3, True),  # exactly P * world identities
]


def all_ranks(index, P, K, world, seed=0, epoch=0, **kw):
    out = []
    for r in range(world):
        s = PKSampler(index, batch_size=P * K, num_instances=K, num_replicas=world, rank=r,
                      seed=seed, **kw)
        s.set_epoch(epoch)
        out.append(np.array(list(s)))
    return out, s


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_pk_structure_equal_lengths_and_disjoint_ranks(case, seed):
    n_id, P, K, world, contiguous = case
    index = random_index(np.random.default_rng(seed), n_id, contiguous=contiguous)
    labels = index.labels()
    per_rank, s = all_ranks(index, P, K, world, seed=seed)
    steps = index.num_images // (P * K * world)
    assert s.steps_per_epoch == steps
    for idx in per_rank:
        assert len(idx) == len(s) == steps * P * K  # same length on every rank
        assert idx.min() >= 0 and idx.max() < index.num_positions
        assert (labels[idx] >= 0).all()
    for step in range(steps):
        ids_in_step = []
        for idx in per_rank:
            batch = labels[idx[step * P * K:(step + 1) * P * K]].reshape(P, K)
            assert (batch == batch[:, :1]).all()  # K consecutive images of one identity
            assert len(set(batch[:, 0])) == P  # P distinct identities
            ids_in_step.extend(batch[:, 0].tolist())
        assert len(set(ids_in_step)) == P * world  # no identity on two ranks in a step


@pytest.mark.parametrize("case", CASES[:4])
def test_deterministic_per_seed_and_epoch(case):
    n_id, P, K, world, contiguous = case
    index = random_index(np.random.default_rng(3), n_id, contiguous=contiguous)
    a, _ = all_ranks(index, P, K, world, seed=5, epoch=2)
    b, _ = all_ranks(index, P, K, world, seed=5, epoch=2)
    c, _ = all_ranks(index, P, K, world, seed=5, epoch=3)
    d, _ = all_ranks(index, P, K, world, seed=6, epoch=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert not all(np.array_equal(x, y) for x, y in zip(a, d))


@pytest.mark.parametrize("case", CASES)
def test_coverage_over_an_epoch(case):
    n_id, P, K, world, contiguous = case
    index = random_index(np.random.default_rng(7), n_id, contiguous=contiguous)
    labels = index.labels()
    per_rank, s = all_ranks(index, P, K, world)
    allidx = np.concatenate(per_rank)
    plan = s.identity_plan()
    visits = np.bincount(plan.reshape(-1), minlength=n_id)
    if s.steps_per_epoch * P * world >= n_id:
        assert (visits >= 1).all()  # every identity at least once
    assert visits.max() - visits.min() <= 1  # one visit per identity per permutation round
    for c in range(n_id):
        got = allidx[np.isin(labels[allidx], index.identity_labels[c])]
        distinct = len(np.unique(got))
        # successive visits walk the identity's images without repeats until exhausted
        assert distinct == min(index.counts[c], visits[c] * K), c


def test_small_identities_replace_or_drop():
    counts = np.array([1, 2, 6, 6, 6, 6, 6, 6])
    starts = 1 + np.r_[0, np.cumsum(counts)[:-1]]
    index = IdentityIndex.from_ranges(starts, starts + counts)
    labels = index.labels()
    s = PKSampler(index, batch_size=8, num_instances=4, seed=0)
    idx = np.array(list(s))
    small = idx[labels[idx] == 0]
    if len(small):
        assert len(small) % 4 == 0 and set(small) == {0}  # its one image, repeated K times
    s = PKSampler(index, batch_size=8, num_instances=4, seed=0, small_identities="drop")
    for e in range(5):
        s.set_epoch(e)
        assert not np.isin(labels[np.array(list(s))], [0, 1]).any()


def test_too_few_identities_is_a_clear_error():
    index = random_index(np.random.default_rng(0), 10)
    with pytest.raises(ValueError, match=r"P x world_size = 4 x 3 = 12 .* only 10"):
        PKSampler(index, batch_size=16, num_instances=4, num_replicas=3, rank=0)
    with pytest.raises(ValueError, match="multiple of num_instances"):
        PKSampler(index, batch_size=10, num_instances=4)
    with pytest.raises(ValueError, match="rank 3"):
        PKSampler(index, batch_size=8, num_replicas=3, rank=3)


def test_num_image_override_sets_steps():
    index = random_index(np.random.default_rng(0), 50)
    s = PKSampler(index, batch_size=16, num_replicas=2, rank=1, num_image=1000)
    assert s.steps_per_epoch == 1000 // 32 and len(s) == 31 * 16
    with pytest.raises(ValueError, match="zero steps"):
        PKSampler(index, batch_size=16, num_replicas=2, rank=0, num_image=20)


def test_works_with_recipe_dataloader_unchanged():
    index = random_index(np.random.default_rng(0), 30)
    labels = index.labels()

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return index.num_positions

        def __getitem__(self, i):
            return torch.zeros(1), int(labels[i])

    s = PKSampler(index, batch_size=12, num_instances=4, num_replicas=2, rank=0, seed=1)
    loader = torch.utils.data.DataLoader(DS(), batch_size=12, sampler=s, drop_last=True)
    s.set_epoch(1)
    batches = [y for _, y in loader]
    assert len(batches) == s.steps_per_epoch
    for y in batches:
        assert (y.view(3, 4) == y.view(3, 4)[:, :1]).all()
    bs = PKBatchSampler(index, batch_size=12, num_instances=4, num_replicas=2, rank=0, seed=1)
    bs.set_epoch(1)
    assert len(bs) == len(batches)
    assert [list(b) for b in bs] == np.array(list(s)).reshape(-1, 12).tolist()


def test_large_index_is_fast():
    import time

    index = IdentityIndex.from_ranges(1 + 21 * np.arange(20000), 1 + 21 * np.arange(1, 20001))
    s = PKSampler(index, batch_size=128, num_instances=4, num_replicas=8, rank=3)
    t = time.perf_counter()
    idx = s.epoch_indices()
    assert time.perf_counter() - t < 5
    assert len(idx) == len(s) == (420000 // 1024) * 128
