"""Distributed P x K identity sampler for the recipe's DataLoader.

Every step, each rank gets a batch of P identities x K images (K = ``num_instances``); the
P * world_size identities of one step are distinct, so no identity is on two ranks in the same
step. ``PKSampler`` is a flat index sampler: its consecutive ``batch_size`` chunks are the P x K
batches, so the recipe's ``DataLoader(batch_size=..., sampler=..., drop_last=True)`` works
unchanged. ``PKBatchSampler`` yields the same batches as lists (for ``batch_sampler=``).

Epoch plan (identical on all ranks for the same ``(seed, epoch)``):
- identities are visited in random permutations, one after the other, P * world_size per step
  (a step that straddles two permutations never repeats an identity), so with enough steps every
  identity appears at least once per epoch;
- the j-th visit of identity c takes images ``(o_c + a_c * m) mod n_c`` for
  ``m = j*K .. j*K+K-1``, a per-epoch random affine permutation (``a_c`` coprime to ``n_c``):
  repeated visits walk through all images of the identity before repeating any, and identities
  with fewer than K images repeat images (``small_identities="replace"``, the default) or are
  never drawn (``"drop"``).
Steps per epoch are ``num_image // (batch_size * world_size)``, what the recipe's LR schedule
assumes (``cfg.total_step``).
"""
from __future__ import annotations

from typing import Iterator, List, Optional

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from otface_plugin.data.identity_index import IdentityIndex

__all__ = ["PKBatchSampler", "PKSampler"]


def _dist_default(num_replicas: Optional[int], rank: Optional[int]):
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
    return num_replicas, rank


