"""YAML job configs and the checks of the plugin's config keys (no upstream checkout needed)."""
import copy

import pytest
import yaml
from easydict import EasyDict as edict

from otface_plugin.arcface_torch.config import ConfigError, check_job, load_yaml_config, prepare_config
from otface_plugin.registry import UnknownLossError

from conftest import REPO


def base_config():
    """What the recipe's configs/base.py defines (the subset the checks look at)."""
    c = edict()
    c.margin_list = (1.0, 0.5, 0.0)
    c.network = "r50"
    c.output = "ms1mv3_arcface_r50"
    c.embedding_size = 512
    c.sample_rate = 1
    c.fp16 = False
    c.batch_size = 128
    c.optimizer = "sgd"
    c.lr = 0.1
    c.dali = False
    c.seed = 2048
    return c


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / "configs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


def test_yaml_merges_over_base_like_a_python_config(tmp_path):
    path = write(tmp_path, "network: r100\nbatch_size: 64\nmargin_list: [1.0, 0.0, 0.4]\nsample_rate: 0.3\n"
                           "output: null\nval_targets: [lfw]\n")
    cfg = load_yaml_config(path, base_config())
    assert cfg.network == "r100" and cfg.batch_size == 64 and cfg.sample_rate == 0.3
    assert cfg.margin_list == (1.0, 0.0, 0.4)  # a tuple, as in the python configs
    assert cfg.lr == 0.1  # untouched base value
    assert cfg.output == "work_dirs/job"  # like utils_config.get_config


def test_yaml_otface_block_becomes_attribute_access(tmp_path):
    path = write(tmp_path, "loss: otface\notface:\n  lambda_ot: 0.2\n  eps: 0.1\n  layer: conv_sep\n")
    cfg = load_yaml_config(path, base_config())
    assert cfg.otface.lambda_ot == 0.2 and cfg.otface.layer == "conv_sep"


@pytest.mark.parametrize("text, key", [
    ("lerning_rate: 0.1\n", "lerning_rate"),
    ("batch_size: '128'\n", "batch_size"),
    ("batch_size: 12.5\n", "batch_size"),
    ("fp16: 1\n", "fp16"),
    ("lr: true\n", "lr"),
    ("margin_list: [1.0, 0.5]\n", "margin_list"),
    ("val_targets: lfw\n", "val_targets"),
    ("loss: otface\notface:\n  epss: 0.1\n", "otface.epss"),
    ("loss: otface\notface:\n  eps: fast\n", "otface.eps"),
    ("loss: otface\notface:\n  iters: 2.5\n", "otface.iters"),
    ("loss: otface\notface:\n  layer: 4\n", "otface.layer"),
    ("loss: otface\notface:\n  s: 32\n", "otface.s"),
    ("loss: otface\notface: [1, 2]\n", "otface"),
])
def test_unknown_keys_and_wrong_types_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_yaml_config(write(tmp_path, text), base_config())


def test_out_of_range_otface_value_is_reported_by_the_loss(tmp_path):
    with pytest.raises(ConfigError, match="eps"):
        load_yaml_config(write(tmp_path, "loss: otface\notface:\n  eps: -1.0\n"), base_config())


def test_typo_suggests_the_key():
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        check_job({"batchsize": 4})


def test_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml_config(write(tmp_path, "- a\n- b\n"), base_config())


def test_unset_loss_leaves_the_config_untouched():
    cfg = base_config()
    before = copy.deepcopy(dict(cfg))
    assert dict(prepare_config(cfg)) == before


def test_arcface_keeps_upstream_margins_and_sampler():
    cfg = base_config()
    cfg.loss = "arcface"
    prepare_config(cfg)
    assert cfg.margin_list == (1.0, 0.5, 0.0) and cfg.sampler == "distributed"


def test_cosface_maps_to_combined_margin():
    cfg = base_config()
    cfg.loss = "CosFace"
    prepare_config(cfg)
    assert cfg.loss == "cosface" and cfg.margin_list == (1.0, 0.0, 0.4)
    cfg2 = base_config()
    cfg2.loss, cfg2.margin_list = "cosface", (1.0, 0.0, 0.35)  # own CosFace margin is kept
    assert prepare_config(cfg2).margin_list == (1.0, 0.0, 0.35)


def test_otface_defaults_to_pk_sampler_and_checks_k():
    cfg = base_config()
    cfg.loss = "otface"
    prepare_config(cfg)
    assert cfg.sampler == "pk" and cfg.num_instances == 4 and cfg.otface == {}
    bad = base_config()
    bad.loss, bad.batch_size, bad.num_instances = "otface", 10, 4
    with pytest.raises(ConfigError, match="multiple of num_instances"):
        prepare_config(bad)
    dali = base_config()
    dali.loss, dali.dali = "otface", True
    with pytest.raises(ConfigError, match="dali"):
        prepare_config(dali)


def test_otface_cosface_margin():
    cfg = base_config()
    cfg.loss, cfg.otface = "otface", edict(margin="cosface")
    assert prepare_config(cfg).margin_list == (1.0, 0.0, 0.4)


