"""The hooks a patched train_v2.py calls, with stand-ins for upstream's modules (no checkout)."""
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from easydict import EasyDict as edict

from otface_plugin.arcface_torch import build_head, build_sampler, log_components, prepare_config
from otface_plugin.arcface_torch.config import ConfigError
from otface_plugin.arcface_torch.hooks import OTFaceHead, identity_index
from conftest import UPSTREAM, needs_upstream, pythonpath
from otface_plugin.arcface_torch.tv_compat import transforms
from helpers import TinyBackbone


class FakePartialFC(torch.nn.Module):
    """Stands in for PartialFC_V2: squeezes labels in place, as upstream does."""

    def __init__(self, num_classes=8, dim=32):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(num_classes, dim) * 0.01)

    def forward(self, embeddings, labels):
        labels.squeeze_()
        logits = torch.nn.functional.linear(torch.nn.functional.normalize(embeddings),
                                            torch.nn.functional.normalize(self.weight))
        return torch.nn.functional.cross_entropy(64 * logits, labels.long())


def cfg_for(loss=None, **extra):
    c = edict(margin_list=(1.0, 0.5, 0.0), batch_size=8, dali=False, num_image=64, frequent=1)
    if loss is not None:
        c.loss = loss
    c.update(extra)
    return prepare_config(c)


@pytest.mark.parametrize("loss", [None, "arcface", "cosface", "combined"])
def test_upstream_losses_get_upstream_head_and_sampler(loss):
    pfc = FakePartialFC()
    cfg = cfg_for(loss)
    assert build_head(cfg, pfc, TinyBackbone()) is pfc
    assert build_sampler(cfg) is None


