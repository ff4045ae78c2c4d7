"""The GPU check: every CUDA path of the plugin, in one command, with a report.

    python benchmarks/gpu_check.py                      # on a GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --device cpu --smoke --out /tmp/gpu-smoke   # CI: the script works

Stages (each recorded as pass / fail / skip / n/a with its figures; a failing stage does not stop
the others; the exit status is non-zero when any stage failed):

1. tests   - the suite's CUDA cases (`pytest -m cuda`; on CPU: tests/test_device.py's CPU cases)
2. nosync  - an OTFace forward + backward (ot_compile="cudagraph", fixed shapes, a sync-free
             head) under torch.cuda.set_sync_debug_mode("error"): no host synchronisation
             (n/a on CPU; the eager default and the own margin head are reported, not judged)
3. recipe  - the patched train_v2.py under torchrun --nproc_per_node=1 (NCCL, fp16: true, r50,
             loss: otface, sampler: pk, batch 128 = 32 x 4) on a .rec built by otface-data from
             ../shared/data/extyaleb, ~100 steps, resumed for one more epoch; loss finite and
             falling, OTFace components logged, the ONNX export loads in insightface
             (CPU smoke: gloo, fp16 off, mbf, 2 x 4 batches, 12 + 6 steps)
4. bf16    - the same recipe job with `precision: bf16` (bfloat16 autocast, no GradScaler,
             bf16_compress_hook), ~40 steps, resumed for one more epoch; loss finite and falling,
             the bf16 path in the log, the checkpoint's precision (n/a on a GPU without bf16)
             (CPU smoke: CPU autocast bf16, mbf, 12 + 6 steps)
5. step    - benchmarks/bench_step.py: recipe r50, batch 128 = 32 x 4, fp16; OTFace / ArcFace
             step time (target <= 1.03)
6. solver  - benchmarks/bench_ot.py: ours vs POT batched vs geomloss on the device, same error
             (target >= 3x POT batched on CUDA)

Writes OUT/REPORT.md and OUT/gpu.json (card, driver, torch, figures, pass/fail per stage).
Needs: the recipe (ARCFACE_TORCH_DIR, else ../shared/upstream/<pins.SHARED_EXPORT>; copied
writable), the face set (OTFACE_FACES_DIR, else ../shared/data/extyaleb) and a training
interpreter with the recipe's dependencies (--train-python, else OTFACE_TRAIN_PYTHON, else this
one), or a GPU kit (--kit: benchmarks/gpu_kit.sh builds it, benchmarks/gpu_run.sh runs this script with
it on a machine without network). A missing prerequisite skips its stage with the reason
(a failure with --strict, which `make gpu-check` passes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "integration")]

# The integration test's helpers: its log patterns, torchrun wrapper, otface-data call and the
# insightface export check (imported, so the CPU test and this check read the same lines).
import conftest  # noqa: E402
import test_recipe_train as itest  # noqa: E402

STEP_TARGET = 1.03
GPU_BATCH, SMOKE_BATCH = 128, 8  # P x K = 32 x 4 (the recipe's per-GPU batch); smoke: 2 x 4
STAGES = ("tests", "nosync", "recipe", "bf16", "step", "solver")


class Skip(Exception):
    """A prerequisite is missing: the stage is skipped with this reason."""


# ----------------------------------------------------------------------------- machine
def machine_info(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            "host_cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "device": device}
    if device == "cuda" and torch.cuda.is_available():
        info["card"] = torch.cuda.get_device_name(0)
        info["card_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cudnn"] = torch.backends.cudnn.version()
        smi = shutil.which("nvidia-smi")
        if smi:
            r = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                info["driver"] = r.stdout.strip().splitlines()[0].split(",")[-1].strip()
    return info


# ----------------------------------------------------------------------------- helpers
def run(cmd, timeout, cwd=REPO, env=None, log=None):
    """A subprocess with PYTHONPATH=REPO; returns (returncode, combined output)."""
    full_env = {**os.environ, "PYTHONPATH": conftest.pythonpath(), "PYTHONWARNINGS": "ignore", **(env or {})}
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True,
                       timeout=timeout)
    out = r.stdout + r.stderr
    if log is not None:
        Path(log).write_text(out)
    return r.returncode, out


def tail(text: str, n: int = 2500) -> str:
    return text[-n:]


def recipe_root() -> Path:
    if conftest.UPSTREAM is None:
        raise Skip(conftest.NO_UPSTREAM)
    return conftest.UPSTREAM


def check_train_python(py: str) -> None:
    r = subprocess.run([py, "-W", "ignore", "-c", conftest.RECIPE_DEPS + ", insightface"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode
        raise Skip(f"training interpreter {py} lacks the recipe's dependencies "
                   f"(pass --train-python or OTFACE_TRAIN_PYTHON; on a GPU machine use benchmarks/gpu_run.sh): {last}")


# ----------------------------------------------------------------------------- stages
def stage_tests(args, work: Path) -> dict:
    if args.device == "cuda":
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs", "tests"]
    else:  # no CUDA case can run: the device-parametrised file's CPU cases prove the wiring
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not cuda and not slow",
               "tests/test_device.py"]
    code, out = run(cmd, args.limit("tests"), env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")},
                    log=work / "tests.log")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", out)}
    figures = {"command": " ".join(cmd[1:]), **counts}
    if code != 0:
        return {"status": "fail", "figures": figures, "detail": tail(out)}
    if args.device == "cuda" and counts.get("passed", 0) == 0:
        return {"status": "fail", "figures": figures, "detail": "no CUDA case ran:\n" + tail(out)}
    return {"status": "pass", "figures": figures}


def stage_nosync(args, work: Path) -> dict:
    """Judged: the OTFace loss (fixed shapes, graph-replayed loop) around a sync-free linear +
    cross-entropy head. Reported only: the eager default (its mining's nonzero syncs once per
    step) and the own margin head (its label -1 filter syncs, as the recipe's CombinedMarginLoss)."""
    import torch
    from torch.nn import functional as F

    from otface_plugin.losses import OTFaceLoss

    dev = torch.device(args.device)
    P, K = (32, 4) if not args.smoke else (4, 4)
    B = P * K
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(B, 512, generator=g).to(dev)
    feats = torch.randn(B, 512, 7, 7, generator=g).to(dev)
    labels = torch.arange(P).repeat_interleave(K).to(dev)
    weight = torch.randn(512, P, generator=g).to(dev)

    def plain_head(e, lab):
        return F.cross_entropy(e.float() @ weight, lab)

    variants = {"plain head + ot_compile=cudagraph": dict(head=plain_head, term_options={"ot_compile": "cudagraph"}),
                "plain head + ot_compile=none": dict(head=plain_head, term_options={"ot_compile": "none"}),
                "MarginSoftmaxLoss + ot_compile=cudagraph": dict(num_classes=P, embedding_size=512,
                                                                 term_options={"ot_compile": "cudagraph"})}
    figures = {}
    for name, kwargs in variants.items():
        loss_fn = OTFaceLoss(lambda_ot=1.0, **kwargs).to(dev)

        def step():
            e = emb.clone().requires_grad_()
            f = feats.clone().requires_grad_()
            with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                loss = loss_fn(e, labels, features=f)
            loss.backward()
            return loss.detach()

        step()  # warm-up: graph capture, lazy CUDA state
        if dev.type != "cuda":
            figures[name] = f"n/a on CPU (loss {float(step()):.4f})"
            continue
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            figures[name] = "no host sync"
        except RuntimeError as exc:
            figures[name] = f"synchronises: {str(exc).splitlines()[0][:200]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    if dev.type != "cuda":
        return {"status": "n/a", "figures": figures, "detail": "host synchronisation is a CUDA notion"}
    ok = figures["plain head + ot_compile=cudagraph"] == "no host sync"
    return {"status": "pass" if ok else "fail", "figures": figures,
            "detail": "judged: the first line; the others are reported for information"}


def recipe_job(args, rec: Path, num_classes: int, num_image: int, resume: bool, epochs: int) -> str:
    gpu = args.device == "cuda" and not args.smoke
    network, layer, batch = ("r50", "layer4", GPU_BATCH) if gpu else ("mbf", "conv_sep", SMOKE_BATCH)
    return "\n".join([
        "loss: otface", "sampler: pk", f"network: {network}", "output: null", f"batch_size: {batch}",
        "num_instances: 4", "optimizer: adamw", "lr: 0.001", "weight_decay: 0.1",
        f"fp16: {'true' if args.device == 'cuda' else 'false'}", "verbose: 100000", "frequent: 1",
        f"num_workers: {2 if gpu else 1}", "save_all_states: true", f"resume: {'true' if resume else 'false'}", f"rec: {rec}",
        f"num_classes: {num_classes}", f"num_image: {num_image}", f"num_epoch: {epochs}", "warmup_epoch: 0",
        "val_targets: []", "otface:", f"  layer: {layer}", "  lambda_ot: 1.0", "  warmup_steps: 20", ""])


def stage_recipe(args, work: Path) -> dict:
    import torch

    from otface_plugin.arcface_torch import installer

    if args.device == "cuda" and not torch.cuda.is_available():
        return {"status": "fail", "detail": "no CUDA device visible to torch"}
    check_train_python(args.train_python)
    upstream = recipe_root()
    gpu = args.device == "cuda" and not args.smoke
    t0 = time.perf_counter()
    rec, face, num_classes, available = recipe_data(args, work)
    build_s = time.perf_counter() - t0
    num_image = available if gpu else 6 * SMOKE_BATCH
    batch = GPU_BATCH if gpu else SMOKE_BATCH
    steps_per_epoch = num_image // batch
    epochs = max(2, round(100 / steps_per_epoch)) if gpu else 2

    root = installer.copy_checkout(upstream, work / "arcface_torch")
    installer.install(root)
    cfg = root / "configs" / "gpu_check.yaml"
    out_dir = root / "work_dirs" / "gpu_check"
    figures = {"identities": num_classes, "images_per_epoch": num_image, "batch": batch,
               "steps_first_run": steps_per_epoch * epochs, "build_rec_s": round(build_s, 1)}

    cfg.write_text(recipe_job(args, rec, num_classes, num_image, False, epochs))
    t0 = time.perf_counter()
    itest.torchrun(args.train_python, root, "configs/gpu_check.yaml", 1, args.limit("recipe"))
    figures["first_run_s"] = round(time.perf_counter() - t0, 1)
    log_first = (out_dir / "training.log").read_text()
    cfg.write_text(recipe_job(args, rec, num_classes, num_image, True, epochs + 1))
    t0 = time.perf_counter()
    itest.torchrun(args.train_python, root, "configs/gpu_check.yaml", 1, args.limit("recipe"))
    figures["resumed_run_s"] = round(time.perf_counter() - t0, 1)
    log_all = (out_dir / "training.log").read_text()
    shutil.copy(out_dir / "training.log", work / "training.log")

    rows, resumed = itest.ot_rows(log_first), itest.ot_rows(log_all[len(log_first):])
    losses = [r[1] for r in rows]
    problems = []
    if not rows:
        problems.append("no OTFace component lines in training.log")
    else:
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        figures.update(steps_logged=len(rows), loss_first5=round(first, 4), loss_last5=round(last, 4),
                       ot_first=rows[0][3], ot_last=rows[-1][3], triplets_min=min(r[5] for r in rows),
                       lambda_last=rows[-1][4])
        if not all(x == x and abs(x) < 1e6 for x in losses):
            problems.append("non-finite loss")
        if not last < first and not args.smoke:  # 12 smoke steps at a decaying LR: too few to judge a trend
            problems.append(f"loss did not fall ({first:.4f} -> {last:.4f})")
    expected = list(range(len(rows) + 1, len(rows) + steps_per_epoch + 1))
    figures["resumed_steps"] = [resumed[0][0], resumed[-1][0]] if resumed else []
    if [r[0] for r in resumed] != expected:
        problems.append(f"resumed steps {[r[0] for r in resumed][:3]}... do not continue at {len(rows) + 1}")
    backend = "nccl" if args.device == "cuda" else "gloo"
    figures["backend"] = backend

    figures["recordio"] = recordio_backend(args.train_python, root)
    export = export_check(args, root, out_dir, "r50" if gpu else "mbf", face)
    figures["export"] = export
    if not (export.get("max_abs_diff", 1) < 1e-3 and export.get("embedding_finite")
            and export.get("taskname") == "recognition"):
        problems.append(f"export check: {export}")
    return {"status": "fail" if problems else "pass", "figures": figures, "detail": "; ".join(problems)}


def recipe_data(args, work: Path):
    """(rec dir, a face image, identities, images) for the recipe stages: the GPU kit's prebuilt
    .rec, else one built by otface-data from the face set (once per work dir)."""
    gpu = args.device == "cuda" and not args.smoke
    if args.kit:  # the GPU kit's prebuilt .rec and face (the face folders do not travel to the GPU machine)
        rec, face = Path(args.kit) / "rec", Path(args.kit) / "face.pgm"
        ids = (rec / "property").read_text().split(",")[0]
        return rec, face, int(ids), rec_images(rec)
    faces = conftest.faces_dir()
    if not faces.is_dir():
        raise Skip(f"face images not found at {faces} (set OTFACE_FACES_DIR, or pass --kit)")
    names = sorted(p.name for p in faces.iterdir() if p.is_dir())[: (None if gpu else 6)]
    rec = work / "rec"
    if not (rec / "train.rec").is_file():
        id_list = work / "identities.txt"
        id_list.write_text("\n".join(names) + "\n")
        itest.otface_data("build-rec", faces, f"{rec}/", "--identities-from", id_list, "--resize", 112,
                          "--no-progress", "--force")
    face = sorted((faces / names[0]).glob("*.pgm"))[0]
    return rec, face, len(names), rec_images(rec)


def stage_bf16(args, work: Path) -> dict:
    """precision: bf16 in the patched recipe: train, then resume one epoch; loss finite (and
    falling on the GPU), the bf16 path taken (its log line, no GradScaler), the set's precision."""
    import torch

    from otface_plugin.arcface_torch import installer
    from otface_plugin.arcface_torch.checkpoint import describe, read_set

    if args.device == "cuda" and not torch.cuda.is_available():
        return {"status": "fail", "detail": "no CUDA device visible to torch"}
    if args.device == "cuda" and not torch.cuda.is_bf16_supported():
        return {"status": "n/a", "detail": "this GPU has no bfloat16 support (before Ampere)"}
    check_train_python(args.train_python)
    gpu = args.device == "cuda" and not args.smoke
    rec, _, num_classes, available = recipe_data(args, work)
    num_image = available if gpu else 6 * SMOKE_BATCH
    steps_per_epoch = num_image // (GPU_BATCH if gpu else SMOKE_BATCH)
    epochs = max(2, round(40 / steps_per_epoch)) if gpu else 2
    root = installer.copy_checkout(recipe_root(), work / "arcface_torch_bf16")
    installer.install(root)
    cfg, out_dir = root / "configs" / "gpu_check_bf16.yaml", root / "work_dirs" / "gpu_check_bf16"

    def job(resume: bool, n: int) -> str:
        text = recipe_job(args, rec, num_classes, num_image, resume, n)
        return re.sub(r"^fp16: \w+$", "precision: bf16", text, flags=re.M)

    figures = {"steps_first_run": steps_per_epoch * epochs}
    cfg.write_text(job(False, epochs))
    t0 = time.perf_counter()
    itest.torchrun(args.train_python, root, "configs/gpu_check_bf16.yaml", 1, args.limit("recipe"))
    figures["first_run_s"] = round(time.perf_counter() - t0, 1)
    log_first = (out_dir / "training.log").read_text()
    cfg.write_text(job(True, epochs + 1))
    itest.torchrun(args.train_python, root, "configs/gpu_check_bf16.yaml", 1, args.limit("recipe"))
    log_all = (out_dir / "training.log").read_text()
    rows, resumed = itest.ot_rows(log_first), itest.ot_rows(log_all[len(log_first):])
    problems = []
    if f"precision bf16: {'cuda' if args.device == 'cuda' else 'cpu'} autocast in bfloat16" not in log_first:
        problems.append("no 'precision bf16' line in training.log: the bf16 path was not taken")
    if "Fp16 Grad Scale" in log_first:
        problems.append("a GradScaler ran")
    losses = [r[1] for r in rows]
    if not rows:
        problems.append("no OTFace component lines in training.log")
    else:
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        figures.update(loss_first5=round(first, 4), loss_last5=round(last, 4), ot_last=rows[-1][3])
        if not all(x == x and abs(x) < 1e6 for x in losses):
            problems.append("non-finite loss")
        if not last < first and not args.smoke:
            problems.append(f"loss did not fall ({first:.4f} -> {last:.4f})")
    expected = list(range(len(rows) + 1, len(rows) + steps_per_epoch + 1))
    if [r[0] for r in resumed] != expected:
        problems.append(f"resumed steps {[r[0] for r in resumed][:3]}... do not continue at {len(rows) + 1}")
    figures["checkpoint_precision"] = describe(read_set(out_dir))["precision"]
    if figures["checkpoint_precision"] != "bf16":
        problems.append(f"checkpoint precision {figures['checkpoint_precision']!r}")
    return {"status": "fail" if problems else "pass", "figures": figures, "detail": "; ".join(problems)}


def rec_images(rec: Path) -> int:
    """Images in a .rec with InsightFace's identity header (record 0: [first identity record, end])."""
    from otface_plugin.data import IdentityIndex

    return IdentityIndex.from_rec(str(rec / "train.rec"), str(rec / "train.idx")).num_positions


def recordio_backend(py: str, root: Path) -> str:
    """Which reader the recipe's dataset.py uses in the training interpreter: mxnet or the plugin's."""
    code, out = run([py, "-c", "import dataset; from otface_plugin.arcface_torch import mxnet_compat as m; "
                     "print(m.backend)"], 120, cwd=root)
    return out.strip().splitlines()[-1] if code == 0 else f"error: {tail(out, 300)}"


def export_check(args, root: Path, out_dir: Path, network: str, face: Path) -> dict:
    code, out = run([args.train_python, "torch2onnx.py", out_dir / "model.pt", "--network", network,
                     "--output", out_dir / "model.onnx"], args.limit("export"), cwd=root)
    if code != 0:
        return {"error": "torch2onnx.py failed: " + tail(out, 800)}
    check = itest.CHECK_EXPORT.format(network=network, root=str(root), pt=str(out_dir / "model.pt"),
                                      onnx=str(out_dir / "model.onnx"), face=str(face))
    code, out = run([args.train_python, "-c", check], args.limit("export"), cwd=root)
    if code != 0:
        return {"error": "insightface load failed: " + tail(out, 800)}
    return json.loads(out.strip().splitlines()[-1])


def stage_step(args, work: Path) -> dict:
    upstream = recipe_root()
    sizes = ["--P", "2", "--K", "2", "--steps", "1"] if args.smoke else ["--P", "32", "--K", "4", "--steps", "15"]
    fp16 = ["--fp16"] if args.device == "cuda" else []
    figures, problems = {}, []
    for ot_compile in ("none", "cudagraph") if args.device == "cuda" else ("none",):
        out_json = work / f"step_{ot_compile}.json"
        cmd = [sys.executable, REPO / "benchmarks" / "bench_step.py", "--device", args.device, "--backbone",
               "upstream", *sizes, *fp16, "--ot-compile", ot_compile, "--json", out_json]
        code, out = run(cmd, args.limit("step"), env={"ARCFACE_TORCH_DIR": str(upstream)},
                        log=work / f"step_{ot_compile}.log")
        if code != 0:
            problems.append(f"bench_step.py (ot_compile={ot_compile}) failed:\n{tail(out)}")
            continue
        res = json.loads(out_json.read_text())
        figures[f"ot_compile={ot_compile}"] = {"batch": res["batch"], "triplets": res["triplets"],
                                               "margin_s": round(res["median_s"]["margin"], 4),
                                               "otface_s": round(res["median_s"]["otface"], 4),
                                               "ratio": round(res["ratio"], 4)}
    if problems:
        return {"status": "fail", "figures": figures, "detail": "\n".join(problems)}
    best = min(v["ratio"] for v in figures.values())
    figures["target_ratio"] = STEP_TARGET
    if args.smoke:
        return {"status": "pass", "figures": figures, "detail": "smoke sizes: the target is not judged"}
    return {"status": "pass" if best <= STEP_TARGET else "fail", "figures": figures,
            "detail": f"best ratio {best:.3f} vs target <= {STEP_TARGET}"}


def stage_solver(args, work: Path) -> dict:
    out_json = work / "solver.json"
    cmd = [sys.executable, REPO / "benchmarks" / "bench_ot.py", "--device", args.device, "--json", out_json,
           *(["--smoke"] if args.smoke else ["--rounds", "7"])]
    code, out = run(cmd, args.limit("solver"), log=work / "solver.log")
    if code != 0:
        return {"status": "fail", "detail": tail(out)}
    res = json.loads(out_json.read_text())
    figures = {"median_ms": {k: round(1000 * v, 2) for k, v in res["median_s"].items()},
               "max_abs_error": res["max_abs_error"], "peak_mib": res["peak_mib"],
               "ops_per_iteration": res["ops_per_iteration"], **res["summary"]}
    table = out[out.find("\nB="):] if "\nB=" in out else tail(out)
    if args.smoke:
        return {"status": "pass", "figures": figures, "detail": "smoke sizes: the target is not judged",
                "table": table}
    return {"status": "pass" if res["summary"].get("pass") else "fail", "figures": figures, "table": table}


STAGE_FUNCS = {"tests": stage_tests, "nosync": stage_nosync, "recipe": stage_recipe, "bf16": stage_bf16,
               "step": stage_step, "solver": stage_solver}


# ----------------------------------------------------------------------------- report
def write_report(out: Path, info: dict, results: dict, args, total_s: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "mode": "smoke" if args.smoke else "full", "total_s": round(total_s, 1),
               "command": " ".join(sys.argv), "stages": results}
    (out / "gpu.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    lines = ["# GPU check", "",
             f"Command: `{' '.join(sys.argv)}` ({payload['mode']}, {total_s:.0f} s in all)", "",
             "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {r['status']} | {r.get('seconds', 0):.0f} |" for name, r in results.items()]
    for name, r in results.items():
        lines += ["", f"## {name}: {r['status']}", ""]
        for k, v in (r.get("figures") or {}).items():
            lines.append(f"- {k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
        if r.get("table"):
            lines += ["", "```", r["table"].strip(), "```"]
        if r.get("detail"):
            lines += ["", "```", str(r["detail"]).strip(), "```"]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI: proves the script works, under 5 min on CPU)")
    p.add_argument("--out", help="where REPORT.md and gpu.json go (default: results/gpu; with --smoke a new "
                                  "temporary directory, so CI leaves the tree clean)")
    p.add_argument("--train-python", default=os.environ.get("OTFACE_TRAIN_PYTHON", sys.executable),
                   help="interpreter with the recipe's dependencies (default: OTFACE_TRAIN_PYTHON, else this one)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--strict", action="store_true", help="a skipped stage (missing prerequisite) counts as failed")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory (logs, .rec, checkout)")
    p.add_argument("--kit", default=os.environ.get("OTFACE_GPU_KIT"),
                   help="a GPU kit folder (benchmarks/gpu_kit.sh): its prebuilt rec/ and face.pgm instead of "
                        "building a .rec from the face folders (default: OTFACE_GPU_KIT)")
    p.add_argument("--budget", type=int, default=540, help="seconds for all stages together; a stage started "
                   "later than that is failed, and each call's timeout is cut to what is left (default %(default)s)")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {STAGES}")
    # per-call wall-clock limits (s), each also cut to what is left of --budget: the whole GPU run
    # must end inside one 9-minute device call
    args.timeout = {"tests": 150, "recipe": 150, "export": 90, "step": 90, "solver": 120}
    deadline = time.monotonic() + args.budget

    def limit(kind: str) -> int:
        left = int(deadline - time.monotonic())
        if left < 10:
            raise Skip(f"the {args.budget} s budget (--budget) is spent")
        return min(args.timeout[kind], left)

    args.limit = limit

    out = Path(args.out or (tempfile.mkdtemp(prefix="otface-gpu-smoke-") if args.smoke else REPO / "results" / "gpu"))
    work = Path(tempfile.mkdtemp(prefix="otface-gpu-check-"))
    info = machine_info(args.device)
    print(f"[gpu-check] {info}; work dir {work}", flush=True)
    results, start = {}, time.perf_counter()
    for name in stages:
        t0 = time.perf_counter()
        print(f"[gpu-check] stage {name} ...", flush=True)
        try:
            r = STAGE_FUNCS[name](args, work)
        except Skip as exc:
            r = {"status": "fail" if args.strict else "skip", "detail": str(exc)}
        except subprocess.TimeoutExpired as exc:
            r = {"status": "fail", "detail": f"timed out after {exc.timeout} s: {exc.cmd}"}
        except BaseException as exc:  # noqa: BLE001 - one stage's failure must not stop the others
            if isinstance(exc, KeyboardInterrupt):
                raise
            r = {"status": "fail", "detail": tail("".join(traceback.format_exception(exc)), 4000)}
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = r
        print(f"[gpu-check] stage {name}: {r['status']} ({r['seconds']:.0f} s)"
              + (f"\n{str(r.get('detail'))[-1500:]}" if r["status"] == "fail" else ""), flush=True)
        write_report(out, info, results, args, time.perf_counter() - start)
    total = time.perf_counter() - start
    write_report(out, info, results, args, total)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, r in results.items() if r["status"] == "fail"]
    print(f"[gpu-check] {len(results) - len(failed)}/{len(results)} stages without failure in {total:.0f} s; "
          f"report: {out / 'REPORT.md'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
