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

``HardPKSampler`` is PKSampler whose batches also hold groups of neighbouring identities, by the
class centres it is given (see its docstring).
"""
from __future__ import annotations

import numbers
import threading
from typing import Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from otface_plugin.data.identity_index import IdentityIndex

__all__ = ["DEFAULT_NUM_INSTANCES", "HARD_OPTION_RULES", "HardPKSampler", "PKBatchSampler", "PKSampler",
           "SAMPLER_CLASSES", "check_hard_option"]

DEFAULT_NUM_INSTANCES = 4  # K, images per identity in a P x K batch (the recipe's and the study's default)

# HardPKSampler's own options -> (accepted types, what a valid value is, test): the one range check,
# which the sampler applies and the recipe's config check reports under ``hard.<name>``
HARD_OPTION_RULES = {
    "neighbours": ((int,), "an integer >= 1", lambda v: v >= 1),
    "hard_fraction": ((numbers.Real,), "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0),
}


def check_hard_option(name: str, value) -> None:
    """ValueError ``"<name> must be <what>, got <value>"`` unless ``value`` is valid for ``name``."""
    types, what, ok = HARD_OPTION_RULES[name]
    if isinstance(value, bool) or not isinstance(value, types) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")


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

    def __init__(self, index: IdentityIndex, batch_size: int, num_instances: int = DEFAULT_NUM_INSTANCES,
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
        mine = plan[:, self.rank, :].reshape(-1)
        my_visit = rounds[:, self.rank, :].reshape(-1)
        return self._positions(mine, my_visit, self._affine(np.random.default_rng([self.seed, self.epoch, 1])))

    def _positions(self, ids: np.ndarray, visits: np.ndarray, affine) -> np.ndarray:
        """Dataset positions of the K images of each (identity, visit number) entry."""
        k = self.num_instances
        offset, stride = affine
        n = self.index.counts[ids]
        m = visits[:, None] * k + np.arange(k)[None, :]
        rank_in_id = (offset[ids][:, None] + stride[ids][:, None] * m) % n[:, None]
        slots = self.index.offsets[ids][:, None] + rank_in_id
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


class _IdentityStream:
    """PKSampler's identity order (random permutations of the eligible identities, one round
    after the other, drawn from one generator) handed out a few at a time.

    ``take(n, used)`` returns the next ``n`` identities not marked in ``used`` (and marks them);
    skipped identities keep their place and come first at a later call. Taking P x world_size
    per step with ``used`` cleared between steps is exactly :meth:`PKSampler._plan`.
    """

    def __init__(self, eligible: np.ndarray, rng: np.random.Generator):
        self.eligible, self.rng = eligible, rng
        self.rounds: list = []  # [permutation, taken mask, first index not taken]

    def take(self, n: int, used: np.ndarray) -> np.ndarray:
        out, i = [], 0
        while n > 0:
            if i == len(self.rounds):
                perm = self.eligible[self.rng.permutation(len(self.eligible))]
                self.rounds.append([perm, np.zeros(len(perm), dtype=bool), 0])
            perm, taken, start = self.rounds[i]
            width = 2 * n + 16  # look at a window, not the whole round (2M identities)
            while True:
                stop = min(start + width, len(perm))
                ok = np.flatnonzero(~taken[start:stop] & ~used[perm[start:stop]])
                if len(ok) >= n or stop == len(perm):
                    break
                width *= 4
            pick = start + ok[:n]
            got = perm[pick]
            taken[pick] = True
            used[got] = True
            out.append(got)
            n -= len(got)
            free = np.flatnonzero(~taken[start:stop])
            self.rounds[i][2] = start + int(free[0]) if len(free) else stop
            i += 1
        self.rounds = [r for r in self.rounds if r[2] < len(r[0])]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class _Live:
    """The DataLoader's running iterator: steps planned so far and neighbour tables waiting for
    their step (guarded by the sampler's lock: the recipe's loader thread plans, the training
    loop updates)."""

    def __init__(self, epoch: int):
        self.epoch, self.planned, self.pending = epoch, 0, []


class HardPKSampler(PKSampler):
    """:class:`PKSampler` whose batches hold groups of neighbouring identities.

    Before :meth:`update_centres` it is exactly ``PKSampler`` (same plan, same positions). After
    it, in every rank's batch of P identities, ``round(hard_fraction * P)`` come in groups: a
    seed identity (the next one of PKSampler's random order) and its ``neighbours`` nearest
    identities by cosine of the class centres that are not yet used in that step (on any rank);
    the rest of the batch is drawn as in PKSampler. Seeds and the rest consume the random order,
    so every identity is still visited each epoch when ``num_image / K`` covers the identities
    about ``1 / (1 - hard_fraction * neighbours / (neighbours + 1))`` times (1.6 times with the
    defaults); neighbours are extra visits and walk through their images like any other visit.

    Which centres a step uses: :meth:`update_centres` applies to every iterator created after
    it (the next epoch's, as the DataLoader creates it at epoch start), and with ``from_step=s``
    also to steps ``s, s+1, ...`` of the running one. The DataLoader's sampler runs in the main
    process (its worker processes only load images) but ahead of training by its prefetch
    depth, so ``s`` must not have been planned yet (else ``ValueError``); the recipe's hook
    passes the current step plus a fixed lead, so the plan is the same on every rank and in
    every run for the same (seed, epoch, centres, update steps).

    Args (beyond PKSampler's): ``neighbours`` per seed (>= 1), ``hard_fraction`` in [0, 1].
    """

    TABLE_FACTOR = 4  # neighbours kept per identity: spares for those already used in a step

    def __init__(self, index: IdentityIndex, batch_size: int, num_instances: int = DEFAULT_NUM_INSTANCES,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None, seed: int = 0,
                 num_image: Optional[int] = None, neighbours: int = 3, hard_fraction: float = 0.5,
                 small_identities: str = "replace"):
        super().__init__(index, batch_size, num_instances, num_replicas, rank, seed, num_image,
                         small_identities)
        check_hard_option("neighbours", neighbours)
        check_hard_option("hard_fraction", hard_fraction)
        self.neighbours = neighbours
        self.hard_fraction = float(hard_fraction)
        self.hard_per_batch = int(self.hard_fraction * self.num_identities_per_batch + 0.5)
        self.table_width = min(len(self._eligible) - 1, self.TABLE_FACTOR * neighbours)
        self._table: Optional[np.ndarray] = None  # (num_identities, table_width) ordinals, -1: none
        self._live: Optional[_Live] = None
        self._lock = threading.Lock()

    # --------------------------------------------------------------- centres
    def centre_rows(self, weight) -> torch.Tensor:
        """The centres of the eligible identities, in their order (rows by class label)."""
        weight = torch.as_tensor(weight)
        labels = self.index.identity_labels[self._eligible]
        if weight.dim() != 2 or weight.shape[0] <= int(labels.max()):
            raise ValueError(f"class centres must be (num_classes, D) with a row for every class label "
                             f"(largest label {int(labels.max())}), got shape {tuple(weight.shape)}")
        return weight[torch.as_tensor(labels, device=weight.device)]

    def table_from_topk(self, topk: torch.Tensor) -> np.ndarray:
        """Neighbour table from top-k indices into :meth:`centre_rows` (one row per eligible)."""
        table = np.full((len(self.index.counts), self.table_width), -1, dtype=np.int64)
        table[self._eligible] = self._eligible[np.asarray(topk, dtype=np.int64)]
        return table

    def neighbour_table(self, weight, sharded: bool = False) -> np.ndarray:
        """The neighbour table of these (num_classes, D) class centres. ``sharded``: the search
        split over the ranks of the process group and all-gathered (a collective: every rank
        calls it, and gets the same table), as the recipe's refresh does."""
        from otface_plugin.data.neighbours import topk_cosine, topk_cosine_sharded

        rows = self.centre_rows(weight)
        idx = topk_cosine_sharded(rows, self.table_width) if sharded else topk_cosine(rows, self.table_width)[0]
        return self.table_from_topk(idx)

    def update_centres(self, weight, from_step: Optional[int] = None) -> None:
        """Use the neighbours of these (num_classes, D) class centres (see the class doc)."""
        self.update_neighbours(self.neighbour_table(weight), from_step)

    # --------------------------------------------------------------- refresh schedule
    # The one schedule every training loop follows (the recipe's hook, the study's loop): a
    # refresh after every ``refresh_steps`` steps and after each epoch's last step, in effect
    # ``lead`` steps later (as far as that loop's loader plans ahead) or from the next epoch.
    def refresh_due(self, global_step: int, refresh_steps: int) -> bool:
        """Whether the centres are re-read after ``global_step`` steps done (counted from 1
        over all epochs)."""
        return global_step > 0 and not (global_step % refresh_steps and global_step % self.steps_per_epoch)

    def refresh_start(self, global_step: Optional[int], lead: int = 0) -> Optional[int]:
        """The step of the running epoch from which a refresh after ``global_step`` steps
        applies; None (also for ``global_step`` None, a resume): from the next epoch."""
        if global_step is None:
            return None
        start = (global_step - 1) % self.steps_per_epoch + 1 + lead
        return start if start < self.steps_per_epoch else None

    def refresh(self, weight, global_step: Optional[int], lead: int = 0, sharded: bool = False) -> np.ndarray:
        """Re-read these (num_classes, D) class centres after ``global_step`` steps: the new
        neighbour table (returned) applies from :meth:`refresh_start`. ``sharded``: see
        :meth:`neighbour_table` (every rank must call it then)."""
        with torch.no_grad():
            table = self.neighbour_table(weight, sharded=sharded)
        self.update_neighbours(table, self.refresh_start(global_step, lead))
        return table

    def update_neighbours(self, table: np.ndarray, from_step: Optional[int] = None) -> None:
        """:meth:`update_centres` with the neighbour table already computed."""
        with self._lock:
            self._table = table
            live = self._live
            if from_step is None or live is None or from_step >= self.steps_per_epoch:
                return
            if from_step < live.planned:
                raise ValueError(
                    f"HardPKSampler: step {from_step} of epoch {live.epoch} is already planned "
                    f"({live.planned} steps handed to the DataLoader); apply the centres later")
            live.pending.append((int(from_step), table))

    # ------------------------------------------------------------------ plan
    def __iter__(self) -> Iterator[int]:
        live = _Live(self.epoch)
        with self._lock:
            self._live = live
            table = self._table
        return self._iterate(live, table)

    def _iterate(self, live: _Live, table) -> Iterator[int]:
        affine = self._affine(np.random.default_rng([self.seed, live.epoch, 1]))
        for batch, visits in self._steps(live.epoch, table, live):
            yield from self._positions(batch[self.rank], visits[self.rank], affine).tolist()

    def _plan(self):
        """The epoch's identity plan and visit numbers with the current centres."""
        steps = list(self._steps(self.epoch, self._table, None))
        return np.stack([b for b, _ in steps]), np.stack([v for _, v in steps])

    def _steps(self, epoch: int, table, live: Optional[_Live]):
        """Per step: (world, P) identities and how often each was visited before this step."""
        stream = _IdentityStream(self._eligible, np.random.default_rng([self.seed, epoch]))
        used = np.zeros(len(self.index.counts), dtype=bool)
        visits = np.zeros(len(self.index.counts), dtype=np.int64)
        for step in range(self.steps_per_epoch):
            if live is not None:
                with self._lock:
                    while live.pending and live.pending[0][0] <= step:
                        table = live.pending.pop(0)[1]
                    live.planned = step + 1
            batch = self._step(stream, used, table)
            yield batch, visits[batch]
            visits[batch] += 1  # identities are distinct within a step

    def _step(self, stream: _IdentityStream, used: np.ndarray, table) -> np.ndarray:
        world, p = self.num_replicas, self.num_identities_per_batch
        h = self.hard_per_batch if table is not None else 0
        batch = np.empty((world, p), dtype=np.int64)
        for r in range(world):  # the groups of every rank first, so no group is cut short
            pos = 0
            while pos < h:
                seed = int(stream.take(1, used)[0])
                batch[r, pos] = seed
                pos += 1
                row = table[seed]
                near = row[row >= 0]
                near = near[~used[near]][:min(self.neighbours, h - pos)]
                used[near] = True
                batch[r, pos:pos + len(near)] = near
                pos += len(near)
        if h < p:
            batch[:, h:] = stream.take(world * (p - h), used).reshape(world, p - h)
        used[batch.reshape(-1)] = False
        return batch


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


# sampler name -> class: the P x K samplers a recipe config (``sampler:``) and the study
# (``otface-bench --sampler``) can name; the recipe adds upstream's "distributed"
SAMPLER_CLASSES = {"pk": PKSampler, "hard": HardPKSampler}
