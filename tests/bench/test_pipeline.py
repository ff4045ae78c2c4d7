"""otface-bench end to end at toy size: split, .rec/.bin, 3 losses + ablation, metrics, plots,
report; then a second call that reuses every finished run.

Uses Extended Yale B at <repo>/../shared/data/extyaleb (or OTFACE_SHARED_DATA) when present,
else a generated identity-folder dataset, so the pipeline is always checked.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from otface_plugin.atomicfile import temp_path
from otface_plugin.bench.cli import main
from otface_plugin.bench.data import default_dataset_dir

pytest.importorskip("matplotlib", reason="otface-bench plots need matplotlib (pip install .[bench])")


def _synthetic_dataset(root: Path, identities: int = 12, images: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for i in range(identities):
        base = rng.uniform(0, 255, (12, 12))
        d = root / f"person{i:02d}"
        d.mkdir(parents=True)
        for j in range(images):
            img = np.kron(base, np.ones((16, 14))) * rng.uniform(0.3, 1.0) + rng.normal(0, 20, (192, 168))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"img{j:02d}.pgm")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    real = default_dataset_dir()
    if real.is_dir() and sum(p.is_dir() for p in real.iterdir()) >= 12:
        return real
    return _synthetic_dataset(tmp_path_factory.mktemp("faces"))


def _is_png(path: Path) -> bool:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200


def meta_sampler(res) -> str:
    from otface_plugin.bench.report import sampler_of

    return sampler_of(res["meta"])


@pytest.mark.slow
def test_toy_pipeline_outputs_and_resume(dataset, tmp_path, capsys):
    out = tmp_path / "results"
    assert main([str(dataset), "--toy", "--route", "plugin", "--out", str(out), "--no-progress"]) == 0

    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"meta", "summary", "paired", "ablation", "sampler_comparison", "ot_activity", "runs"}
    assert res["sampler_comparison"] == {} and meta_sampler(res) == "pk"
    assert set(res["ot_activity"]) == {"otface-default-s0", "otface-lambda=0.3-s0", "otface-feature=embedding-s0"}
    assert all(0 <= a["active_share"] <= 1 for a in res["ot_activity"].values())
    meta = res["meta"]
    assert meta["toy"] and meta["losses"] == ["arcface", "cosface", "otface"]
    split = meta["split"]
    assert not set(split["train_identities"]) & set(split["test_identities"])
    assert meta["runs_trained_this_invocation"] == 5  # 3 losses + 2 ablation variants

    for loss in ("arcface", "cosface", "otface"):
        s = res["summary"][loss]
        for m in ("accuracy", "tar@far=0.01", "tar@far=0.001", "hard_accuracy_same_seed"):
            assert 0.0 <= s[m]["mean"] <= 1.0 and s[m]["n"] == 1
        assert s["ms_per_step_median"]["mean"] > 0
    assert set(res["paired"]) == {"cosface-arcface", "otface-arcface"}
    assert set(res["ablation"]) == {"default", "lambda=0.3", "feature=embedding"}
    for name, r in res["runs"].items():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["tar@far=0.001"] <= r["tar@far=0.01"] <= 1.0
        h = r["history"]
        assert len(h["step"]) == len(h["loss"]) == 7 and all(np.isfinite(h["loss"]))
        if r["loss"] == "otface":
            assert all(v >= 0 for v in h["ot"]) and all(0 <= t <= 16 for t in h["triplets"])
            assert h["lambda"][0] == 0.0 and h["lambda"][-1] == pytest.approx(r["options"].get("lambda_ot", 0.1))
        assert (out / "_work" / "runs" / name / "model.pt").is_file()

    for png in ("training.png", "roc.png", "similarity_hist.png", "ablation.png"):
        assert _is_png(out / png), png
    report = (out / "REPORT.md").read_text()
    assert "| route | plugin minimal loop" in report
    assert f"Finished runs are stored under `{out / '_work' / 'runs'}/`" in report  # where they are, not a fixed path
    for word in ("ArcFace", "CosFace", "OTFace", "TOY RUN", "can and cannot show", "Ablation",
                 "training.png", "roc.png", "similarity_hist.png"):
        assert word in report, word
    assert "OTFace" in (out / "README_table.md").read_text()

    # Second call: nothing is retrained, outputs are rewritten from the stored runs.
    capsys.readouterr()
    assert main([str(dataset), "--toy", "--route", "plugin", "--out", str(out), "--no-progress"]) == 0
    assert "5 already finished, 0 to train" in capsys.readouterr().out
    res2 = json.loads((out / "results.json").read_text())
    assert res2["meta"]["runs_trained_this_invocation"] == 0
    assert res2["summary"] == res["summary"]

    # Third call adds the sampler comparison: the 5 pk runs are reused, only OTFace x hard trains,
    # and it stays out of the loss tables.
    capsys.readouterr()
    assert main([str(dataset), "--toy", "--route", "plugin", "--out", str(out), "--no-progress",
                 "--compare-sampler", "otface"]) == 0
    assert "6 planned, 5 already finished, 1 to train" in capsys.readouterr().out
    res3 = json.loads((out / "results.json").read_text())
    assert res3["summary"] == res["summary"] and res3["paired"] == res["paired"]
    hard = res3["runs"]["otface-default-hard-s0"]
    assert hard["sampler"] == "hard" and not hard["main"] and res3["runs"]["otface-default-s0"]["main"]
    comp = res3["sampler_comparison"]["otface"]
    assert comp["sampler"] == "hard" and comp["baseline"] == "pk" and comp["runs"] == ["otface-default-hard-s0"]
    d = comp["paired"]["accuracy"]
    assert d["n"] == 1 and d["mean"] == pytest.approx(hard["accuracy"] - res3["runs"]["otface-default-s0"]["accuracy"])
    assert "otface-default-hard-s0" in res3["ot_activity"]
    report = (out / "REPORT.md").read_text()
    assert "Sampler comparison" in report and "OTFace hard − pk" in report


@pytest.mark.slow
def test_interrupted_run_is_retrained_cleanly(dataset, tmp_path):
    out = tmp_path / "r"
    args = [str(dataset), "--toy", "--route", "plugin", "--out", str(out), "--no-progress", "--no-ablation", "--losses", "arcface,otface"]
    assert main(args) == 0
    run = out / "_work" / "runs" / "otface-default-s0"
    (run / "result.json").unlink()  # as if killed before the run finished
    temp_path(run / "model.pt").write_bytes(b"partial")
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["runs_trained_this_invocation"] == 1
    assert json.loads((run / "result.json").read_text())["spec"]["loss"] == "otface"


def test_compare_sampler_must_name_main_losses(dataset, tmp_path):
    with pytest.raises(SystemExit, match="--compare-sampler .*cosface.* not in --losses"):
        main([str(dataset), "--toy", "--out", str(tmp_path), "--losses", "arcface,otface",
              "--compare-sampler", "cosface"])


def _children(pid: int) -> set:
    kids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.add(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc (Linux)")
def test_sigterm_stops_the_worker_processes_and_keeps_nothing_half_done(dataset, tmp_path):
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = subprocess.Popen([sys.executable, "-m", "otface_plugin.bench", str(dataset), "--toy", "--route", "plugin",
                          "--out", str(out), "--no-progress", "--no-ablation", "--jobs", "2"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    workers = set()
    while len(workers) < 2:  # the pool's two workers (the spawn context adds a resource tracker too)
        assert p.poll() is None and time.monotonic() < deadline, "the workers never started"
        workers = {k for k in _children(p.pid) if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text(errors="replace")
                   and "pipe_handle" in Path(f"/proc/{k}/cmdline").read_text(errors="replace")}
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted; finished runs are kept" in err, err
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "worker processes outlived otface-bench"
    runs = out / "_work" / "runs"
    assert not runs.exists() or all((r / "result.json").is_file() for r in runs.iterdir() if r.is_dir()
                                    and (r / "model.pt").exists())
