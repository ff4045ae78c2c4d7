"""The config keys for fine-tuning: checked when the config is loaded."""
import pytest
from easydict import EasyDict

from otface_plugin.arcface_torch.config import ConfigError, prepare_config


def job(**keys):
    return EasyDict({"batch_size": 16, "fp16": False, **keys})


def test_init_files_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=f"key 'init_backbone': no such file {tmp_path / 'model.pt'}"):
        prepare_config(job(init_backbone=str(tmp_path / "model.pt")))
    (tmp_path / "model.pt").write_bytes(b"")
    assert prepare_config(job(init_backbone=str(tmp_path / "model.pt"))).init_backbone.endswith("model.pt")
    with pytest.raises(ConfigError, match="key 'init_class_centres': no such file"):
        prepare_config(job(init_class_centres=str(tmp_path / "merged.pt")))
