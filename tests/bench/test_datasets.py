"""otface-bench on datasets nobody prepared for it: folds and pairs chosen from what the held-out
identities can give (and said), one-line errors with a non-zero exit, and a report that names the
dataset it was given."""
from pathlib import Path

import pytest

from otface_plugin.bench import report
from otface_plugin.bench.cli import main
from otface_plugin.bench.data import BenchError, choose_folds_and_pairs, describe_dataset, prepare
from helpers import make_faces


def _faces(root: Path, counts) -> Path:
    return make_faces(root, n_img=counts, size=16, names=[f"id{i:03d}" for i in range(len(counts))])


def test_pairs_and_folds_are_lowered_to_what_the_held_out_identities_give(tmp_path):
    data = _faces(tmp_path / "faces", [4] * 30)  # 4 images: 6 same pairs per identity
    prep = prepare(data, tmp_path / "work", test_identities=20, pairs=6000, progress=False)
    # 10 folds of 2 identities: 12 same pairs per fold at most -> 10 x 2 x 12 = 240 pairs
    assert prep.folds == 10 and prep.pairs == 240
    assert any("240 pairs instead of 6000" in n for n in prep.notes)
    import pickle
    with open(prep.bin_path, "rb") as f:
        bins, issame = pickle.load(f)
    assert len(issame) == 240 and sum(issame) == 120 and len(bins) == 480
    # a second call reuses the build and reports the same choice
    again = prepare(data, tmp_path / "work", test_identities=20, pairs=6000, progress=False)
    assert (again.folds, again.pairs, again.notes) == (prep.folds, prep.pairs, prep.notes)


def test_folds_drop_when_a_fold_would_have_no_same_identity_pair(tmp_path):
    data = _faces(tmp_path / "faces", [1, 1, 1, 1, 1, 1, 3, 3])
    folds, pairs, notes = choose_folds_and_pairs(data, [f"id{i:03d}" for i in range(8)], 6000, 0)
    assert 2 <= folds < 4 and pairs == 2 * folds * (pairs // (2 * folds)) and pairs > 0
    assert any("folds instead of 4" in n for n in notes)
    with pytest.raises(BenchError, match="raise --test-identities"):
        choose_folds_and_pairs(data, [f"id{i:03d}" for i in range(6)], 6000, 0)


@pytest.mark.parametrize("extra,message", [
    (["--test-identities", "50"], "--test-identities 50 must be in (0, 12)"),
    (["--test-identities", "3"], "at least 4"),
])
def test_bench_errors_are_one_line_with_exit_2(tmp_path, capsys, extra, message):
    data = _faces(tmp_path / "faces", [3] * 12)
    rc = main([str(data), "--toy", "--route", "plugin", "--out", str(tmp_path / "out"), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("otface-bench: error:") and message in err[0]


def test_single_image_identities_only_is_a_one_line_error(tmp_path, capsys):
    data = _faces(tmp_path / "faces", [1] * 12)
    rc = main([str(data), "--toy", "--route", "plugin", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("otface-bench: error:") and "Traceback" not in "\n".join(err)


def test_report_names_the_dataset_it_was_given(tmp_path):
    plain = _faces(tmp_path / "my_faces", [2, 3, 5])
    info = describe_dataset(plain)
    assert info["name"] == "my_faces" and info["identities"] == 3 and info["images"] == 10
    assert info["images_per_identity"] == [2, 3.0, 5]
    yale = _faces(tmp_path / "yale", [2, 2])
    (yale / "README.md").write_text("# Extended Yale Face Database B — cropped faces\n")
    assert describe_dataset(yale)["name"] == "Extended Yale B"
    meta = {"dataset": str(plain), "dataset_info": info, "seeds": [0]}
    row = report.data_row(meta)
    assert "my_faces" in row and "Yale" not in row and "lighting" not in row
    table = report.readme_table({"meta": meta, "summary": {}})
    assert table.startswith("| loss (my_faces, 1 seed)")


def test_defaults_on_lfw_people_with_ten_or_more_images(lfw, tmp_path):
    """A dataset nobody prepared for the bench: LFW's 158 people with >= 10 images as identity
    folders (symlinks). The defaults (20 test identities, 6000 pairs) ask for 300 same pairs per
    fold of 2 people; the bench builds what they give and says so."""
    data = tmp_path / "lfw10"
    data.mkdir()
    for d in sorted((lfw / "images").iterdir()):
        if sum(1 for _ in d.iterdir()) >= 10:
            (data / d.name).symlink_to(d, target_is_directory=True)
    prep = prepare(data, tmp_path / "work", test_identities=20, pairs=6000, progress=False)
    assert prep.folds == 10 and 0 < prep.pairs < 6000 and prep.pairs % 20 == 0
    assert any(f"{prep.pairs} pairs instead of 6000" in n for n in prep.notes)
    info = prep.dataset_info
    assert info["name"] == "lfw10" and info["identities"] == 158 and info["images_per_identity"][0] >= 10