class PKSampler(Sampler[int]):
    """Flat per-rank dataset positions whose ``batch_size`` chunks are P x K batches.

    Args:
        index: identity -> dataset positions (:meth:`IdentityIndex.from_rec`).
        batch_size: per-rank batch size (the recipe's ``cfg.batch_size``), a multiple of K.
        num_instances: K, images per identity in a batch.
        num_replicas, rank: world size and rank (default: from ``torch.distributed``).
        seed: same on every rank (the recipe's ``cfg.seed``).
        num_image: images per epoch for the step count; default ``index.num_images``
            (pass ``cfg.num_image`` to match the recipe's LR schedule exactly).
        small_identities: "replace" (sample identities with < K images with repetition) or
            "drop" (never draw them).
    """

    def __init__(self, index: IdentityIndex, batch_size: int, num_instances: int = 4,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None, seed: int = 0,
                 num_image: Optional[int] = None, small_identities: str = "replace"):
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of "
                             f"num_instances K ({num_instances})")
        if batch_size == num_instances:  # P = 1: no negatives in any batch, the OT term is always 0
            raise ValueError(f"batch_size ({batch_size}) equals num_instances K: each batch would hold "
                             "one identity (no negatives for mining); use batch_size >= 2 * K")
        if small_identities not in ("replace", "drop"):
            raise ValueError(f"small_identities must be 'replace' or 'drop', "
                             f"got {small_identities!r}")
        self.index = index
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_identities_per_batch = batch_size // num_instances
        self.num_replicas, self.rank = _dist_default(num_replicas, rank)
        self.seed = int(seed)
        self.epoch = 0
        self.small_identities = small_identities
        self.num_image = int(index.num_images if num_image is None else num_image)
        counts = index.counts
        eligible = counts >= (num_instances if small_identities == "drop" else 1)
        self._eligible = np.flatnonzero(eligible)
        need = self.num_identities_per_batch * self.num_replicas
        if len(self._eligible) < need:
            what = (f"identities with at least K={num_instances} images"
                    if small_identities == "drop" else "identities with images")
            raise ValueError(
                f"PKSampler needs P x world_size = {self.num_identities_per_batch} x "
                f"{self.num_replicas} = {need} distinct identities per step, but the index has "
                f"only {len(self._eligible)} {what}; lower batch_size or raise num_instances")
        self.steps_per_epoch = self.num_image // (batch_size * self.num_replicas)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"num_image ({self.num_image}) is smaller than one global batch "
                f"(batch_size {batch_size} x world_size {self.num_replicas}): zero steps")

    def set_epoch(self, epoch: int) -> None:
        """Called by the recipe before each epoch; changes the plan deterministically."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices().tolist())

    # ------------------------------------------------------------------ plan
    def identity_plan(self) -> np.ndarray:
        """(steps, world_size, P) identity ordinals of this epoch (same on all ranks)."""
        return self._plan()[0]

    def _plan(self):
        """Identity plan and, per entry, its permutation round. Every identity appears exactly
        once per round and rounds are consumed in order, so the round of an entry is how many
        times that identity was visited before it in this epoch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        q = self.num_identities_per_batch * self.num_replicas
        total = self.steps_per_epoch * q
        out = np.empty(total, dtype=np.int64)
        rounds = np.empty(total, dtype=np.int64)
        used = np.zeros(len(self.index.counts), dtype=bool)
        filled, rnd = 0, 0
        carry = np.zeros(0, dtype=np.int64)
        while filled < total:
            perm = self._eligible[rng.permutation(len(self._eligible))]
            if len(carry):
                # Finish the step begun with the previous permutation's tail without repeating
                # any identity of that step; the identities used move out of this round.
                used[carry] = True
                fill = perm[~used[perm]][: q - len(carry)]
                used[carry] = False
                take = min(q, total - filled)
                out[filled:filled + take] = np.concatenate([carry, fill])[:take]
                rounds[filled:filled + take] = np.r_[np.full(len(carry), rnd - 1),
                                                     np.full(len(fill), rnd)][:take]
                filled += take
                used[fill] = True
                perm = perm[~used[perm]]
                used[fill] = False
            full = (len(perm) // q) * q
            take = min(full, total - filled)
            out[filled:filled + take] = perm[:take]
            rounds[filled:filled + take] = rnd
            filled += take
            carry = perm[full:]
            rnd += 1
        shape = (self.steps_per_epoch, self.num_replicas, self.num_identities_per_batch)
        return out.reshape(shape), rounds.reshape(shape)

    def epoch_indices(self) -> np.ndarray:
        """This rank's dataset positions for the epoch, ``len(self)`` of them, step-major."""
        plan, rounds = self._plan()
        k = self.num_instances
        mine = plan[:, self.rank, :].reshape(-1)
        my_visit = rounds[:, self.rank, :].reshape(-1)
        offset, stride = self._affine(np.random.default_rng([self.seed, self.epoch, 1]))
        n = self.index.counts[mine]
        m = my_visit[:, None] * k + np.arange(k)[None, :]
        rank_in_id = (offset[mine][:, None] + stride[mine][:, None] * m) % n[:, None]
        slots = self.index.offsets[mine][:, None] + rank_in_id
        return self.index.gather(slots.reshape(-1))

    def _affine(self, rng: np.random.Generator):
        """Per-identity (offset, stride) with stride coprime to the identity's image count."""
        n = np.maximum(self.index.counts, 1)
        offset = rng.integers(0, n)
        stride = rng.integers(1, np.maximum(n, 2))
        bad = np.gcd(stride, n) != 1
        for _ in range(64):  # rejection sampling; P(coprime) >= ~0.3, so this ends fast
            if not bad.any():
                break
            stride[bad] = rng.integers(1, np.maximum(n[bad], 2))
            bad = np.gcd(stride, n) != 1
        stride[bad] = 1  # vanishingly rare: fall back to a rotation
        return offset, stride


class PKBatchSampler(Sampler[List[int]]):
    """The same P x K batches as lists, for ``DataLoader(batch_sampler=...)``."""

    def __init__(self, *args, **kwargs):
        self.sampler = PKSampler(*args, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def __iter__(self) -> Iterator[List[int]]:
        flat = self.sampler.epoch_indices().reshape(-1, self.sampler.batch_size)
        return iter(flat.tolist())
