"""otface-bench's route switch, the recipe route's job config, and (with ARCFACE_TORCH_DIR and a
training interpreter that has the recipe's dependencies) a toy study through train_v2.py."""
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
from conftest import NO_UPSTREAM, UPSTREAM

from otface_plugin.bench import recipe
from otface_plugin.bench.cli import build_parser, config_from_args
from otface_plugin.bench.study import StudyConfig, run_key
from otface_plugin.bench.spec import RunSpec, TrainConfig



def test_auto_route_is_plugin_without_arcface_torch_dir(monkeypatch):
    monkeypatch.delenv("ARCFACE_TORCH_DIR", raising=False)
    assert recipe.resolve_route("auto") == "plugin"
    assert config_from_args(build_parser().parse_args(["/x"])).route == "plugin"
    assert config_from_args(build_parser().parse_args(["/x", "--route", "recipe"])).route == "recipe"
    monkeypatch.setenv("ARCFACE_TORCH_DIR", "/somewhere")
    assert config_from_args(build_parser().parse_args(["/x"])).route == "recipe"
    assert config_from_args(build_parser().parse_args(["/x", "--route", "plugin"])).route == "plugin"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["/x", "--route", "bogus"])


def test_run_key_depends_on_route_and_on_network_only_for_the_recipe():
    from otface_plugin.bench.data import Prepared

    prep = Prepared(Path("r"), Path("b"), ["a", "b"], ["c", "d"], 2, 8)
    spec = RunSpec("arcface", 0)
    plugin = StudyConfig(dataset="d")
    rec = StudyConfig(dataset="d", route="recipe")
    assert run_key(plugin, prep, spec) != run_key(rec, prep, spec)
    assert plugin.runs_dir != rec.runs_dir
    assert run_key(StudyConfig(dataset="d", network="r50"), prep, spec) == run_key(plugin, prep, spec)
    assert run_key(StudyConfig(dataset="d", route="recipe", network="r50"), prep, spec) != run_key(rec, prep, spec)


def test_job_config_keys(tmp_path):
    train = TrainConfig(steps=600, P=8, K=4)
    spec = RunSpec("otface", 3, "lambda=0.3", {"lambda_ot": 0.3})
    cfg = recipe.job_config(spec, train, tmp_path / "rec", 18, tmp_path / "out", "mbf")
    for key in ("network", "rec", "num_classes", "num_image", "num_epoch", "warmup_epoch", "batch_size",
                "sampler", "num_instances", "loss", "seed", "output", "verbose", "val_targets", "otface"):
        assert key in cfg, key
    assert cfg["batch_size"] == 32 and cfg["sampler"] == "pk" and cfg["num_instances"] == 4
    assert cfg["num_image"] // cfg["batch_size"] * cfg["num_epoch"] == 600  # train_v2's total_step
    assert cfg["warmup_epoch"] == 1  # 5% of 20 epochs
    assert cfg["seed"] == 3 and cfg["num_classes"] == 18 and cfg["loss"] == "otface"
    assert cfg["otface"]["lambda_ot"] == 0.3 and "layer" not in cfg["otface"]  # chosen per backbone
    assert cfg["otface"]["warmup_steps"] == 60 and "s" not in cfg["otface"]
    for loss in ("arcface", "cosface"):
        c = recipe.job_config(RunSpec(loss, 0), TrainConfig(steps=30), tmp_path, 4, tmp_path / "o")
        assert c["sampler"] == "pk" and "otface" not in c and c["loss"] == loss
        assert c["num_image"] // c["batch_size"] * c["num_epoch"] == 30
    # the rendered python config is what train_v2.py would load, and the plugin accepts it
    pytest.importorskip("easydict")
    from otface_plugin.arcface_torch.config import check_job, prepare_config

    path = tmp_path / "job.py"
    path.write_text(recipe.render_config(cfg))
    loaded = runpy.run_path(str(path))["config"]
    assert dict(loaded) == cfg
    check_job(loaded)
    assert prepare_config(loaded).sampler == "pk"


