"""HardPKSampler: PKSampler's guarantees, plus groups of neighbouring identities after
update_centres; and the tiled top-k neighbour search behind it."""
import numpy as np
import pytest
import torch

from otface_plugin.data import HardPKSampler, IdentityIndex, PKSampler
from otface_plugin.data.neighbours import topk_cosine

GROUPS, GROUP, IMAGES, K, P = 50, 4, 8, 4, 8  # 200 identities x 8 images, batch 32 = 8 x 4


def grouped():
    """200 identities in 50 tight groups of 4 (identity i is in group i // 4); centres in 64-d."""
    n = GROUPS * GROUP
    starts = 1 + IMAGES * np.arange(n)
    index = IdentityIndex.from_ranges(starts, starts + IMAGES)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(GROUPS, 64, generator=g).repeat_interleave(GROUP, 0)
    return index, centres + 0.05 * torch.randn(n, 64, generator=g)


def samplers(index, world, cls=HardPKSampler, seed=0, epoch=0, centres=None, **kw):
    out = []
    for r in range(world):
        s = cls(index, batch_size=P * K, num_instances=K, num_replicas=world, rank=r, seed=seed, **kw)
        s.set_epoch(epoch)
        if centres is not None:
            s.update_centres(centres)
        out.append(s)
    return out


def batches(s):
    """(steps, P) identity ordinals of this rank's batches, read from the yielded positions."""
    labels = s.index.labels()[np.array(list(s))].reshape(s.steps_per_epoch, P, K)
    assert (labels == labels[:, :, :1]).all()  # K images of one identity, consecutively
    return labels[:, :, 0]  # labels equal ordinals here


def mate_share(plan):
    """Share of batch identities with a group-mate in the same batch."""
    groups = plan // GROUP
    same = (groups[..., :, None] == groups[..., None, :]).sum(-1) - 1
    return float((same > 0).mean())


@pytest.mark.parametrize("case", [(40, 4, 4, 1), (60, 3, 2, 4), (100, 8, 4, 2), (33, 5, 3, 3), (12, 4, 4, 3)])
def test_before_any_update_it_is_pksampler(case):
    n_id, p, k, world = case
    rng = np.random.default_rng(n_id)
    counts = rng.integers(1, 13, size=n_id)
    labels = np.repeat(np.arange(n_id) * 3, counts)
    index = IdentityIndex.from_labels(rng.permutation(labels))
    for r in range(world):
        for epoch in (0, 2):
            a = PKSampler(index, p * k, k, world, r, seed=7)
            b = HardPKSampler(index, p * k, k, world, r, seed=7)
            a.set_epoch(epoch), b.set_epoch(epoch)
            assert list(a) == list(b)
            assert np.array_equal(a.epoch_indices(), b.epoch_indices())


@pytest.mark.parametrize("world", [1, 2])
def test_batches_hold_group_mates_after_update(world):
    index, centres = grouped()
    hard = samplers(index, world, centres=centres)
    pk = samplers(index, world, cls=PKSampler)
    plan_hard = np.stack([batches(s) for s in hard], 1)  # (steps, world, P)
    plan_pk = np.stack([batches(s) for s in pk], 1)
    share_hard, share_pk = mate_share(plan_hard), mate_share(plan_pk)
    print(f"world {world}: share of batch identities with a group-mate: hard {share_hard:.2f}, pk {share_pk:.2f}")
    assert share_pk < 0.2
    assert share_hard > 0.5 and share_hard > 4 * share_pk
    # the first round(0.5 * P) = 4 identities of every batch are a seed and its 3 group-mates
    first = plan_hard[:, :, :4] // GROUP
    assert (first == first[..., :1]).all()
    for step in plan_hard:  # no identity on two ranks in one step, P distinct per batch
        assert len(set(step.reshape(-1).tolist())) == world * P
    assert set(plan_hard.reshape(-1).tolist()) == set(range(GROUPS * GROUP))  # all visited
    assert hard[0].steps_per_epoch == pk[0].steps_per_epoch == GROUPS * GROUP * IMAGES // (P * K * world)


