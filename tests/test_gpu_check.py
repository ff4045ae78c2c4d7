"""benchmarks/gpu_check.py's bookkeeping: a failing stage is recorded, the others still run, the
exit status says so, and the report names every stage. (The stages themselves run in CI as
`python benchmarks/gpu_check.py --device cpu --smoke`.)"""
import importlib.util
import json

from conftest import REPO


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_failing_stage_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    gc = load_gpu_check()
    ran = []

    def ok(args, work):
        ran.append("solver")
        return {"status": "pass", "figures": {"speedup_vs_pot_batch": 2.5}}

    def boom(args, work):
        ran.append("tests")
        raise RuntimeError("CUDA error: an illegal memory access")

    def missing(args, work):
        ran.append("recipe")
        raise gc.Skip("no arcface_torch recipe")

    monkeypatch.setitem(gc.STAGE_FUNCS, "tests", boom)
    monkeypatch.setitem(gc.STAGE_FUNCS, "recipe", missing)
    monkeypatch.setitem(gc.STAGE_FUNCS, "solver", ok)
    code = gc.main(["--device", "cpu", "--out", str(tmp_path), "--stages", "tests,recipe,solver"])
    assert code == 1 and ran == ["tests", "recipe", "solver"]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert {n: s["status"] for n, s in report["stages"].items()} == {"tests": "fail", "recipe": "skip", "solver": "pass"}
    assert "illegal memory access" in report["stages"]["tests"]["detail"]
    assert report["machine"]["torch"]
    md = (tmp_path / "REPORT.md").read_text()
    assert "| tests | fail |" in md and "| recipe | skip |" in md and "speedup_vs_pot_batch: 2.5" in md

    # --strict: a missing prerequisite is a failure (make gpu-check on the GPU machine)
    code = gc.main(["--device", "cpu", "--out", str(tmp_path), "--stages", "recipe,solver", "--strict"])
    assert code == 1
    assert json.loads((tmp_path / "gpu.json").read_text())["stages"]["recipe"]["status"] == "fail"
    assert gc.main(["--device", "cpu", "--out", str(tmp_path), "--stages", "solver"]) == 0
