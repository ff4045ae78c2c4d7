"""The LFW protocol study: protocol files, identity-disjoint train sets / test folds, the P x K
sampler on people with 2-3 images, and the --toy study end to end on the shared LFW copy."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from otface_plugin.bench.data import BenchError
from otface_plugin.bench.lfw import format_folds, is_lfw, prepare_lfw
from otface_plugin.bench.study import ot_term_activity
from otface_plugin.data import IdentityIndex, PKSampler
from otface_plugin.data.lfw_protocol import parse_folds, read_pairs_file, read_people_file


def test_shipped_protocol_files_sets_and_folds_are_identity_disjoint(lfw):
    sets = read_people_file(lfw / "people.txt")
    pf = read_pairs_file(lfw / "pairs.txt")
    assert len(sets) == 10 and sum(len(s) for s in sets) == 5749
    assert len(pf.folds) == 10 and pf.per_fold == 300
    names = [{n for n, _ in s} for s in sets]
    for k, fold in enumerate(pf.folds):
        assert [p.same for p in fold] == [True] * 300 + [False] * 300
        assert {n for p in fold for n in (p.name1, p.name2)} <= names[k]  # fold k uses set k only
    for i in range(10):
        for j in range(i + 1, 10):
            assert not names[i] & names[j]


def test_fold_specs_round_trip():
    assert parse_folds("6-10", 10) == [5, 6, 7, 8, 9]
    assert parse_folds("1,3-4", 10) == [0, 2, 3]
    assert format_folds([5, 6, 7, 8, 9]) == "6-10" and format_folds([0, 2, 3]) == "1,3-4"
    for bad in ("0-2", "4-11", "x", "5-3"):
        with pytest.raises(ValueError):
            parse_folds(bad, 10)


def test_pk_sampler_with_two_and_three_image_people_repeats_their_images():
    # LFW's training people mostly have 2-3 images; K = 4 then repeats images ("replace"): every
    # batch still has 4 entries per identity, covering all of its images before repeating one.
    counts = np.array([2, 3, 2, 7, 2, 3, 5, 2])
    starts = 1 + np.r_[0, np.cumsum(counts)[:-1]]
    index = IdentityIndex.from_ranges(starts, starts + counts)
    s = PKSampler(index, batch_size=16, num_instances=4, num_replicas=1, rank=0, seed=0)
    labels = index.labels()
    for chunk in s.epoch_indices().reshape(-1, 16):
        for group in chunk.reshape(4, 4):
            c = labels[group[0]]
            assert (labels[group] == c).all()
            assert len(set(group.tolist())) == min(4, counts[c])  # all its images, then repeats


def test_ot_activity_reports_share_and_ot_term_per_third():
    h = {"step": list(range(0, 90, 10)), "triplets": [3, 2, 1, 0, 1, 0, 0, 0, 0],
         "ot": [0.3, 0.2, 0.1, 0.0, 0.05, 0.0, 0.0, 0.0, 0.0]}
    a = ot_term_activity(h)
    assert a["active_share_by_third"] == [1.0, pytest.approx(1 / 3), 0.0]
    assert a["mean_ot_by_third"] == [pytest.approx(0.2), pytest.approx(0.05 / 3), 0.0]
    assert a["mean_triplets_by_third"] == [2.0, pytest.approx(1 / 3), 0.0]


def _mini_lfw(root: Path, leak: bool = False) -> Path:
    """3 sets of 3 people (2 images each), 3 folds of 1 same + 1 different pair."""
    people = [[("A1", 2), ("A2", 2), ("A3", 2)], [("B1", 2), ("B2", 2), ("B3", 2)], [("C1", 2), ("C2", 2), ("C3", 2)]]
    rng = np.random.default_rng(0)
    for s in people:
        for name, n in s:
            (root / "images" / name).mkdir(parents=True)
            for j in range(1, n + 1):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                    root / "images" / name / f"{name}_{j:04d}.jpg")
    (root / "people.txt").write_text("3\n" + "".join(f"{len(s)}\n" + "".join(f"{n}\t{c}\n" for n, c in s) for s in people))
    x = "A1" if leak else "C3"
    (root / "pairs.txt").write_text("3\t1\nA1\t1\t2\nA2\t1\tA3\t2\nB1\t1\t2\nB2\t1\tB3\t1\n"
                                    f"C1\t1\t2\nC2\t1\t{x}\t2\n")
    return root


def test_prepare_lfw_trains_on_sets_and_tests_on_the_other_folds(tmp_path):
    data = _mini_lfw(tmp_path / "lfw")
    assert is_lfw(data)
    prep = prepare_lfw(data, tmp_path / "work", train_sets="1", progress=False)
    assert prep.train_ids == ["A1", "A2", "A3"] and prep.folds == 2 and prep.pairs == 4
    assert prep.test_ids == ["B1", "B2", "B3", "C1", "C2", "C3"]
    assert "sets 1 " in prep.description and "folds 2-3" in prep.description
    with pytest.raises(BenchError, match="at least 2 test folds"):
        prepare_lfw(data, tmp_path / "work2", train_sets="1-2", progress=False)


def test_prepare_lfw_refuses_a_pairs_file_that_leaks_training_people(tmp_path):
    data = _mini_lfw(tmp_path / "lfw", leak=True)
    with pytest.raises(BenchError, match="training people also appear in the test pairs: A1"):
        prepare_lfw(data, tmp_path / "work", train_sets="1", progress=False)


@pytest.mark.slow
def test_lfw_toy_study_end_to_end(lfw, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from otface_plugin.bench.cli import main

    out = tmp_path / "lfw_toy"
    assert main([str(lfw), "--toy", "--route", "plugin", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    split = res["meta"]["split"]
    assert split["protocol"] == "lfw" and split["folds"] == 2 and split["pairs"] == 1200
    assert len(split["train_identities"]) == 48
    assert not set(split["train_identities"]) & set(split["test_identities"])
    assert res["meta"]["dataset_info"]["name"] == "LFW"
    for loss in ("arcface", "cosface", "otface"):
        assert 0.0 <= res["summary"][loss]["accuracy"]["mean"] <= 1.0
    act = res["ot_activity"]["otface-default-s0"]
    assert len(act["mean_ot_by_third"]) == 3 and all(v >= 0 for v in act["mean_ot_by_third"])
    report = (out / "REPORT.md").read_text()
    assert "on LFW" in report and "TOY RUN" in report and "pairs.txt folds 6-7" in report
    assert "Yale" not in report and "| third of training |" in report
    assert (out / "README_table.md").read_text().startswith("| loss (LFW, 1 seed)")


def test_cli_detects_lfw_and_keeps_the_identity_split_report(tmp_path):
    from otface_plugin.bench.cli import build_parser, config_from_args

    data = _mini_lfw(tmp_path / "lfw")
    cfg = config_from_args(build_parser().parse_args([str(data)]))
    assert cfg.protocol == "lfw" and cfg.out == "results/lfw" and len(cfg.seeds) == 3 and not cfg.ablation
    toy = config_from_args(build_parser().parse_args([str(data), "--toy", "--lfw-train-sets", "2"]))
    assert toy.out == "results/lfw_toy" and toy.toy and toy.lfw_train_sets == "2"
    forced = config_from_args(build_parser().parse_args([str(data / "images"), "--protocol", "split"]))
    assert forced.protocol == "split" and forced.out == "results"
    with pytest.raises(SystemExit, match="do not apply to --protocol lfw"):
        config_from_args(build_parser().parse_args([str(data), "--pairs", "100"]))


def test_report_per_third_table_and_idle_note():
    from otface_plugin.bench import report

    def res(last_third_triplets):
        h = {"step": list(range(0, 90, 10)), "triplets": [3, 2, 1, 1, 1, 1, *last_third_triplets],
             "ot": [0.3, 0.2, 0.1, 0.1, 0.1, 0.1, *[0.1 * (t > 0) for t in last_third_triplets]]}
        return {"meta": {"train": {"steps": 90}}, "ot_activity": {"otface-default-s0": ot_term_activity(h)},
                "runs": {"otface-default-s0": {"variant": "default", "main": True}}}

    active = "\n".join(report.ot_activity_lines(res([1, 0, 2])))
    assert "| last | 67% | 1.00 | 0.0667 |" in active and "went idle" not in active
    idle = "\n".join(report.ot_activity_lines(res([0, 0, 0])))
    assert "| last | 0% | 0.00 | 0.0000 |" in idle and "went idle" in idle and "triplets=all" in idle