def test_same_plan_for_same_seed_epoch_and_centres():
    index, centres = grouped()
    a = samplers(index, 2, centres=centres, seed=3, epoch=1)[1]
    b = samplers(index, 2, centres=centres.clone(), seed=3, epoch=1)[1]
    assert list(a) == list(b) == list(a)  # repeatable, also by the same sampler
    assert np.array_equal(a.identity_plan(), b.identity_plan())
    c = samplers(index, 2, centres=centres, seed=3, epoch=2)[1]
    d = samplers(index, 2, centres=torch.randn_like(centres), seed=3, epoch=1)[1]
    assert list(a) != list(c) and list(a) != list(d)


def test_repeated_visits_walk_through_the_images():
    index, centres = grouped()
    s = samplers(index, 1, centres=centres)[0]
    pos = np.array(list(s)).reshape(-1, K)
    labels = index.labels()[pos[:, 0]]
    for c in range(GROUPS * GROUP):  # first visits of an identity never repeat an image
        mine = pos[labels == c].reshape(-1)
        first = mine[:IMAGES]
        assert len(set(first.tolist())) == len(first)


def test_update_mid_epoch_applies_from_the_given_step():
    index, centres = grouped()
    world, switch = 2, 6
    pk_plan = samplers(index, world, cls=PKSampler)[0].identity_plan()
    live = samplers(index, world)
    its = [iter(s) for s in live]
    seen = [[next(it) for _ in range(switch * P * K)] for it in its]  # the DataLoader's lead
    with pytest.raises(ValueError, match="already planned"):
        live[0].update_centres(centres, from_step=switch - 1)
    for s in live:
        s.update_centres(centres, from_step=switch)
    for r, it in enumerate(its):
        seen[r] += list(it)
    plan = np.stack([index.labels()[np.array(x)].reshape(-1, P, K)[:, :, 0] for x in seen], 1)
    assert np.array_equal(plan[:switch], pk_plan[:switch])  # planned before: unchanged
    assert mate_share(plan[switch:]) > 0.5 and mate_share(plan[:switch]) < 0.25
    for step in plan:
        assert len(set(step.reshape(-1).tolist())) == world * P
    # and the next epoch's iterator uses the centres from its first step
    nxt = samplers(index, world, epoch=1)[0]
    nxt.update_centres(centres)
    assert mate_share(nxt.identity_plan()) > 0.5


class _Positions(torch.utils.data.Dataset):
    def __len__(self):
        return GROUPS * GROUP * IMAGES

    def __getitem__(self, i):
        return i


def test_update_through_a_dataloader_with_workers():
    """The sampler runs in the main process, ahead of training by the loader's prefetch: an
    update with a lead beyond that depth changes the remaining steps, workers keep running."""
    index, centres = grouped()
    s = samplers(index, 1)[0]
    loader = torch.utils.data.DataLoader(_Positions(), batch_size=P * K, sampler=s, num_workers=1,
                                         drop_last=True, persistent_workers=True)
    got, switch = [], None
    for step, batch in enumerate(loader):
        got.append(batch.numpy())
        if step == 3:
            switch = step + 1 + 8  # 2 x prefetch_factor x num_workers + slack
            s.update_centres(centres, from_step=switch)
    plan = index.labels()[np.concatenate(got)].reshape(-1, P, K)[:, :, 0]
    assert len(plan) == s.steps_per_epoch
    assert mate_share(plan[switch:]) > 0.5 and mate_share(plan[:switch]) < 0.25


def test_bad_input_is_named():
    index, centres = grouped()
    with pytest.raises(ValueError, match="hard_fraction"):
        HardPKSampler(index, 32, 4, hard_fraction=1.5)
    with pytest.raises(ValueError, match="neighbours"):
        HardPKSampler(index, 32, 4, neighbours=0)
    s = HardPKSampler(index, 32, 4)
    with pytest.raises(ValueError, match="num_classes, D"):
        s.update_centres(centres[:100])


def test_topk_cosine_matches_brute_force_in_small_tiles():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(53, 16, generator=g)
    x[7] = 0  # a never-trained centre: no NaN
    sim = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
    sim.fill_diagonal_(-float("inf"))
    want_sim, want_idx = sim.topk(5, dim=1)
    idx, got_sim = topk_cosine(x, 5, chunk_rows=7, chunk_cols=5)
    assert torch.allclose(got_sim, want_sim, atol=1e-6)
    assert (idx == want_idx).float().mean() > 0.95  # ties (row 7: all zero) may order differently
    assert not (idx == torch.arange(53)[:, None]).any()  # never itself
    part, _ = topk_cosine(x, 5, rows=(10, 30), chunk_rows=4, chunk_cols=9)
    assert torch.equal(part, idx[10:30])
    with pytest.raises(ValueError, match="k must be"):
        topk_cosine(x, 53)