def test_otface_head_trains_and_logs(caplog):
    torch.manual_seed(0)
    backbone = TinyBackbone()
    pfc = FakePartialFC()
    cfg = cfg_for("otface", otface=edict(lambda_ot=0.5, feature="conv", layer="layer4", warmup_steps=4))
    head = build_head(cfg, pfc, backbone)
    assert isinstance(head, OTFaceHead) and head.partial_fc is pfc
    params = {id(p) for p in head.parameters()}
    assert params == {id(pfc.weight)}  # the optimizer sees exactly the PartialFC weight

    images = torch.randn(8, 3, 16, 16)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]).view(-1, 1)  # (B, 1), squeezed in place by PFC
    loss = head(backbone(images), labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert backbone.layer4.weight.grad is not None
    assert head.state_dict()["loss.step"].item() == 1
    assert "loss.margin_loss.weight" in head.state_dict()

    class Writer:
        def __init__(self):
            self.scalars = {}

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = (value, step)

    writer = Writer()
    with caplog.at_level(logging.INFO):
        log_components(head, 1, 1, writer)
    assert "OTFace   Global Step: 1" in caplog.text and "HardTriplets" in caplog.text
    assert set(writer.scalars) >= {"otface/ot", "otface/margin", "otface/lambda", "otface/triplets"}
    assert writer.scalars["otface/lambda"] == (0.0, 1)  # warm-up starts at 0

    caplog.clear()
    with caplog.at_level(logging.INFO):
        log_components(head, 3, 2, writer)  # not a logging step
        log_components(pfc, 2, 1, writer)  # not an OTFace head
    assert caplog.text == ""


def test_head_resumes_its_step_counter():
    pfc = FakePartialFC()
    cfg = cfg_for("otface", otface=edict(feature="embedding", warmup_steps=10))
    head = build_head(cfg, pfc, TinyBackbone())
    assert head.capture is None  # feature=embedding needs no hook
    state = head.state_dict()
    state["loss.step"] = torch.tensor(7)
    again = build_head(cfg, FakePartialFC(), TinyBackbone())
    again.load_state_dict(state)
    assert again.loss.current_lambda().item() == pytest.approx(0.07)


def test_missing_layer_is_a_clear_error():
    cfg = cfg_for("otface", otface=edict(layer="layer9"))
    with pytest.raises(ConfigError, match="layer9") as err:
        build_head(cfg, FakePartialFC(), TinyBackbone())
    # one line naming the key, the backbone and its candidate layers
    assert "\n" not in str(err.value)
    assert "otface.layer" in str(err.value) and "TinyBackbone" in str(err.value) and "'layer4'" in str(err.value)


@needs_upstream
def test_missing_layer_is_refused_when_the_config_is_loaded(monkeypatch):
    """In the recipe (its backbones package importable), the backbone of cfg.network is built on
    the meta device at load: no training step, no weights, the same one line."""
    monkeypatch.syspath_prepend(str(UPSTREAM))
    monkeypatch.delitem(sys.modules, "backbones", raising=False)
    with pytest.raises(ConfigError, match=r"IResNet has no submodule 'nosuchlayer' \(option otface.layer\).*'layer4'"):
        cfg_for("otface", network="r18", embedding_size=512, otface=edict(layer="nosuchlayer"))
    cfg = cfg_for("otface", network="r18", embedding_size=512, otface=edict(layer="layer3"))
    assert cfg.otface["layer"] == "layer3"
    # the embedding feature reads no layer: its layer key is not the backbone's business
    cfg_for("otface", network="r18", otface=edict(layer="nosuchlayer", feature="embedding"))


def test_resume_with_the_other_lambda_kind_is_one_line():
    """A fixed-lambda checkpoint resumed with lambda_ot: auto, and the reverse: train_v2.py's
    module_partial_fc.load_state_dict gives one line naming the key, not torch's multi-line
    report."""
    def head(lambda_ot):
        cfg = cfg_for("otface", otface=edict(feature="embedding", lambda_ot=lambda_ot))
        return build_head(cfg, FakePartialFC(), TinyBackbone())

    for saved, resumed in ((0.1, "auto"), ("auto", 0.1)):
        state = head(saved).state_dict()
        with pytest.raises(ConfigError) as err:
            head(resumed).load_state_dict(state)
        assert "\n" not in str(err.value) and "key 'resume'" in str(err.value), str(err.value)
        assert "lambda" in str(err.value)
    again = head("auto")
    again.load_state_dict(head("auto").state_dict())  # the same kind resumes


class _Folder(torch.utils.data.Dataset):
    targets = [i // 2 for i in range(80)]  # 40 identities x 2 images

    def __len__(self):
        return len(self.targets)


@pytest.mark.parametrize("sampler", ["pk", "hard"])
def test_num_classes_below_the_labels_is_refused_by_the_plugin_sampler(sampler, monkeypatch):
    from otface_plugin.arcface_torch.hooks import RECIPE

    monkeypatch.setattr(RECIPE, "hard", None)  # a hard sampler built here is gone after this test
    cfg = cfg_for("otface", otface=edict(feature="embedding"), sampler=sampler, num_image=80, num_classes=10)
    with pytest.raises(ConfigError, match=r"key 'num_classes' is 10, but the _Folder dataset holds 40 identities "
                                          r"with labels 0\.\.39: set num_classes to at least 40"):
        build_sampler(cfg)(_Folder(), num_replicas=1, rank=0, seed=0)
    cfg = cfg_for("otface", otface=edict(feature="embedding"), sampler=sampler, num_image=80, num_classes=40)
    assert build_sampler(cfg)(_Folder(), num_replicas=1, rank=0, seed=0).index.num_identities == 40


def test_num_classes_check_names_the_rec(tmp_path):
    from otface_plugin.data.rec_builder import build_rec
    from helpers import make_faces

    build_rec(make_faces(tmp_path / "faces", 12, 2), f"{tmp_path / 'rec'}/", resize=None)

    class RecLike(torch.utils.data.Dataset):  # MXFaceDataset's root_dir
        root_dir = str(tmp_path / "rec")

    cfg = cfg_for(None, sampler="pk", num_image=24, num_classes=5)
    rec = tmp_path / "rec" / "train.rec"
    before = rec.read_bytes()
    with pytest.raises(ConfigError, match=f"{re.escape(str(rec))} holds 12 identities with labels 0..11"):
        build_sampler(cfg)(RecLike(), num_replicas=1, rank=0, seed=0)
    assert rec.read_bytes() == before


def test_num_classes_is_not_read_without_the_plugin_sampler():
    """Upstream's DistributedSampler reads no label before training: a job without the plugin's
    sampler is left exactly as upstream runs it."""
    assert build_sampler(cfg_for(None, num_classes=10)) is None
    assert build_sampler(cfg_for("otface", sampler="distributed", num_classes=10)) is None


def test_config_errors_end_the_recipe_process_in_one_line(tmp_path):
    """train_v2.py calls prepare_config first; a ConfigError raised later (here: the sampler's
    label range) ends the process with one line on stderr, not a traceback."""
    script = tmp_path / "job.py"
    script.write_text(
        "import torch\n"
        "from easydict import EasyDict as edict\n"
        "from otface_plugin.arcface_torch import build_sampler, prepare_config\n"
        "class Folder(torch.utils.data.Dataset):\n"
        "    targets = [i // 2 for i in range(80)]\n"
        "    def __len__(self): return 80\n"
        "cfg = prepare_config(edict(margin_list=(1.0, 0.5, 0.0), batch_size=8, dali=False, num_image=80, "
        "num_classes=10, loss='otface', otface={'feature': 'embedding'}))\n"
        "build_sampler(cfg)(Folder(), num_replicas=1, rank=0, seed=0)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": pythonpath()})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "otface-plugin: bad config: key 'num_classes' is 10, but the Folder dataset holds 40 identities with labels "
        "0..39: set num_classes to at least 40 (PartialFC_V2 has a class for labels 0..num_classes-1 only)"]


