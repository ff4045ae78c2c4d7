"""sampler: hard in the recipe's hooks and config checks, in process (no checkout): the refresh
hook gathers the class centres, updates the sampler, and a checkpoint load refreshes it too."""
import logging

import numpy as np
import pytest
import torch
from easydict import EasyDict as edict

from otface_plugin.arcface_torch import build_head, build_sampler, log_components, prepare_config
from otface_plugin.arcface_torch.config import ConfigError, check_job
from otface_plugin.arcface_torch.hooks import RECIPE, refresh_lead
from otface_plugin.data import HardPKSampler

GROUPS, GROUP, IMAGES = 12, 4, 8  # 48 identities in tight groups of 4, 8 images each


class FolderLike(torch.utils.data.Dataset):
    targets = [i // IMAGES for i in range(GROUPS * GROUP * IMAGES)]

    def __len__(self):
        return len(self.targets)


class PartialFCLike(torch.nn.Module):
    """PartialFC_V2's class centres (one shard: world size 1), in tight groups of 4."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(GROUPS, 16, generator=g).repeat_interleave(GROUP, 0)
        self.weight = torch.nn.Parameter(w + 0.05 * torch.randn(GROUPS * GROUP, 16, generator=g))


def cfg_for(loss=None, **extra):
    c = edict(margin_list=(1.0, 0.5, 0.0), batch_size=16, dali=False, num_image=len(FolderLike.targets),
              frequent=1000, num_workers=0, sampler="hard", hard=edict(refresh_steps=2))
    if loss is not None:
        c.loss = loss
    c.update(extra)
    return prepare_config(c)


def mate_share(sampler):
    plan = sampler.identity_plan() // GROUP
    return float(((plan[..., :, None] == plan[..., None, :]).sum(-1) > 1).mean())


@pytest.mark.parametrize("loss", [None, "arcface", "otface"])
def test_refresh_hook_updates_the_sampler(loss, caplog):
    cfg = cfg_for(loss, otface=edict(feature="embedding")) if loss == "otface" else cfg_for(loss)
    assert cfg.sampler == "hard" and cfg.hard == {"neighbours": 3, "hard_fraction": 0.5, "refresh_steps": 2}
    sampler = build_sampler(cfg)(FolderLike(), num_replicas=1, rank=0, seed=0)
    assert isinstance(sampler, HardPKSampler) and RECIPE.hard.sampler is sampler
    pfc = PartialFCLike()
    head = build_head(cfg, pfc, torch.nn.Identity())
    assert (head is pfc) == (loss != "otface")
    before = mate_share(sampler)
    it = iter(sampler)
    next(it)  # the loader has planned step 0
    with caplog.at_level(logging.INFO):
        log_components(head, 1, cfg.frequent)  # not a refresh step
        assert sampler._table is None
        log_components(head, 2, cfg.frequent)
    assert sampler._table is not None
    assert "HardPKSampler refresh at global step 2: 48 identities" in caplog.text
    lead = refresh_lead(0)
    assert f"in effect from step {2 + lead} of this epoch" in caplog.text or sampler.steps_per_epoch <= 2 + lead
    assert mate_share(sampler) > 0.5 > before
    # a group's seed's neighbours are its group-mates
    assert (sampler._table[:, :3] // GROUP == np.arange(GROUPS * GROUP)[:, None] // GROUP).all()


def test_checkpoint_load_refreshes_for_the_next_epoch(caplog):
    cfg = cfg_for("otface", otface=edict(feature="embedding"))
    sampler = build_sampler(cfg)(FolderLike(), num_replicas=1, rank=0, seed=0)
    head = build_head(cfg, PartialFCLike(seed=1), torch.nn.Identity())
    trained = build_head(cfg, PartialFCLike(seed=0), torch.nn.Identity()).state_dict()
    with caplog.at_level(logging.INFO):
        head.load_state_dict(trained)
    assert "refresh at global step resume" in caplog.text and "the next epoch" in caplog.text
    reference = HardPKSampler(sampler.index, 16, 4, num_replicas=1, rank=0, seed=0,
                              num_image=len(FolderLike.targets))
    reference.update_centres(PartialFCLike(seed=0).weight)
    assert np.array_equal(sampler.identity_plan(), reference.identity_plan())


def test_upstream_sampler_leaves_no_hard_state():
    build_sampler(cfg_for("otface", otface=edict(feature="embedding")))(FolderLike(), 1, 0, 0)
    assert RECIPE.hard is not None
    cfg = edict(margin_list=(1.0, 0.5, 0.0), batch_size=16, dali=False, loss="arcface")
    assert build_sampler(prepare_config(cfg)) is None and RECIPE.hard is None


@pytest.mark.parametrize("job, message", [
    ({"sampler": "hard", "hard": {"neighbours": 0}}, "hard.neighbours"),
    ({"sampler": "hard", "hard": {"hard_fraction": 1.5}}, "hard.hard_fraction"),
    ({"sampler": "hard", "hard": {"refresh_steps": "10"}}, "hard.refresh_steps"),
    ({"sampler": "hard", "hard": {"refresh_step": 10}}, "unknown key 'hard.refresh_step'.*refresh_steps"),
    ({"sampler": "hard", "hard": [3]}, "key 'hard' must be"),
])
def test_bad_hard_options_name_the_key(job, message):
    with pytest.raises(ConfigError, match=message):
        check_job(job, where="configs/job.yaml")


def test_hard_options_need_sampler_hard():
    cfg = edict(margin_list=(1.0, 0.5, 0.0), batch_size=16, dali=False, loss="otface", hard={"neighbours": 2})
    with pytest.raises(ConfigError, match="sampler: hard"):
        prepare_config(cfg)
    cfg = edict(margin_list=(1.0, 0.5, 0.0), batch_size=16, dali=True, sampler="hard")
    with pytest.raises(ConfigError, match="'hard' does not work with dali"):
        prepare_config(cfg)


def test_after_step_is_refresh_then_logging_and_log_components_is_it():
    from otface_plugin.arcface_torch import after_step, hooks

    assert log_components is after_step is hooks.log_components
    cfg = cfg_for("otface", otface=edict(feature="embedding"))
    sampler = build_sampler(cfg)(FolderLike(), num_replicas=1, rank=0, seed=0)
    head = build_head(cfg, PartialFCLike(), torch.nn.Identity())
    hard = hooks.RECIPE.hard
    assert hard.sampler is sampler and hard.refresh_steps == 2 and hard.lead == refresh_lead(0)
    assert [s for s in range(1, 7) if hard.due(s)] == [s for s in range(1, 7) if s % 2 == 0 or
                                                       s % sampler.steps_per_epoch == 0]
    after_step(head, 2, cfg.frequent)
    assert sampler._table is not None
    # a pk sampler: nothing to refresh, the call still logs
    pk = cfg_for("otface", otface=edict(feature="embedding"), sampler="pk", hard=None)
    build_sampler(pk)(FolderLike(), 1, 0, 0)
    assert hooks.RECIPE.hard is None