def _sharded_worker(rank, world, port, centres, out):
    import torch.distributed as dist

    from otface_plugin.data.neighbours import topk_cosine_sharded

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out[rank] = topk_cosine_sharded(centres, 4).numpy()
    finally:
        dist.destroy_process_group()


def test_sharded_search_gives_every_rank_the_whole_table():
    # the recipe's refresh: each rank searches a slice of the identities (12 and 11 here), the
    # slices are all-gathered
    world = 2
    import torch.multiprocessing as mp

    from conftest import free_port

    centres = torch.randn(23, 6, generator=torch.Generator().manual_seed(3))
    want = topk_cosine(centres, 4)[0].numpy()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_sharded_worker, args=(world, free_port(), centres, out), nprocs=world, join=True)
        got = dict(out)
    for rank in range(world):
        np.testing.assert_array_equal(got[rank], want)


def test_recipe_hook_and_study_loop_refresh_on_the_sampler_schedule(monkeypatch):
    """The refresh schedule is HardPKSampler's: the recipe's hook (every hard.refresh_steps and at
    each epoch end, ``lead`` steps ahead) and the study's loop (lead 0) re-read the centres after
    the same steps, and each refresh applies from the step the sampler says."""
    from easydict import EasyDict as edict

    from otface_plugin.arcface_torch import after_step, build_sampler, prepare_config
    from otface_plugin.bench import data as bench_data

    every, steps, per_epoch = 3, 12, 5
    calls = []
    original = HardPKSampler.refresh

    def spy(self, weight, global_step, lead=0, sharded=False):
        calls.append((global_step, self.refresh_start(global_step, lead)))
        return original(self, weight, global_step, lead, sharded)

    monkeypatch.setattr(HardPKSampler, "refresh", spy)
    # 40 identities x 4 images: 5 steps of 8 x 4 per epoch, in the study's loop and the recipe
    n = 40
    starts = 1 + 4 * np.arange(n)
    index = IdentityIndex.from_ranges(starts, starts + 4)
    centres = torch.randn(n, 16, generator=torch.Generator().manual_seed(0))
    num_image = index.num_images
    expected = [s for s in range(1, steps) if s % every == 0 or s % per_epoch == 0]
    assert expected == [3, 5, 6, 9, 10]

    # the study's loop
    labels = torch.as_tensor(index.labels())
    train = bench_data.TrainSet(torch.zeros(len(labels), 3, 2, 2, dtype=torch.uint8), labels, index)
    monkeypatch.setattr(bench_data, "HARD_REFRESH_STEPS", every)
    assert len(list(bench_data.train_batches(train, P * K, K, seed=0, steps=steps, sampler="hard",
                                             centres=lambda: centres))) == steps
    assert [g for g, _ in calls] == expected
    assert [s for _, s in calls] == [(g % per_epoch) or None for g in expected]  # the next step, lead 0

    # the recipe's hook over the same steps
    calls.clear()
    cfg = prepare_config(edict(margin_list=(1.0, 0.5, 0.0), batch_size=P * K, dali=False, num_image=num_image,
                               num_classes=n, frequent=1000, num_workers=0, sampler="hard",
                               hard=edict(refresh_steps=every)))

    class Folder(torch.utils.data.Dataset):
        targets = index.labels()

        def __len__(self):
            return len(self.targets)

    from otface_plugin.arcface_torch.hooks import RECIPE

    monkeypatch.setattr(RECIPE, "hard", None)  # the hook's process-wide sampler: gone after this test
    sampler = build_sampler(cfg)(Folder(), num_replicas=1, rank=0, seed=0)
    assert sampler.steps_per_epoch == per_epoch
    head = torch.nn.Linear(16, n)  # stands in for PartialFC_V2: its weight is the class centres
    for step in range(1, steps):
        after_step(head, step, cfg.frequent)
    assert [g for g, _ in calls] == expected
    from otface_plugin.arcface_torch.hooks import refresh_lead
    lead = refresh_lead(0)
    assert [s for _, s in calls] == [sampler.refresh_start(g, lead) for g in expected]