def test_yaml_errors_end_the_recipe_process_in_one_line(tmp_path):
    """train_v2.py's get_config loads a YAML job before prepare_config: a wrong value there is one
    line too, not a traceback on every rank."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "job.yaml").write_text("loss: otface\nnum_classes: null\n")
    script = tmp_path / "job.py"
    script.write_text(
        "from easydict import EasyDict as edict\n"
        "from otface_plugin.arcface_torch.config import load_yaml_config\n"
        "load_yaml_config('configs/job.yaml', edict(num_classes=10, output=None))\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": pythonpath()})
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("otface-plugin: bad config: configs/job.yaml: key 'num_classes'"), lines


def test_pk_sampler_factory_gives_p_by_k_batches():
    class FolderLike(torch.utils.data.Dataset):
        targets = [i // 6 for i in range(48)]  # 8 identities x 6 images

        def __len__(self):
            return len(self.targets)

    cfg = cfg_for("otface", num_instances=4, num_image=48)
    make = build_sampler(cfg)
    sampler = make(FolderLike(), num_replicas=2, rank=0, seed=3)
    sampler.set_epoch(0)
    positions = list(sampler)
    assert len(positions) % 8 == 0 and positions
    for b in range(0, len(positions), 8):
        ids = [FolderLike.targets[i] for i in positions[b:b + 8]]
        assert sorted(np.bincount(ids)[np.bincount(ids) > 0]) == [4, 4]


def test_synthetic_dataset_cannot_be_pk_sampled():
    class SyntheticDataset(torch.utils.data.Dataset):
        def __len__(self):
            return 10

    with pytest.raises(ValueError, match="synthetic"):
        identity_index(SyntheticDataset())


def test_tv_compat_matches_the_torchvision_arithmetic():
    img = np.random.RandomState(0).randint(0, 256, size=(6, 5, 3), dtype=np.uint8)
    t = transforms.Compose([transforms.ToPILImage(), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                            transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])])
    torch.manual_seed(1)
    flip = bool(torch.rand(1) < 0.5)
    torch.manual_seed(1)
    out = t(img)
    ref = torch.from_numpy(img[:, ::-1].copy() if flip else img).permute(2, 0, 1).float().div(255)
    ref = (ref - 0.5) / 0.5
    assert out.dtype == torch.float32 and out.shape == (3, 6, 5)
    assert torch.equal(out, ref)
    assert torch.rand(1).item() == _second_draw(1)  # exactly one random draw, like torchvision's flip


def _second_draw(seed):
    g = torch.Generator().manual_seed(seed)
    torch.rand(1, generator=g)
    return torch.rand(1, generator=g).item()
