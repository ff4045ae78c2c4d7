"""Every upstream backbone with `loss: otface` and no `otface:` block: the feature layer is chosen
per backbone, the OT term takes conv maps and ViT token sets, checkpointed ViTs keep working,
and options the recipe cannot serve are refused when the config is loaded.

The backbone tests build the pinned recipe's own `backbones.get_model` (ARCFACE_TORCH_DIR or the
shared export, see conftest.py; a copy is imported, nothing is patched) on the CPU; the ViTs
need `timm` (run them with the training interpreter, /work/tvenv or `.ci/recipe_env.sh`).
"""
import importlib.util
import logging
import runpy
import sys
import types

import pytest
import torch

from conftest import UPSTREAM, copy_upstream, needs_upstream
from otface_plugin.arcface_torch import build_head, log_components, prepare_config
from otface_plugin.arcface_torch.config import ConfigError, load_yaml_config
from otface_plugin.arcface_torch.feature_layers import FEATURE_LAYERS, UnknownBackboneError, default_layer
from otface_plugin.features import FeatureCapture
from otface_plugin.losses import OTFaceLoss
from otface_plugin.losses.margin import MarginSoftmaxLoss

HAS_TIMM = importlib.util.find_spec("timm") is not None
NO_TIMM = "the recipe's ViT backbones import timm, which this interpreter lacks (use the training interpreter)"

# network -> (layer chosen, captured shape for 8 images at 112 x 112 in training mode)
EXPECTED = {
    "r18": ("layer4", (8, 512, 7, 7)),
    "r50": ("layer4", (8, 512, 7, 7)),
    "r100": ("layer4", (8, 512, 7, 7)),
    "mbf": ("conv_sep", (8, 512, 7, 7)),
    "mbf_large": ("conv_sep", (8, 512, 7, 7)),
    "vit_t": ("norm", (8, 129, 256)),  # 129 of 144 patch tokens kept by the random masking (0.1)
    "vit_s": ("norm", (8, 129, 512)),
}
SLOW = {"r18", "r50", "r100", "mbf_large", "vit_t", "vit_s"}  # over a few seconds on a 2-core CPU


def _param(net):
    marks = []
    if net in SLOW:
        marks.append(pytest.mark.slow)
    if net.startswith("vit"):
        marks.append(pytest.mark.skipif(not HAS_TIMM, reason=NO_TIMM))
    return pytest.param(net, marks=marks, id=net)


@pytest.fixture(scope="module")
def recipe_backbones(tmp_path_factory):
    """The pinned recipe's `backbones` package, imported under another name from a copy (the
    pristine recipe is never written to, not even __pycache__)."""
    root = copy_upstream(tmp_path_factory.mktemp("recipe") / "arcface_torch")
    init = root / "backbones" / "__init__.py"
    spec = importlib.util.spec_from_file_location("recipe_backbones", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    for name in [n for n in sys.modules if n == spec.name or n.startswith(spec.name + ".")]:
        del sys.modules[name]


def recipe_job(tmp_path, network, extra=""):
    """A YAML job with only `loss: otface` (no otface block) over the recipe's configs/base.py."""
    pytest.importorskip("easydict")
    base = runpy.run_path(str(UPSTREAM / "configs" / "base.py"))["config"]
    path = tmp_path / "configs" / f"{network}_otface.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"loss: otface\nnetwork: {network}\nbatch_size: 8\nnum_classes: 2\n{extra}")
    return prepare_config(load_yaml_config(str(path), base))


BATCH_LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])  # 2 identities x 4 images


