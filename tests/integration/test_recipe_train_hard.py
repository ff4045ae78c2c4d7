"""sampler: hard end to end on CPU: 2 processes of the patched recipe with loss: otface, several
refreshes of the neighbour table, and a resume that plans its epoch from the same table."""
import re

import pytest
from conftest import copy_upstream
from test_recipe_train import E2E_JOB, data, ot_rows, pytestmark, torchrun  # noqa: F401

from otface_plugin.arcface_torch import installer

REFRESH = re.compile(r"HardPKSampler refresh at global step (\w+): (\d+) identities, neighbours in ([\d.]+) s, "
                     r"table (\w+), in effect from (.+)")

# mbf, 8 steps per epoch, no verification; the otface block only speeds the OT term's start
HARD_JOB = E2E_JOB.replace("{network}", "mbf").replace("{verbose}", "100000").replace("{num_image}", "256") \
    .replace("val_targets: [heldout]", "val_targets: []") + """\
otface:
  lambda_ot: 1.0
  warmup_steps: 64
sampler: hard
hard:
  neighbours: 1
  refresh_steps: 3
"""


@pytest.fixture(scope="module")
def hard_run(tmp_path_factory, data, train_python):  # noqa: F811
    """2 processes, P x K = 4 x 4 per process (2 of the 4 identities a seed and its neighbour),
    8 steps per epoch: 2 epochs, then a resumed third."""
    root = copy_upstream(tmp_path_factory.mktemp("hard") / "arcface_torch")
    installer.install(root)
    cfg = root / "configs" / "e2e_hard.yaml"
    cfg.write_text(HARD_JOB.format(resume="false", rec=data["rec"], num_classes=data["num_classes"], epochs=2))
    torchrun(train_python, root, "configs/e2e_hard.yaml", 2, 900)
    log_first = (root / "work_dirs" / "e2e_hard" / "training.log").read_text()
    cfg.write_text(HARD_JOB.format(resume="true", rec=data["rec"], num_classes=data["num_classes"], epochs=3))
    torchrun(train_python, root, "configs/e2e_hard.yaml", 2, 600)
    log_all = (root / "work_dirs" / "e2e_hard" / "training.log").read_text()
    return {"log_first": log_first, "log_resumed": log_all[len(log_first):], "num_classes": data["num_classes"]}


def test_hard_sampler_trains_refreshes_and_resumes(hard_run):
    first = REFRESH.findall(hard_run["log_first"])
    # every 3 steps and at each epoch end (8, 16): 3 6 8 9 12 15 16
    assert [r[0] for r in first] == ["3", "6", "8", "9", "12", "15", "16"], first
    assert all(int(r[1]) == hard_run["num_classes"] for r in first)
    assert len({r[3] for r in first}) >= 2  # the centres moved: the table changed
    rows = ot_rows(hard_run["log_first"])
    assert [r[0] for r in rows] == list(range(1, 17))
    assert all(r[1] == r[1] and abs(r[1]) < 1e6 for r in rows)  # finite
    resumed = REFRESH.findall(hard_run["log_resumed"])
    assert resumed[0][0] == "resume" and resumed[0][4] == "the next epoch"
    # the checkpoint's centres give the table the uninterrupted run had for epoch 3
    assert resumed[0][3] == first[-1][3]
    assert [r[0] for r in ot_rows(hard_run["log_resumed"])] == list(range(17, 25))
    assert [r[0] for r in resumed[1:]] == ["18", "21", "24"]
    print("refreshes:", [(r[0], r[2] + " s", r[3]) for r in first + resumed])


def test_hard_sampler_with_the_margin_loss_alone(tmp_path, data, train_python):  # noqa: F811
    """loss: arcface (PartialFC_V2 itself as the head) with sampler: hard: one epoch of 8 steps."""
    root = copy_upstream(tmp_path / "arcface_torch")
    installer.install(root)
    job = HARD_JOB.replace("loss: otface", "loss: arcface").split("otface:")[0] + "sampler: hard\nhard:\n  refresh_steps: 3\n"
    (root / "configs" / "e2e_hard_arc.yaml").write_text(
        job.format(resume="false", rec=data["rec"], num_classes=data["num_classes"], epochs=1))
    torchrun(train_python, root, "configs/e2e_hard_arc.yaml", 2, 600)
    log = (root / "work_dirs" / "e2e_hard_arc" / "training.log").read_text()
    assert [r[0] for r in REFRESH.findall(log)] == ["3", "6", "8"]
    assert "OTFace   Global Step" not in log  # the upstream head: no OTFace components
