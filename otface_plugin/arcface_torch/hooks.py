"""The recipe's call sites: the head, sampler and logging functions a patched ``train_v2.py`` calls.

("Hooks" in this module's name means these call sites; torch's forward and state-dict hooks are
called forward/post-hooks below, and the no-patch wrapper's is an import finder.)

With ``loss`` unset, ``arcface``, ``cosface`` or ``combined`` every call is a no-op: upstream's
PartialFC_V2 and DistributedSampler are used as they are. With ``loss: otface`` the head is an
:class:`OTFaceHead`: upstream's PartialFC_V2 (the margin softmax, unchanged) inside an
OTFaceLoss, whose OT term reads the backbone's high-level features (iresnet ``layer4``,
MobileFaceNet ``conv_sep``, ViT ``norm`` tokens; see feature_layers.py) through a forward hook, so the
backbone, ``model.pt`` and the ONNX export stay exactly upstream's.

After every step, on every rank, train_v2.py calls :func:`after_step` (through its patched
name, :func:`log_components`): it runs the two per-step jobs in order, :meth:`HardRefresh.maybe_refresh`
then :func:`log_step`. With ``sampler: hard`` (any loss) the sampler is a :class:`HardPKSampler`,
and its :class:`HardRefresh` re-reads PartialFC_V2's class centres every ``hard.refresh_steps``
steps and at every epoch end to update the neighbour table; a resumed run refreshes when the
checkpoint is loaded into the head, so it plans its first epoch as the uninterrupted run would
have. The sampler and its refresh settings are one object, :data:`RECIPE`'s ``hard`` (train_v2.py
builds one loader per process, and its call sites pass no state between them).
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import distributed

from otface_plugin.arcface_torch.config import ConfigError, build_otface_loss, hard_options, head_of
from otface_plugin.arcface_torch.feature_layers import capture_layer
from otface_plugin.features import FeatureCapture, unwrap
from otface_plugin.losses.components import COMPONENTS, format_components
from otface_plugin.losses.head import MarginHead, build_margin


class OTFaceHead(torch.nn.Module):
    """``loss = head(local_embeddings, local_labels)`` like PartialFC_V2, plus the OT term.

    Its state dict (the checkpoint's ``state_dict_softmax_fc``) holds the PartialFC_V2 weight
    under ``loss.margin_loss.`` and the loss's step counter, so a resumed run continues the
    lambda warm-up.
    """

    def __init__(self, loss: torch.nn.Module, capture: Optional[FeatureCapture]) -> None:
        super().__init__()
        self.loss = loss
        self.capture = capture  # not a module: nothing of it goes into the state dict

    @property
    def partial_fc(self) -> torch.nn.Module:
        return self.loss.head

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        features = self.capture.pop() if self.capture is not None else None
        return self.loss(local_embeddings, local_labels, features=features)

    def components(self) -> dict:
        return self.loss.components()

    def load_state_dict(self, state_dict, *args, **kwargs):
        """train_v2.py's resume (``state_dict_softmax_fc``): a checkpoint the configured loss
        cannot take (e.g. trained with another ``otface.lambda_ot`` kind) is one line naming the
        key, not torch's multi-line "Error(s) in loading state_dict" report."""
        try:
            return super().load_state_dict(state_dict, *args, **kwargs)
        except (RuntimeError, ValueError, KeyError) as exc:
            if isinstance(exc, ConfigError):
                raise
            why = " ".join(str(exc).split())
            raise ConfigError(f"key 'resume': the checkpoint's state_dict_softmax_fc does not fit this job's OTFace "
                              f"loss (otface.lambda_ot {getattr(self.loss, 'lambda_ot', '?')!r}): {why}") from None


def build_head(cfg: Any, partial_fc: torch.nn.Module, backbone: torch.nn.Module) -> torch.nn.Module:
    """``partial_fc`` itself unless ``cfg.loss == "otface"``; then the OTFace head around it.

    A registered margin head (``loss: adaface``, or ``otface.margin: adaface``) replaces
    PartialFC_V2's margin function first (:func:`install_margin`)."""
    head = head_of(cfg)
    if head is not None:
        install_margin(partial_fc, build_margin(head, **dict(cfg.get("head_options") or {})))
    if cfg.get("loss") != "otface":
        return _with_resume_refresh(partial_fc)
    options = dict(cfg.get("otface") or {})
    loss = build_otface_loss(partial_fc, options)
    capture = None
    if loss.ot_term.feature == "conv":
        capture = capture_layer(backbone, options.get("layer"))
        logging.info("otface-plugin: the OT term reads %s.%s", type(unwrap(backbone)).__name__, capture.layer)
    return _with_resume_refresh(OTFaceHead(loss, capture))


def _with_resume_refresh(head: torch.nn.Module) -> torch.nn.Module:
    """With a hard sampler: loading a checkpoint into the head (train_v2.py's resume, on every
    rank) refreshes the sampler for the next epoch from the loaded centres."""
    hard = RECIPE.hard
    if hard is not None:
        head.register_load_state_dict_post_hook(lambda module, _keys: hard.refresh(module, None))
    return head


def install_margin(partial_fc: torch.nn.Module, margin: MarginHead) -> None:
    """Make ``margin`` PartialFC_V2's ``margin_softmax`` (a submodule, so its running buffers go
    into ``state_dict_softmax_fc`` and come back on resume), marked as class-sharded.

    A head that reads the embedding norms gets them from a forward pre-hook: each rank's norms
    are all-gathered in rank order, the order in which PartialFC_V2 gathers embeddings and
    labels, so row i of the norms is row i of the logits on every rank."""
    margin.sharded = True
    partial_fc.margin_softmax = margin
    if margin.needs_norms:
        partial_fc.register_forward_pre_hook(_feed_norms, with_kwargs=True)


def _feed_norms(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    local = args[0] if args else kwargs["local_embeddings"]
    norms = local.detach().float().norm(dim=1)
    if distributed.is_initialized() and distributed.get_world_size() > 1:
        parts = [torch.empty_like(norms) for _ in range(distributed.get_world_size())]
        distributed.all_gather(parts, norms)
        norms = torch.cat(parts)
    module.margin_softmax.norms = norms


def build_sampler(cfg: Any) -> Optional[Callable]:
    """None (upstream's DistributedSampler) unless ``cfg.sampler`` names one of the plugin's
    samplers (``data.sampler.SAMPLER_CLASSES``: ``"pk"``, ``"hard"``); then a factory
    ``(dataset, num_replicas, rank, seed) -> sampler`` that dataset.py calls. A hard sampler is
    kept, with its refresh settings, as ``RECIPE.hard``."""
    from otface_plugin.data.sampler import SAMPLER_CLASSES

    kind = cfg.get("sampler", "distributed")
    RECIPE.hard = None
    if kind not in SAMPLER_CLASSES:
        return None
    cls = SAMPLER_CLASSES[kind]
    batch_size, num_instances, num_image = cfg.batch_size, cfg.num_instances, cfg.get("num_image")
    hard = hard_options(cfg.get("hard") or {}) if kind == "hard" else None
    lead = refresh_lead(cfg.get("num_workers", 2))

    num_classes = cfg.get("num_classes")

    def make(dataset, num_replicas: int, rank: int, seed: int):
        # num_image: as many steps per epoch as upstream's sampler, so the LR schedule holds
        options = dict(batch_size=batch_size, num_instances=num_instances, num_replicas=num_replicas,
                       rank=rank, seed=seed, num_image=num_image)
        if hard is not None:
            options.update(neighbours=hard["neighbours"], hard_fraction=hard["hard_fraction"])
        index = identity_index(dataset)
        check_label_range(index, num_classes, _data_name(dataset))
        sampler = cls(index, **options)
        if hard is not None:
            RECIPE.hard = HardRefresh(sampler, hard["refresh_steps"], lead)
        return sampler

    return make


def check_label_range(index, num_classes: Optional[int], data: str) -> None:
    """Every identity label of the training data inside PartialFC_V2's class range
    ``[0, num_classes)``. Checked where the plugin's sampler indexes the data (sampler ``pk`` or
    ``hard``, the otface default): upstream's DistributedSampler reads no label before training,
    so a job without the plugin's sampler trains as upstream does."""
    if num_classes is None or not len(index.identity_labels):
        return
    low, high = int(index.identity_labels.min()), int(index.identity_labels.max())
    if low < 0 or high >= num_classes:
        raise ConfigError(
            f"key 'num_classes' is {num_classes}, but {data} holds {index.num_identities} identities with labels "
            f"{low}..{high}: set num_classes to at least {high + 1} (PartialFC_V2 has a class for labels "
            f"0..num_classes-1 only)")


def _data_name(dataset) -> str:
    root = getattr(dataset, "root_dir", None)
    if root is not None and os.path.isfile(os.path.join(root, "train.rec")):
        return os.path.join(root, "train.rec")
    return f"the {type(dataset).__name__} dataset"


def refresh_lead(num_workers: int) -> int:
    """Steps between a refresh and the first step it changes. The recipe's loader plans ahead of
    training by at most prefetch_factor (2) x num_workers batches in the DataLoader, 6 in
    DataLoaderX's queue, 1 in its thread and 1 preloaded; the rest is margin."""
    return 16 + 2 * max(int(num_workers), 0)


def gather_class_centres(weight: torch.Tensor) -> torch.Tensor:
    """All (num_classes, D) class centres from PartialFC_V2's per-rank shards (rank r holds a
    contiguous class range, in rank order; with sample_rate < 1 the weight is still the whole
    shard). fp16 on CUDA: 2 GB per rank for 2M classes x 512."""
    weight = weight.detach()
    if weight.is_cuda:
        weight = weight.half()
    if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() == 1:
        return weight
    world = distributed.get_world_size()
    size = torch.tensor([weight.shape[0]], device=weight.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    distributed.all_gather(sizes, size)
    sizes = [int(n) for n in sizes]
    padded = weight.new_zeros((max(sizes), weight.shape[1]))
    padded[:weight.shape[0]] = weight
    parts = [torch.empty_like(padded) for _ in range(world)]
    distributed.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


@dataclass
class HardRefresh:
    """A hard sampler and the recipe's refresh settings: every ``refresh_steps`` steps and at
    each epoch end, in effect ``lead`` steps later (the loader has planned that far ahead); the
    schedule itself is the sampler's (:meth:`HardPKSampler.refresh_due`)."""

    sampler: Any  # HardPKSampler
    refresh_steps: int
    lead: int

    def due(self, global_step: int) -> bool:
        return self.sampler.refresh_due(global_step, self.refresh_steps)

    def maybe_refresh(self, head: torch.nn.Module, global_step: int) -> None:
        if self.due(global_step):
            self.refresh(head, global_step)

    def refresh(self, head: torch.nn.Module, global_step: Optional[int]) -> None:
        """Gather the class centres, search their neighbours (split over the ranks) and update
        the sampler on every rank alike; ``global_step`` None: at a resume, for the next epoch.
        A refresh changes the steps from ``lead`` on (or the next epoch), so the loader's workers
        and prefetched batches stay as they are."""
        sampler = self.sampler
        partial_fc = head.partial_fc if isinstance(head, OTFaceHead) else head
        start = time.perf_counter()
        with torch.no_grad():
            table = sampler.refresh(gather_class_centres(partial_fc.weight), global_step, self.lead, sharded=True)
        seconds = time.perf_counter() - start
        from_step = sampler.refresh_start(global_step, self.lead)
        if (distributed.get_rank() if distributed.is_initialized() else 0) == 0:
            when = f"step {from_step} of this epoch" if from_step is not None else "the next epoch"
            logging.info("HardPKSampler refresh at global step %s: %d identities, neighbours in %.3f s, "
                         "table %s, in effect from %s", "resume" if global_step is None else global_step,
                         len(table), seconds, hashlib.sha1(table.tobytes()).hexdigest()[:12], when)


class RecipeState:
    """What this process's call sites share: the hard sampler's refresh (None without one). One
    instance, :data:`RECIPE`; :func:`build_sampler` resets it."""

    def __init__(self) -> None:
        self.hard: Optional[HardRefresh] = None


RECIPE = RecipeState()


def refresh_hard_sampler(head: torch.nn.Module, global_step: Optional[int]) -> None:
    """The hard sampler's refresh if one is due at ``global_step`` (``None``: a resume, always);
    no-op without a hard sampler."""
    hard = RECIPE.hard
    if hard is None:
        return
    if global_step is None:
        hard.refresh(head, None)
    else:
        hard.maybe_refresh(head, global_step)


def identity_index(dataset):
    """The identity -> positions index of the recipe's dataset: read from its train.rec without
    mxnet (MXFaceDataset), or from ``targets`` (an image folder)."""
    from otface_plugin.data import IdentityIndex

    root = getattr(dataset, "root_dir", None)
    if root is not None and os.path.isfile(os.path.join(root, "train.rec")):
        return IdentityIndex.from_rec(os.path.join(root, "train.rec"), os.path.join(root, "train.idx"))
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return IdentityIndex.from_labels(np.asarray(targets))
    raise ValueError(
        f"sampler 'pk' or 'hard' needs the identity of every image, which {type(dataset).__name__} does not give "
        "(config.rec 'synthetic' has one image of one identity); use sampler: distributed or a .rec"
    )


WANDB_STEP = "otface/global_step"
_WANDB_DEFINED: set = set()  # ids of the wandb runs whose otface metrics are defined


def after_step(head: torch.nn.Module, global_step: int, frequent: int, writer=None) -> None:
    """The per-step call (every rank, after every step): the hard sampler's refresh when due
    (:class:`HardRefresh`), then the logging (:func:`log_step`). No-op for upstream heads and
    samplers."""
    refresh_hard_sampler(head, global_step)
    log_step(head, global_step, frequent, writer)


log_components = after_step  # the name the patched train_v2.py calls (patches/20-otface-hooks.patch)


def log_step(head: torch.nn.Module, global_step: int, frequent: int, writer=None) -> None:
    """Every ``frequent`` steps, the OTFace loss parts into the training log, tensorboard and,
    with ``using_wandb``, the recipe's wandb run (rank 0; the values are rank 0's local batch)."""
    if not isinstance(head, OTFaceHead) or global_step % max(int(frequent), 1):
        return
    rank = distributed.get_rank() if distributed.is_initialized() else 0
    if rank != 0:
        return
    c = head.components()
    logging.info("%s", format_components(global_step, c))
    if writer is not None:
        for key in COMPONENTS:
            writer.add_scalar(f"otface/{key}", c[key], global_step)
    run = _wandb_run()
    if run is not None:
        _log_to_wandb(run, c, global_step)


def _wandb_run():
    """The wandb run train_v2.py opened (``using_wandb``), or None. wandb is not imported here:
    if the recipe did not import it, there is no run."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def _log_to_wandb(run, c: dict, global_step: int) -> None:
    # The recipe logs its own row every step without a step number (wandb counts them). Ours joins
    # the open row (commit=False, so the recipe's step count is not doubled) and carries its own
    # x-axis, otface/global_step, so the components plot against the training step.
    if id(run) not in _WANDB_DEFINED:
        run.define_metric(WANDB_STEP)
        run.define_metric("otface/*", step_metric=WANDB_STEP)
        _WANDB_DEFINED.add(id(run))
    run.log({WANDB_STEP: global_step, **{f"otface/{key}": c[key] for key in COMPONENTS}}, commit=False)


# ----------------------------------------------------------------------------------------------
# checkpoints: resume on another number of ranks (checkpoint.py)
def resume_elsewhere(cfg: Any, world_size: int) -> bool:
    """Whether ``resume: true`` needs the plugin: the set in ``cfg.output`` was saved on another
    number of ranks (or re-split by ``otface-ckpt split``, so its steps count on another). False
    leaves train_v2.py's own resume (same ranks) exactly as upstream's."""
    from otface_plugin.arcface_torch.checkpoint import saved_layout

    if not cfg.get("resume"):
        return False
    layout = saved_layout(cfg.output)
    return layout is not None and layout != (world_size, world_size)


def resume(cfg: Any, rank: int, world_size: int, backbone: torch.nn.Module, head: torch.nn.Module,
           opt: torch.optim.Optimizer, lr_scheduler: Any):
    """train_v2.py's resume for a set saved on another number of ranks; (start_epoch, global_step)."""
    from otface_plugin.arcface_torch.checkpoint import resume_into

    return resume_into(cfg, rank, world_size, backbone, head, opt, lr_scheduler)


def checkpoint_extras(checkpoint: dict, cfg: Any, world_size: int, amp: Any = None) -> dict:
    """What the plugin adds to each rank's checkpoint: the rank count and the world size its step
    counts on (so another number of ranks can resume it), the batch size and precision; with
    ``fp16``, the GradScaler's state (:func:`restore_grad_scaler`)."""
    from otface_plugin.arcface_torch.checkpoint import META_KEY

    precision = cfg.get("precision") or ("fp16" if cfg.get("fp16") else "fp32")
    checkpoint[META_KEY] = {"ranks": world_size, "step_world_size": world_size,
                            "batch_size": int(cfg.batch_size), "precision": precision}
    if cfg.get("fp16") and amp is not None:
        checkpoint["state_grad_scaler"] = amp.state_dict()
    return checkpoint


def init_from(cfg: Any, rank: int, world_size: int, backbone: torch.nn.Module, head: torch.nn.Module) -> None:
    """Fine-tuning: ``init_backbone`` (a ``model.pt``, strict) and ``init_class_centres`` (merged
    class centres) into the new job's modules, on every rank alike. Not on ``resume: true``: the
    job's own checkpoint holds where the fine-tuning got to."""
    from otface_plugin.arcface_torch.checkpoint import load_backbone, load_class_centres

    if cfg.get("resume") or not (cfg.get("init_backbone") or cfg.get("init_class_centres")):
        return
    if cfg.get("init_backbone"):
        load_backbone(cfg.init_backbone, backbone, cfg.network)
    if cfg.get("init_class_centres"):
        partial_fc = head.partial_fc if isinstance(head, OTFaceHead) else head
        load_class_centres(cfg.init_class_centres, partial_fc.weight, cfg.num_classes, rank, world_size)
    if rank == 0:
        logging.info("otface-plugin: fine-tuning from %s", ", ".join(
            f"{k} {cfg[k]}" for k in ("init_backbone", "init_class_centres") if cfg.get(k)))


# ----------------------------------------------------------------------------------------------
# precision: bf16
# upstream modules whose own autocast regions (`torch.cuda.amp.autocast(...)`, float16) become
# bfloat16 ones under `precision: bf16`
BF16_MODULES = ("backbones.", "partial_fc_v2")


class _Bf16Torch(types.ModuleType):
    """``torch`` as the recipe's backbones and PartialFC_V2 see it under ``precision: bf16``:
    ``torch.cuda.amp.autocast(enabled)`` opens a bfloat16 autocast on the run's device (CUDA, or
    the CPU fallback's CPU autocast); everything else is torch itself. Their regions stay
    upstream's: what upstream keeps in float32 (the iresnets' ``fc``, mbf's ``conv_sep``, the
    ViT's attention softmax, PartialFC_V2's logits after the matmul) stays float32."""

    def __init__(self, device_type: str) -> None:
        super().__init__("torch")
        self._device_type = device_type
        amp = types.ModuleType("torch.cuda.amp")
        amp.autocast = self._autocast
        self.cuda = _Forward(torch.cuda, amp=amp)

    def _autocast(self, enabled: bool = True, *args, **kwargs):
        return torch.autocast(self._device_type, dtype=torch.bfloat16, enabled=bool(enabled))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class _Forward:
    """An object that is ``target`` except for the given attributes."""

    def __init__(self, target: Any, **override: Any) -> None:
        self._target = target
        self.__dict__.update(override)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def set_precision(cfg: Any, backbone: torch.nn.Module, head: torch.nn.Module) -> None:
    """``precision: bf16``: the backbone's and PartialFC_V2's autocast regions run in bfloat16
    (no GradScaler: ``fp16`` stays false; the DDP hook is :func:`comm_hook`'s). The OT term is
    computed outside them, in float32. No-op for any other precision."""
    if cfg.get("precision") != "bf16":
        return
    partial_fc = head.partial_fc if isinstance(head, OTFaceHead) else head
    device_type = next(backbone.parameters()).device.type
    proxy = _Bf16Torch(device_type)
    names = {type(m).__module__ for m in (*backbone.modules(), partial_fc)}
    for name in sorted(names):
        module = sys.modules.get(name)
        if name.startswith(BF16_MODULES) and getattr(module, "torch", None) is torch:
            module.torch = proxy
    backbone.fp16 = True  # opens the iresnets' and mbf's autocast region, and casts their last layer's input to float
    partial_fc.fp16 = True  # the same for PartialFC_V2's logits
    if (distributed.get_rank() if distributed.is_initialized() else 0) == 0:
        logging.info("otface-plugin: precision bf16: %s autocast in bfloat16, no GradScaler, bf16_compress_hook",
                     device_type)


def comm_hook(cfg: Any, default: Callable) -> Callable:
    """The backbone's DDP gradient compression: bfloat16 with ``precision: bf16``, else upstream's."""
    if cfg.get("precision") == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        return bf16_compress_hook
    return default


def restore_grad_scaler(cfg: Any, rank: int, amp: Any) -> None:
    """On ``resume: true`` with ``fp16``: the GradScaler's scale and growth tracker from the
    checkpoint (this rank's file, or rank 0's after a resume on other ranks: DDP's all-reduced
    gradients give every rank the same scale). A checkpoint without it (saved by upstream)
    leaves the new scaler as upstream does."""
    from otface_plugin.arcface_torch.checkpoint import checkpoint_name, saved_layout

    if not (cfg.get("resume") and cfg.get("fp16")):
        return
    layout = saved_layout(cfg.output)
    path = os.path.join(cfg.output, checkpoint_name(rank))
    if not (layout and rank < layout[0] and os.path.isfile(path)):
        path = os.path.join(cfg.output, checkpoint_name(0))
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("state_grad_scaler")
    if state:
        amp.load_state_dict(state)