@pytest.mark.upstream
@needs_upstream
@pytest.mark.parametrize("network", [_param(n) for n in EXPECTED])
def test_recipe_backbone_trains_with_default_feature_layer(network, tmp_path, recipe_backbones):
    torch.manual_seed(0)
    cfg = recipe_job(tmp_path, network)
    assert "layer" not in cfg.otface
    net = recipe_backbones.get_model(cfg.network, dropout=0.0, fp16=cfg.fp16, num_features=cfg.embedding_size)
    net.train()
    head = build_head(cfg, MarginSoftmaxLoss(cfg.num_classes, cfg.embedding_size), net)
    layer, shape = EXPECTED[network]
    assert head.capture.layer == layer == default_layer(net)

    embeddings = net(torch.randn(8, 3, 112, 112))
    assert tuple(head.capture._output.shape) == shape
    loss = head(embeddings, BATCH_LABELS.view(-1, 1))
    c = head.components()
    assert torch.isfinite(loss) and c["triplets"] > 0, c
    assert c["w_ap"] > 0 and c["w_an"] > 0 and c["ot"] == c["ot"]
    loss.backward()
    grads = [p.grad for p in net.get_submodule(layer).parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    print(f"{network}: {layer} {shape[1:]} -> {shape[1] if len(shape) == 3 else shape[2] * shape[3]} "
          f"descriptors, triplets {int(c['triplets'])}, loss {c['loss']:.3f}, OT {c['ot']:.4f}")


@pytest.mark.upstream
@needs_upstream
@pytest.mark.slow
@pytest.mark.skipif(not HAS_TIMM, reason=NO_TIMM)
def test_vit_with_gradient_checkpointing(tmp_path, recipe_backbones):
    """`using_checkpoint` (vit_b, vit_l, vit_h) runs the blocks under torch's (reentrant)
    checkpoint: the `norm` tokens lie outside it and carry the OT term's gradient into every
    block; a layer inside a checkpointed block is refused with a message, not trained without
    gradient."""
    torch.manual_seed(0)
    cfg = recipe_job(tmp_path, "vit_t")
    net = recipe_backbones.get_model("vit_t", num_features=512)
    net.using_checkpoint = True
    net.train()
    head = build_head(cfg, MarginSoftmaxLoss(2, 512), net)
    embeddings = net(torch.randn(8, 3, 112, 112))
    features = head.capture.pop()
    ot = head.loss.ot_term(embeddings, BATCH_LABELS, features)
    assert head.loss.ot_term.components()["triplets"] > 0
    ot.backward()
    for block in (net.blocks[0], net.blocks[-1]):
        g = block.mlp.fc1.weight.grad
        assert g is not None and g.abs().sum() > 0

    # a checkpointed block's own output is the checkpoint's output: it has a gradient
    block = FeatureCapture(net, "blocks.11")
    inside = FeatureCapture(net, "blocks.11.mlp")  # runs without autograd inside the checkpoint
    net(torch.randn(8, 3, 112, 112))
    assert block.pop().requires_grad
    with pytest.raises(RuntimeError, match="blocks.11.mlp.*checkpoint"):
        inside.pop()


class OwnNet(torch.nn.Module):
    """A user's own backbone: not one the plugin knows."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.stage2 = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, stride=4, padding=1), torch.nn.BatchNorm2d(16))
        self.fc = torch.nn.Linear(16 * 7 * 7, 32)

    def forward(self, x):
        return self.fc(torch.flatten(self.stage2(torch.relu(self.stem(x))), 1))


def plain_cfg(**otface):
    pytest.importorskip("easydict")
    from easydict import EasyDict as edict

    c = edict(margin_list=(1.0, 0.5, 0.0), batch_size=8, dali=False, num_image=64, frequent=1, fp16=False,
              loss="otface")
    if otface:
        c.otface = otface
    return prepare_config(c)


def test_unknown_backbone_names_the_option_and_the_candidates():
    net = OwnNet().train()
    with pytest.raises(UnknownBackboneError) as info:
        build_head(plain_cfg(), MarginSoftmaxLoss(4, 32), net)
    msg = str(info.value)
    assert "OwnNet" in msg and "otface.layer" in msg and "otface.feature: embedding" in msg
    assert "'stage2' (2, 16, 7, 7)" in msg and "'stem' (2, 8, 28, 28)" in msg
    assert net.training and net.stage2[1].training  # the probe left the modes as they were
    assert net.stage2[1].num_batches_tracked.item() == 0  # and ran in eval mode: no BN update

    head = build_head(plain_cfg(layer="stage2"), MarginSoftmaxLoss(4, 32), net)  # the override
    assert head.capture.layer == "stage2"
    assert build_head(plain_cfg(feature="embedding"), MarginSoftmaxLoss(4, 32), net).capture is None


def test_missing_layer_lists_candidates():
    with pytest.raises(ValueError, match=r"no submodule 'layer4'.*'stage2' \(2, 16, 7, 7\)"):
        FeatureCapture(OwnNet(), "layer4")


def test_mapping_is_by_class_for_every_recipe_network():
    assert FEATURE_LAYERS == {"IResNet": "layer4", "MobileFaceNet": "conv_sep", "VisionTransformer": "norm"}

    class DDPLike(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    MobileFaceNet = type("MobileFaceNet", (OwnNet,), {})
    assert default_layer(DDPLike(MobileFaceNet())) == "conv_sep"


@pytest.mark.parametrize("shape", [(8, 16, 4, 4), (8, 21, 16)], ids=["map", "tokens"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ot_term_on_half_precision_descriptor_sets(shape, dtype):
    """(B, C, H, W) maps and (B, L, D) token sets in fp16/bf16 under CPU autocast: the OT term
    runs in float32, is finite and sends a finite gradient of the features' dtype back."""
    torch.manual_seed(0)
    loss_fn = OTFaceLoss(num_classes=2, embedding_size=16, lambda_ot=1.0, term_options=dict(triplet_mode="all"))
    feats = torch.randn(*shape).to(dtype).requires_grad_()
    emb = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(emb, BATCH_LABELS, features=feats)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss_fn.components()["triplets"] == 8
    loss.backward()
    assert feats.grad.dtype == dtype and torch.isfinite(feats.grad.float()).all()
    assert feats.grad.float().abs().sum() > 0


def test_token_sets_equal_the_same_descriptors_as_a_map():
    """A (B, C, H, W) map and its (B, H*W, C) token view are the same distributions."""
    torch.manual_seed(1)
    term = OTFaceLoss(num_classes=2, embedding_size=16, term_options=dict(triplet_mode="all")).ot_term
    fmap, emb = torch.randn(8, 16, 3, 3), torch.randn(8, 16)
    tokens = fmap.flatten(2).transpose(1, 2)
    assert torch.allclose(term(emb, BATCH_LABELS, fmap), term(emb, BATCH_LABELS, tokens))
    with pytest.raises(ValueError, match=r"\(B, L, D\) token sets"):
        term(emb, BATCH_LABELS, torch.randn(8, 16))


@pytest.mark.parametrize("where", ["yaml", "python"])
def test_misclassified_mode_refused_when_the_config_is_loaded(tmp_path, where):
    if where == "yaml":
        path = tmp_path / "configs" / "job.yaml"
        path.parent.mkdir()
        path.write_text("loss: otface\notface:\n  triplet_mode: misclassified\n")
        with pytest.raises(ConfigError, match=r"otface.triplet_mode.*PartialFC_V2.*hard or all"):
            load_yaml_config(str(path), {"batch_size": 8})
    else:
        with pytest.raises(ConfigError, match=r"otface.triplet_mode.*PartialFC_V2"):
            plain_cfg(triplet_mode="misclassified")
    assert plain_cfg(triplet_mode="all").otface["triplet_mode"] == "all"


def test_fp16_without_cuda_is_said_plainly(caplog, monkeypatch):
    pytest.importorskip("easydict")
    from easydict import EasyDict as edict

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        prepare_config(edict(batch_size=8, dali=False, fp16=True, loss="otface"))
    assert "fp16: true, but CUDA is not available" in caplog.text and "float32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_config(edict(batch_size=8, dali=False, fp16=False, loss="otface"))
    assert caplog.text == ""


def test_components_go_to_the_recipes_wandb_run(monkeypatch):
    """With using_wandb, train_v2.py has imported wandb and opened a run: the components join it
    under otface/* with their own step axis, without committing (the recipe's step count holds)."""
    calls = []

    class Run:
        def define_metric(self, name, step_metric=None):
            calls.append(("define", name, step_metric))

        def log(self, data, commit=True):
            calls.append(("log", data, commit))

    net = OwnNet()
    head = build_head(plain_cfg(layer="stage2"), MarginSoftmaxLoss(2, 32), net)
    head(net(torch.randn(8, 3, 112, 112)), BATCH_LABELS)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=Run()))
    log_components(head, 3, 1)
    log_components(head, 4, 1)
    defines = [c for c in calls if c[0] == "define"]
    logs = [c for c in calls if c[0] == "log"]
    assert defines == [("define", "otface/global_step", None), ("define", "otface/*", "otface/global_step")]
    assert [c[1]["otface/global_step"] for c in logs] == [3, 4] and all(c[2] is False for c in logs)
    assert set(logs[0][1]) >= {"otface/loss", "otface/margin", "otface/ot", "otface/lambda", "otface/triplets"}
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=None))  # using_wandb off
    log_components(head, 5, 1)
    assert len(calls) == 4


