"""The GPU-only failure classes, caught on the CPU: the training step run on a device that is not
the CPU's, and every collective checked for the device NCCL would need.

The device here is a *shadow* device: each tensor is a wrapper that reports ``device="meta"``
(so autograd, ``.device``-driven factories and device checks treat it as an accelerator) and
carries the real CPU values inside, so the step computes real numbers. A dispatch mode runs every
op on the values and enforces what a CUDA device would:

- a CPU tensor with one element or more dimensions mixed into an op with device tensors is an
  error naming the line (CUDA accepts only 0-dim CPU scalars there; so does this check), and so
  is a plain meta tensor (made on the device without values: a bug of the harness or the code);
- every host read of device values is recorded with its line: ``.item()``/``float()``/``bool()``
  (``_local_scalar_dense``), ``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
  ``repeat_interleave`` by a tensor, and copies to the CPU. Each case asserts exactly the lines
  where the code synchronises by design (eager mining, the margin heads' label rows, the
  neighbour search's table) and none on the fixed-shape OT path.

``torch.distributed`` is replaced by a 2-rank stand-in whose ``all_gather``/``all_reduce``/
``broadcast`` refuse a tensor that is not on the device (NCCL refuses CPU tensors; gloo takes
them, so the CPU suites cannot see this).

What it cannot see: CUDA kernels themselves, the captured CUDA graph and ``torch.compile``
(``ot_compile: cudagraph`` runs its fixed-shape step with the eager loop off CUDA), code that
branches on ``is_cuda`` (the fp16 class centres of a refresh), streams, NCCL's ordering and
deadlocks, memory and speed. torch's FakeTensorMode with a fake ``cuda`` device models is_cuda
too, but on a CPU-only build its autograd aborts the process (no CUDA device guard) and
``nonzero`` raises, so a training step cannot run there; the shadow device runs forward and
backward.
"""
import traceback

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import distributed
from torch.utils._pytree import tree_map

try:  # torch >= 2.1: what a wrapper tensor needs for views and in-place ops to alias correctly
    from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing
except ImportError:  # pragma: no cover - older torch: the check cannot run
    pytest.skip("the device check needs torch >= 2.1 (return_and_correct_aliasing)", allow_module_level=True)

from otface_plugin import build_loss
from otface_plugin.arcface_torch import hooks
from otface_plugin.data import HardPKSampler, IdentityIndex
from otface_plugin.losses import OTFaceLoss, OTFaceTerm
from otface_plugin.losses.head import build_margin
from otface_plugin.registry import entries

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
              aten.unique_consecutive.default, aten._unique2.default, aten.repeat_interleave.Tensor}
INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default}


class DeviceMixError(RuntimeError):
    """A tensor off the device where CUDA (or NCCL) would need it there."""


def _line() -> str:
    """The innermost line of the package on the stack: where the op or read was written."""
    for frame in reversed(traceback.extract_stack()):
        if "/otface_plugin/" in frame.filename:
            return f"{frame.filename.split('/otface_plugin/')[-1]}:{frame.name}"
    return "?"


class Shadow(torch.Tensor):
    """A device tensor (``device="meta"``) holding real values (``elem``, on the CPU)."""

    @staticmethod
    def __new__(cls, elem):
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device="meta", requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    def __repr__(self):
        return f"Shadow({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with ShadowDevice():  # set-up outside a checked region (a Parameter's detach, say)
            return func(*args, **(kwargs or {}))


_TENSOR, _AS_TENSOR = torch.tensor, torch.as_tensor