def test_unknown_loss_is_the_registrys_error():
    cfg = base_config()
    cfg.loss = "sphereface2"
    with pytest.raises(UnknownLossError, match="registered losses: .*otface"):
        prepare_config(cfg)


def test_otface_options_without_otface_loss_are_an_error():
    cfg = base_config()
    cfg.loss, cfg.otface = "arcface", {"eps": 0.1}
    with pytest.raises(ConfigError, match="otface"):
        prepare_config(cfg)


def test_python_config_otface_block_is_checked_too():
    cfg = base_config()
    cfg.loss, cfg.otface = "otface", {"lamda_ot": 0.1}
    with pytest.raises(ConfigError, match="otface.lamda_ot"):
        prepare_config(cfg)


def test_shipped_yaml_configs_are_valid():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files, "no YAML configs shipped"
    for f in files:
        job = check_job(yaml.safe_load(f.read_text()), where=f.name)
        cfg = base_config()
        cfg.update(job)
        prepare_config(cfg)


def test_shipped_python_configs_match_their_yaml_twins():
    """Each otface python config has a YAML twin with the same settings."""
    import runpy

    for py in sorted((REPO / "configs").glob("*.py")):
        if py.name == "__init__.py":
            continue
        twin = py.with_suffix(".yaml")
        assert twin.exists(), f"{py.name} has no YAML twin"
        from_py = dict(runpy.run_path(str(py))["config"])
        from_yaml = check_job(yaml.safe_load(twin.read_text()), where=twin.name)
        assert {k: _plain(v) for k, v in from_py.items()} == {k: _plain(v) for k, v in from_yaml.items()}, py.name


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# ---- issue 9 case 7: python config types, one identity per batch --------------------------------
@pytest.mark.parametrize("key, value, what", [
    ("batch_size", "16", "an integer, got str '16'"),
    ("lr", "0.1", "a number, got str '0.1'"),
    ("fp16", 1, "true or false, got int 1"),
    ("num_instances", 4.0, "an integer, got float 4.0"),
])
def test_python_config_wrong_type_names_the_key(key, value, what):
    # a python config is not checked on load as YAML is: batch_size = "16" was a bare TypeError
    for loss in (None, "otface"):
        cfg = base_config()
        cfg.loss, cfg[key] = loss, value
        with pytest.raises(ConfigError, match=f"^config: key '{key}' must be {what}$"):
            prepare_config(cfg)


def test_python_config_own_keys_and_null_plugin_keys_are_left_alone():
    cfg = base_config()
    cfg.my_own_key, cfg.otface, cfg.sampler = object(), None, None
    prepare_config(cfg)


@pytest.mark.parametrize("loss", ["otface", "arcface"])
def test_one_identity_per_batch_is_rejected(loss):
    cfg = base_config()
    cfg.loss, cfg.sampler, cfg.batch_size, cfg.num_instances = loss, "pk", 8, 8
    with pytest.raises(ConfigError, match="batch_size 8 equals num_instances 8: every P x K batch would hold one "
                                          "identity.*OT term is always 0"):
        prepare_config(cfg)
    cfg.batch_size = 16
    assert prepare_config(cfg).num_instances == 8


def test_sampler_rejects_one_identity_per_batch():
    import numpy as np

    from otface_plugin.data import IdentityIndex, PKSampler

    index = IdentityIndex.from_labels(np.repeat(np.arange(10), 8))
    with pytest.raises(ValueError, match=r"batch_size \(8\) equals num_instances K: each batch would hold one identity"):
        PKSampler(index, batch_size=8, num_instances=8, num_replicas=1, rank=0)
    assert len(PKSampler(index, batch_size=16, num_instances=8, num_replicas=1, rank=0)) > 0


def test_otface_block_is_validated_once_per_job(tmp_path, monkeypatch):
    # the YAML route checks the job on load and again in prepare_config: the loss is built to check
    # the values once (it was twice, then a third time in build_head), and build_head builds the real one
    import functools

    from otface_plugin.arcface_torch import build_head, config
    from otface_plugin.losses import otface

    built = []
    real = otface.OTFaceLoss.__init__

    @functools.wraps(real)
    def counting(self, *args, **kwargs):
        built.append(kwargs.get("eps"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(otface.OTFaceLoss, "__init__", counting)
    monkeypatch.setattr(config, "_CHECKED_OTFACE", type(config._CHECKED_OTFACE)())
    path = write(tmp_path, "loss: otface\notface: {eps: 0.04, feature: embedding}\n")
    cfg = prepare_config(load_yaml_config(path, base_config()))
    assert built == [0.04]
    build_head(cfg, lambda e, l: e.sum(), None)
    assert built == [0.04, 0.04]
    # a python config: checked once in prepare_config
    prepare_config(edict(base_config(), loss="otface", otface={"eps": 0.03, "feature": "embedding"}))
    assert built == [0.04, 0.04, 0.03]
    # a bad value is an error every time (only blocks that passed are remembered)
    for _ in range(2):
        with pytest.raises(ConfigError, match="eps"):
            prepare_config(edict(base_config(), loss="otface", otface={"eps": -1.0}))
