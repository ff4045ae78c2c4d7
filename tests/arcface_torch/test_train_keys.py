"""The config keys for fine-tuning and precision: checked when the config is loaded."""
import pytest
from easydict import EasyDict

from otface_plugin.arcface_torch.config import ConfigError, check_job, prepare_config


def job(**keys):
    return EasyDict({"batch_size": 16, "fp16": False, **keys})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_other_than_fp16_beside_fp16_true_is_an_error(precision):
    with pytest.raises(ConfigError, match=f"key 'precision' is '{precision}' but 'fp16' is true"):
        prepare_config(job(precision=precision, fp16=True))


def test_precision_fp16_is_fp16_true_and_bf16_keeps_fp16_false():
    assert prepare_config(job(precision="fp16")).fp16 is True
    cfg = prepare_config(job(precision="bf16"))
    assert cfg.fp16 is False and cfg.precision == "bf16"
    assert "precision" not in prepare_config(job())  # unset: the config is upstream's


def test_unknown_precision_is_an_error_naming_the_choices():
    with pytest.raises(ConfigError, match="key 'precision' must be one of fp32, fp16, bf16, got 'fp8'"):
        prepare_config(job(precision="fp8"))
    with pytest.raises(ConfigError, match="key 'precision' must be"):
        check_job({"precision": 16})


def test_init_files_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=f"key 'init_backbone': no such file {tmp_path / 'model.pt'}"):
        prepare_config(job(init_backbone=str(tmp_path / "model.pt")))
    (tmp_path / "model.pt").write_bytes(b"")
    assert prepare_config(job(init_backbone=str(tmp_path / "model.pt"))).init_backbone.endswith("model.pt")
    with pytest.raises(ConfigError, match="key 'init_class_centres': no such file"):
        prepare_config(job(init_class_centres=str(tmp_path / "merged.pt")))


def test_fp16_checkpoints_carry_the_grad_scaler_and_older_ones_still_load(tmp_path):
    import torch

    from otface_plugin.arcface_torch import hooks

    cfg = EasyDict({"batch_size": 16, "fp16": True, "resume": True, "output": str(tmp_path)})
    saved = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=100)
    ckpt = hooks.checkpoint_extras({"epoch": 1}, cfg, 2, saved)
    assert ckpt["otface_ckpt"]["precision"] == "fp16" and ckpt["state_grad_scaler"]["scale"] == 1024.0
    torch.save(ckpt, tmp_path / "checkpoint_gpu_0.pt")
    fresh = torch.amp.GradScaler("cpu", growth_interval=100)
    hooks.restore_grad_scaler(cfg, 1, fresh)  # rank 1 of a 2-rank set with only rank 0's file here
    assert fresh.get_scale() == 1024.0
    del ckpt["state_grad_scaler"]  # saved by upstream: no scaler state, the scaler starts afresh
    torch.save(ckpt, tmp_path / "checkpoint_gpu_0.pt")
    older = torch.amp.GradScaler("cpu", growth_interval=100)
    hooks.restore_grad_scaler(cfg, 0, older)
    assert older.get_scale() == 65536.0
    assert "state_grad_scaler" not in hooks.checkpoint_extras({}, EasyDict({"batch_size": 16, "fp16": False}), 1, saved)
