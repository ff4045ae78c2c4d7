"""Loss registry: decorator, build, errors, and entry-point discovery."""
import sys
import textwrap

import pytest
import torch

import otface_plugin.registry as registry
from otface_plugin import available_losses, build_loss, register_loss
from otface_plugin.losses import ArcFaceLoss, CosFaceLoss, OTFaceLoss


def test_builtins_registered():
    assert {"arcface", "cosface", "combined", "otface"} <= set(available_losses())
    assert isinstance(build_loss("arcface", num_classes=5, embedding_size=8), ArcFaceLoss)
    assert isinstance(build_loss("CosFace", num_classes=5, embedding_size=8), CosFaceLoss)  # case-insensitive
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
    monkeypatch.setattr(registry, "_LOSSES", dict(registry._LOSSES))

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
    monkeypatch.setattr(registry, "_LOSSES", dict(registry._LOSSES))
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