def test_parse_log():
    log = ("Training: 2026-01-01 00:00:10,000-Speed 1 samples/sec   Loss 5.0000   LearningRate 0.1   "
           "Epoch: 0   Global Step: 10   Required: 0 hours\n"
           "Training: 2026-01-01 00:00:10,000-OTFace   Global Step: 10   Loss 4.0   Margin 3.9   OT 0.5   "
           "Lambda 0.1000   HardTriplets 7   W(a,p) 0.7   W(a,n) 0.6\n"
           "Training: 2026-01-01 00:00:15,000-Speed 1 samples/sec   Loss 3.0000   LearningRate 0.05   "
           "Epoch: 0   Global Step: 15   Required: 0 hours\n")
    p = recipe.parse_log(log, True)
    assert p["history"]["step"] == [10, 15] and p["history"]["loss"] == [5.0, 3.0]
    assert p["history"]["triplets"][0] == 7 and np.isnan(p["history"]["ot"][1])
    assert p["ms_per_step"] == [1000.0]


@pytest.fixture(scope="module")
def ready():
    if UPSTREAM is None:
        pytest.skip(NO_UPSTREAM)
    missing = recipe.missing_deps()
    if missing:
        pytest.skip(f"{recipe.train_python()} lacks what train_v2.py needs ({missing}); "
                    "set OTFACE_TRAIN_PYTHON to the training environment's python")


@pytest.mark.slow
@pytest.mark.upstream
def test_toy_study_through_the_recipe(ready, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ARCFACE_TORCH_DIR", str(UPSTREAM))  # the shared export is read-only: bench copies it
    pytest.importorskip("matplotlib", reason="otface-bench plots need matplotlib (pip install .[bench])")
    from otface_plugin.bench.cli import main
    from otface_plugin.bench.data import default_dataset_dir

    dataset = default_dataset_dir()
    if not (dataset.is_dir() and sum(p.is_dir() for p in dataset.iterdir()) >= 12):
        pytest.skip(f"face images not found at {dataset} (set OTFACE_SHARED_DATA)")
    out = tmp_path / "results"
    args = [str(dataset), "--toy", "--route", "recipe", "--out", str(out), "--no-progress", "--no-ablation",
            "--losses", "arcface,otface", "--steps", "20", "--pairs", "80"]
    before = sorted(p.name for p in UPSTREAM.iterdir())
    assert main(args) == 0
    assert sorted(p.name for p in UPSTREAM.iterdir()) == before  # the checkout is untouched

    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"meta", "summary", "paired", "ablation", "sampler_comparison", "ot_activity", "runs"}
    meta = res["meta"]
    assert meta["route"].startswith("recipe") and meta["network"] == "mbf"
    assert meta["runs_trained_this_invocation"] == 2
    assert set(res["paired"]) == {"otface-arcface"}
    for loss in ("arcface", "otface"):
        s = res["summary"][loss]
        for m in ("accuracy", "tar@far=0.01", "hard_accuracy_same_seed"):
            assert 0.0 <= s[m]["mean"] <= 1.0 and s[m]["n"] == 1
        assert s["ms_per_step_median"]["mean"] > 0
    for name, r in res["runs"].items():
        h = r["history"]
        assert h["step"] == [10, 15, 20] and len(h["loss"]) == 3 and all(np.isfinite(h["loss"]))
        if r["loss"] == "otface":
            assert all(v >= 0 for v in h["ot"]) and all(0 <= t <= 16 for t in h["triplets"])
        run = out / "_work" / "runs_recipe" / name
        assert (run / "recipe_out" / "model.pt").is_file() and (run / "job_config.py").is_file()
    assert "OTFace" in (out / "_work" / "runs_recipe" / "otface-default-s0" / "recipe_out" / "training.log").read_text()
    for png in ("training.png", "roc.png", "similarity_hist.png"):
        assert (out / png).is_file(), png
    report = (out / "REPORT.md").read_text()
    assert "| route | recipe" in report and "train_v2.py" in report

    # resume: nothing retrained
    capsys.readouterr()
    assert main(args) == 0
    assert "2 already finished, 0 to train" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["summary"] == res["summary"]