def _from_host(make):
    # torch.tensor / as_tensor copy host data to their device below the dispatcher: a meta target
    # would come back without its values, so the copy to the device is made here
    def wrapped(data, *args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "meta":
            return Shadow(make(data, *args, device="cpu", **kwargs))
        return make(data, *args, device=device, **kwargs)
    return wrapped


class ShadowDevice(TorchDispatchMode):
    """Runs ops on the shadow tensors' values; records host reads in :attr:`reads` as
    ``(op, file:function)`` and raises :class:`DeviceMixError` on a CPU tensor mixed in."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __enter__(self):
        self.patched = torch.tensor is _TENSOR
        if self.patched:
            torch.tensor, torch.as_tensor = _from_host(_TENSOR), _from_host(_AS_TENSOR)
        return super().__enter__()

    def __exit__(self, *exc):
        if self.patched:
            torch.tensor, torch.as_tensor = _TENSOR, _AS_TENSOR
        return super().__exit__(*exc)

    def read_lines(self):
        return sorted({where for _, where in self.reads})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        shadows, plain = [], []
        tree_map(lambda x: shadows.append(x) if isinstance(x, Shadow)
                 else plain.append(x) if isinstance(x, torch.Tensor) else None, (args, kwargs))
        for t in plain:
            if t.device.type == "meta":
                raise DeviceMixError(f"{func}: a meta tensor without values at {_line()}")
            if t.device.type == "cpu" and t.dim() > 0 and shadows:
                raise DeviceMixError(f"{func}: a CPU tensor of shape {tuple(t.shape)} mixed with device tensors "
                                     f"at {_line()}")
        to_host = func is aten._to_copy.default and shadows and str(kwargs.get("device", "meta")) == "cpu"
        mask_index = func in INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                               for i in (args[1] or []))
        if shadows and (func in HOST_READS or to_host or mask_index):
            self.reads.append((func.__name__, _line()))
        on_device = {k: torch.device("cpu") if isinstance(v, torch.device) and v.type == "meta" else v
                     for k, v in kwargs.items()}
        unwrap = lambda x: x.elem if isinstance(x, Shadow) else x  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, on_device))
        factory = isinstance(kwargs.get("device"), torch.device) and kwargs["device"].type == "meta"
        if to_host or not (shadows or factory):
            return out
        wrap = lambda x: Shadow(x) if isinstance(x, torch.Tensor) and not isinstance(x, Shadow) else x  # noqa: E731
        return return_and_correct_aliasing(func, args, kwargs, tree_map(wrap, out))


def to_device(x):
    """A tensor, or a module's parameters and buffers (as ``.to(device)`` moves them)."""
    if isinstance(x, torch.nn.Module):
        return x._apply(lambda t: t if isinstance(t, Shadow) else Shadow(t.detach().clone()))
    return Shadow(x.detach().clone().requires_grad_(x.requires_grad))


def values(t):
    return t.elem if isinstance(t, Shadow) else t


@pytest.fixture(autouse=True)
def autocast_on_the_device(monkeypatch):
    """``torch.autocast(device_type=x.device.type)`` is how the loss turns autocast off around
    its float32 parts; for the shadow device that is CUDA's autocast."""
    real = torch.autocast

    class autocast(real):
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cuda" if device_type == "meta" else device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)


@pytest.fixture
def two_ranks(monkeypatch):
    """torch.distributed as rank 0 of 2 under NCCL's rule: every tensor of a collective on the
    device. ``all_gather`` hands every rank this rank's tensor; ``all_reduce`` and ``broadcast``
    leave it as it is (the values are not what is checked). Returns the collectives called."""
    called = []

    def on_device(name, *tensors):
        for t in tensors:
            if not isinstance(t, Shadow):
                raise DeviceMixError(f"{name} on a {t.device} tensor of shape {tuple(t.shape)} at {_line()} "
                                     "(NCCL takes device tensors only)")
        called.append((name, _line()))

    def all_gather(out, tensor, *args, **kwargs):
        on_device("all_gather", tensor, *out)
        for o in out:
            o.copy_(tensor)

    fakes = dict(is_available=lambda: True, is_initialized=lambda: True, get_world_size=lambda *a: 2,
                 get_rank=lambda *a: 0, all_gather=all_gather,
                 all_reduce=lambda t, *a, **k: on_device("all_reduce", t),
                 broadcast=lambda t, *a, **k: on_device("broadcast", t))
    for name, fake in fakes.items():
        monkeypatch.setattr(distributed, name, fake)
    return called


def batch(P=4, K=4, D=24, C=32, HW=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(P, D, generator=g).repeat_interleave(K, 0) + 1.2 * torch.randn(P * K, D, generator=g)
    feats = torch.randn(P, C, HW, HW, generator=g).repeat_interleave(K, 0) + torch.randn(P * K, C, HW, HW, generator=g)
    return emb, feats, torch.arange(P).repeat_interleave(K)


# where each path reads device values on the host, by design
EAGER_MINING_READS = ["mining.py:mine_triplets", "mining.py:require_finite"]
HEADS = sorted(entries("head"))
COMBINED_MARGINS = ("arcface", "cosface", "combined")  # margin_logits' -1 filter; the others: MarginHead.targets
STANDALONE_READS = ["losses/head.py:check_label_range"]  # MarginSoftmaxLoss's class-range check


def margin_reads(margin):
    return ["losses/margin.py:margin_logits"] if margin in COMBINED_MARGINS else ["losses/head.py:targets"]


def test_the_shadow_device_sees_what_cuda_would_refuse():
    """The harness itself: a CPU tensor mixed in is refused, a CPU scalar is not (as on CUDA),
    and host reads are recorded."""
    x = to_device(torch.ones(3))
    with ShadowDevice() as dev:
        with pytest.raises(DeviceMixError, match=r"CPU tensor of shape \(3,\)"):
            x + torch.ones(3)
        y = x * torch.tensor(2.0) + torch.arange(3, device=x.device)  # a 0-dim CPU scalar; a device factory
        assert isinstance(y, Shadow) and values(y).tolist() == [2.0, 3.0, 4.0]
        assert float(y.sum()) == 9.0 and bool((y > 3).any())
        assert y[y > 2].shape == (2,) and y.cpu().device.type == "cpu"
    assert [op for op, _ in dev.reads] == ["_local_scalar_dense.default", "_local_scalar_dense.default",
                                           "index.Tensor", "_to_copy.default"]


def test_the_collective_stand_in_refuses_a_cpu_tensor(two_ranks):
    with pytest.raises(DeviceMixError, match="all_reduce on a cpu tensor"):
        distributed.all_reduce(torch.zeros(2))
    with ShadowDevice():
        distributed.all_reduce(to_device(torch.zeros(2)))
    assert [name for name, _ in two_ranks] == ["all_reduce"]


def test_users_triplets_from_the_host_are_moved_to_the_device():
    """indices_tuple from a host-side miner (CPU index tensors) with device embeddings: the term
    moves them; its host reads are the finiteness check and the triplets' validation."""
    emb, feats, labels = batch()
    triplets = (torch.tensor([0, 4]), torch.tensor([1, 5]), torch.tensor([8, 12]))
    term = OTFaceTerm(iters=10, ot_compile="cudagraph")
    ref = term(emb, labels, features=feats, indices_tuple=triplets)
    with ShadowDevice():
        got = term(to_device(emb), to_device(labels), features=to_device(feats), indices_tuple=triplets)
    torch.testing.assert_close(values(got), ref)


@pytest.mark.parametrize("feature", ["conv", "embedding"])
@pytest.mark.parametrize("ot_compile", ["none", "cudagraph"])
def test_ot_term_on_the_device(feature, ot_compile):
    """The OT term's forward and backward on the device: no CPU tensor mixed in, the value of
    the CPU run, and host reads only where the eager path mines (the fixed-shape path: none)."""
    emb, feats, labels = batch()
    term = OTFaceTerm(iters=10, feature=feature, ot_compile=ot_compile)
    e, f = emb.clone().requires_grad_(), feats.clone().requires_grad_()
    ref = term(e, labels, features=f if feature == "conv" else None)
    ref.backward()
    e_dev, f_dev = to_device(e.detach().requires_grad_()), to_device(f.detach().requires_grad_())
    with ShadowDevice() as dev:
        got = term(e_dev, to_device(labels), features=f_dev if feature == "conv" else None)
        got.backward()
    assert isinstance(got, Shadow)
    torch.testing.assert_close(values(got), ref.detach())
    grad, ref_grad = (f_dev.grad, f.grad) if feature == "conv" else (e_dev.grad, e.grad)
    assert isinstance(grad, Shadow)
    torch.testing.assert_close(values(grad), ref_grad)
    assert dev.read_lines() == (EAGER_MINING_READS if ot_compile == "none" else [])


@pytest.mark.parametrize("margin", HEADS)
@pytest.mark.parametrize("ot_compile", ["none", "cudagraph"])
def test_otface_loss_step_with_every_margin_head(margin, ot_compile):
    """OTFaceLoss with each registered margin, the adaptive lambda and the gradient-share probe:
    two training steps on the device; the only host reads besides eager mining are the margin
    head's rows with a label."""
    emb, feats, labels = batch()
    torch.manual_seed(0)
    loss = to_device(OTFaceLoss(num_classes=4, embedding_size=24, margin=margin, lambda_ot="auto", eps=0.1,
                                iters=10, term_options={"ot_compile": ot_compile}))
    with ShadowDevice() as dev:
        for _ in range(2):
            f = to_device(feats.requires_grad_())
            value = loss(to_device(emb.requires_grad_()), to_device(labels), features=f)
            value.backward()
    assert isinstance(f.grad, Shadow) and torch.isfinite(values(f.grad)).all()
    assert isinstance(loss.grad_stats, Shadow) and isinstance(loss.lambda_auto, Shadow)
    assert torch.isfinite(values(loss.grad_stats)).all() and float(values(loss.step)) == 2
    expected = STANDALONE_READS + margin_reads(margin) + (EAGER_MINING_READS if ot_compile == "none" else [])
    assert dev.read_lines() == sorted(expected)


@pytest.mark.parametrize("head", HEADS)
def test_standalone_head_loss_on_the_device(head):
    emb, _, labels = batch()
    torch.manual_seed(0)
    loss = to_device(build_loss(head, num_classes=4, embedding_size=24))
    e = to_device(emb.requires_grad_())
    with ShadowDevice() as dev:
        loss(e, to_device(labels)).backward()
    assert isinstance(e.grad, Shadow) and torch.isfinite(values(e.grad)).all()
    assert dev.read_lines() == sorted(STANDALONE_READS + margin_reads(head))


class PartialFCOnTwoRanks(torch.nn.Module):
    """PartialFC_V2's collective part: the embeddings and labels of both ranks all-gathered
    (rank order), then the margin function over all rows."""

    def __init__(self, num_classes=8, dim=24):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.margin_softmax = None

    def forward(self, local_embeddings, local_labels):
        parts = [torch.empty_like(local_embeddings) for _ in range(2)]
        distributed.all_gather(parts, local_embeddings.detach())
        labels = [torch.empty_like(local_labels) for _ in range(2)]
        distributed.all_gather(labels, local_labels)
        embeddings = torch.cat([local_embeddings, parts[1]])
        labels = torch.cat(labels)
        logits = F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1, 1)
        return F.cross_entropy(self.margin_softmax(logits, labels), labels)


@pytest.mark.parametrize("head, options", [(h, {}) for h in HEADS] + [("elasticface_arc", {"plus": True})])
def test_recipe_head_collectives_take_device_tensors(head, options, two_ranks):
    """The recipe's sharded margin heads (install_margin: the norms' all-gather, global_targets'
    all-reduce, ElasticFace+'s broadcast) and the adaptive lambda's all-reduce, as rank 0 of 2:
    every collective's tensors on the device."""
    pfc = PartialFCOnTwoRanks()
    hooks.install_margin(pfc, build_margin(head, **options))
    loss = to_device(OTFaceLoss(head=pfc, lambda_ot="auto", feature="embedding",
                                term_options={"ot_compile": "cudagraph"}))
    emb, _, labels = batch()
    with ShadowDevice() as dev:
        for _ in range(2):
            loss(to_device(emb.requires_grad_()), to_device(labels)).backward()
    names = {name for name, _ in two_ranks}
    assert ("all_reduce", "losses/grad_share.py:adapt_lambda") in two_ranks
    if build_margin(head).needs_norms:
        assert ("all_gather", "arcface_torch/hooks.py:_feed_norms") in two_ranks
    if head == "curricularface" or options.get("plus"):
        assert ("all_reduce", "losses/head.py:global_targets") in two_ranks
    if options.get("plus"):
        assert "broadcast" in names
    # ElasticFace+ sorts the drawn margins over the rows with a target: a boolean-mask read
    plus = ["losses/elasticface.py:margins"] if options.get("plus") else []
    assert dev.read_lines() == sorted(margin_reads(head) + plus)


def test_hard_sampler_refresh_on_the_device(two_ranks):
    """The recipe's refresh as rank 0 of 2: the class centres gathered from the shards, the
    neighbour search split over the ranks and all-gathered, on device tensors; its host reads are
    the shard sizes and the table (a numpy array the sampler plans with), once per refresh."""
    n = 40
    starts = 1 + 4 * np.arange(n)
    sampler = HardPKSampler(IdentityIndex.from_ranges(starts, starts + 4), 32, 4, num_replicas=2, rank=0, seed=0)
    shard = torch.randn(n // 2, 16, generator=torch.Generator().manual_seed(0))
    refresh = hooks.HardRefresh(sampler, refresh_steps=3, lead=0)
    partial_fc = to_device(torch.nn.Linear(16, n // 2, bias=False))
    partial_fc.weight.elem.copy_(shard)
    with ShadowDevice() as dev:
        refresh.maybe_refresh(partial_fc, 3)
    assert [c for c in two_ranks if c[0] == "all_gather"] == [
        ("all_gather", "arcface_torch/hooks.py:gather_class_centres"),
        ("all_gather", "arcface_torch/hooks.py:gather_class_centres"),
        ("all_gather", "data/neighbours.py:topk_cosine_sharded")]
    assert dev.read_lines() == ["arcface_torch/hooks.py:<listcomp>", "data/neighbours.py:topk_cosine",
                                "data/neighbours.py:topk_cosine_sharded"]
    # the stand-in hands rank 0's shard (and rank 0's half of the search) to both ranks: rank 0's
    # rows of the table are those of the same centres searched on the CPU
    reference = HardPKSampler(sampler.index, 32, 4, num_replicas=2, rank=0, seed=0)
    expected = reference.neighbour_table(torch.cat([shard, shard]))
    assert np.array_equal(sampler._table[:n // 2], expected[:n // 2])
