"""Loss registry: decorator, build, errors, and entry-point discovery."""
import sys
import textwrap

import pytest
import torch

import otface_plugin.registry as registry
from otface_plugin import available_losses, build_loss, register_loss
from otface_plugin.losses import ArcFaceMargin, CosFaceMargin, MarginSoftmaxLoss, OTFaceLoss


def test_builtins_registered():
    assert {"arcface", "cosface", "combined", "otface"} <= set(available_losses())
    arc = build_loss("arcface", num_classes=5, embedding_size=8, margin=0.3)
    assert isinstance(arc, MarginSoftmaxLoss) and isinstance(arc.margin, ArcFaceMargin) and arc.margin.m2 == 0.3
    cos = build_loss("CosFace", num_classes=5, embedding_size=8)  # case-insensitive
    assert isinstance(cos.margin, CosFaceMargin) and cos.margin.m3 == 0.4
    assert set(arc.state_dict()) == {"weight"}  # the checkpoint key of the combined margin's loss
    with pytest.raises(TypeError, match="unknown option.*'cosface': grad; accepted options: num_classes, "
                                        "embedding_size, s, margin, interclass_filtering_threshold"):
        build_loss("cosface", num_classes=5, grad="exact")
    loss = build_loss("otface", num_classes=5, embedding_size=8, lambda_ot=0.3, eps=0.1)
    assert isinstance(loss, OTFaceLoss) and loss.lambda_ot == 0.3 and loss.ot_term.eps == 0.1


def test_unknown_name_lists_registered():
    with pytest.raises(KeyError) as err:
        build_loss("otfaec")
    assert "otfaec" in str(err.value) and "arcface" in str(err.value) and "otface" in str(err.value)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="lamda_ot") as err:
        build_loss("otface", num_classes=5, lamda_ot=0.1)
    assert "lambda_ot" in str(err.value)  # the accepted ones are listed


def test_register_custom_and_duplicate(monkeypatch):
    monkeypatch.setitem(registry._ENTRIES, "loss", dict(registry._ENTRIES["loss"]))

    @register_loss("my_loss")
    def my_loss(scale: float = 1.0):
        return torch.nn.Identity()

    assert "my_loss" in available_losses()
    assert isinstance(build_loss("my_loss", scale=2.0), torch.nn.Identity)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("my_loss")(lambda: None)


def _fake_distribution(tmp_path, name, target):
    pkg = tmp_path / f"{name}_pkg.py"
    pkg.write_text(textwrap.dedent(f"""
        import torch
        class {name.title()}Loss(torch.nn.Module):
            def __init__(self, alpha: float = 1.0):
                super().__init__()
                self.alpha = alpha
    """))
    dist = tmp_path / f"{name}_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[otface_plugin.losses]\n{name} = {target}\n")


def test_entry_point_discovery(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "extra", "extra_pkg:ExtraLoss")
    _fake_distribution(tmp_path, "broken", "broken_pkg:DoesNotExist")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry._ENTRIES, "loss", dict(registry._ENTRIES["loss"]))
    monkeypatch.setattr(registry, "_BROKEN", {})
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    with pytest.warns(RuntimeWarning, match="broken"):
        names = available_losses()
    assert "extra" in names and "otface" in names
    assert build_loss("extra", alpha=3.0).alpha == 3.0
    with pytest.raises(TypeError, match="beta"):
        build_loss("extra", beta=1)
    with pytest.raises(ImportError, match="DoesNotExist"):
        build_loss("broken")
    sys.modules.pop("extra_pkg", None)


def test_config_loss_names_get_the_registry_error():
    from easydict import EasyDict

    from otface_plugin.arcface_torch.config import ConfigError, prepare_config
    from otface_plugin.registry import UnknownLossError, registered_name

    assert registered_name("  OTFace ") == "otface"
    with pytest.raises(UnknownLossError) as from_registry:
        registered_name("arcfce")
    with pytest.raises(UnknownLossError) as from_config:
        prepare_config(EasyDict(loss="arcfce", batch_size=8))
    assert str(from_config.value) == str(from_registry.value)
    with pytest.raises(ConfigError, match="key 'loss' must be a loss name"):
        prepare_config(EasyDict(loss=" ", batch_size=8))


def test_one_registry_with_kinds():
    from otface_plugin.losses import HEADS, AdaFaceMargin, build_margin

    assert set(registry.KINDS) == {"loss", "head"}
    heads = registry.entries("head")
    assert heads["adaface"] is AdaFaceMargin and HEADS["adaface"] is AdaFaceMargin
    assert set(heads) <= set(available_losses())  # each head also registers its standalone loss
    with pytest.raises(TypeError):  # read-only: registration goes through the decorator
        heads["mine"] = AdaFaceMargin
    with pytest.raises(registry.UnknownNameError, match="unknown head 'adafce'; registered heads: .*adaface"):
        build_margin("adafce")
    with pytest.raises(ValueError):  # what build_margin raised before the registries were one
        build_margin("adafce")
    with pytest.raises(TypeError, match="unknown option.*head 'adaface': mm; accepted options: .*m"):
        build_margin("adaface", mm=0.1)
    with pytest.raises(ValueError, match="unknown registry kind 'model'"):
        registry.register("model", "x")
    with pytest.raises(ValueError, match="head 'adaface' is already registered"):
        registry.register("head", "adaface")(type("Other", (), {}))


def test_heads_registered_from_outside_reach_every_lookup(monkeypatch):
    from otface_plugin.losses.head import MarginHead, register_head

    monkeypatch.setitem(registry._ENTRIES, "loss", dict(registry._ENTRIES["loss"]))
    head_table = registry._ENTRIES["head"]
    monkeypatch.setattr(registry, "_ENTRIES", {**registry._ENTRIES})  # restore the table objects after
    before = dict(head_table)

    @register_head("plain_scale")
    class PlainScale(MarginHead):
        def __init__(self, s: float = 8.0) -> None:
            super().__init__()
            self.s = s

        def forward(self, cosine, labels):
            return cosine * self.s

    try:
        from otface_plugin.losses import HEADS

        assert HEADS["plain_scale"] is PlainScale  # the live view sees it
        loss = build_loss("plain_scale", num_classes=4, embedding_size=3, s=2.0)
        assert loss.margin.s == 2.0
        value = loss(torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0]))
        assert torch.isfinite(value)
    finally:
        head_table.clear()
        head_table.update(before)