def test_using_wandb_gets_the_notes_key_train_v2_passes_to_wandb():
    """configs/base.py lacks `notes`, which train_v2.py's wandb.init reads: an otface job gets
    notes=None (else upstream prints an error and trains without wandb); other losses are left
    exactly as upstream."""
    pytest.importorskip("easydict")
    from easydict import EasyDict as edict

    assert prepare_config(edict(batch_size=8, dali=False, loss="otface", using_wandb=True)).notes is None
    assert prepare_config(edict(batch_size=8, dali=False, loss="otface", using_wandb=True, notes="x")).notes == "x"
    assert "notes" not in prepare_config(edict(batch_size=8, dali=False, loss="arcface", using_wandb=True))
    assert "notes" not in prepare_config(edict(batch_size=8, dali=False, loss="otface"))


def test_dali_needs_the_distributed_sampler():
    """DALI reads the .rec itself (no torch sampler): `sampler: pk` is refused at start; with
    `sampler: distributed` the job builds, get_dataloader gets no sampler factory and returns
    the DALI iterator, whose batches go through the same head (DALI itself needs CUDA: not run)."""
    pytest.importorskip("easydict")
    from easydict import EasyDict as edict

    from otface_plugin.arcface_torch import build_sampler

    with pytest.raises(ConfigError, match="dali"):
        prepare_config(edict(batch_size=8, dali=True, loss="otface"))
    cfg = prepare_config(edict(batch_size=8, dali=True, loss="otface", sampler="distributed",
                               otface={"layer": "stage2"}))
    assert cfg.sampler == "distributed" and build_sampler(cfg) is None
    net = OwnNet()
    head = build_head(cfg, MarginSoftmaxLoss(2, 32), net)
    labels = BATCH_LABELS.clone()  # DALIWarper's labels: (B,) long, squeezed in place
    loss = head(net(torch.randn(8, 3, 112, 112)), labels)
    assert torch.isfinite(loss) and head.components()["triplets"] > 0
