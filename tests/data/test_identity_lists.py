"""Identity lists (issue 9, case 1): `split` writes and `--identities-from` reads back every
folder name the file system allows; hand-written lists keep their simple rules."""
import os

import pytest

from otface_plugin.data.cli import main as cli
from otface_plugin.data.folders import read_identity_list
from otface_plugin.data.rec_builder import build_rec
from helpers import make_faces

# '#' inside and in front, surrounding spaces, a quote in front, a tab, a newline, non-ASCII,
# and bytes that are not UTF-8 (os.fsdecode gives surrogate escapes, as os.listdir does)
NAMES = ["John", "John #2", "#hash", "trail ", " lead", '"quoted"', "tab\there", "new\nline",
         "José", "a b", os.fsdecode(b"raw\xff\xfe")]


def test_names_round_trip_through_the_line_format(tmp_path):
    from otface_plugin.data.folders import format_identity_list, identity_list_line

    assert all("\n" not in identity_list_line(n) for n in NAMES)
    lst = tmp_path / "ids.txt"
    lst.write_text(format_identity_list(NAMES), encoding="utf-8")
    assert read_identity_list(lst) == NAMES
    # ordinary names stay plain lines (hand edits, `str.split()`); the rest are JSON strings
    plain = [ln for ln in lst.read_text(encoding="utf-8").splitlines() if not ln.startswith('"')]
    assert plain == ["John", "John #2", "José", "a b"]


def test_split_output_reads_back_exactly_and_builds_those_identities(tmp_path, capsys):
    root = make_faces(tmp_path / "faces", n_img=2, names=NAMES)
    assert sorted(os.listdir(root)) == sorted(NAMES)
    tr, ho = tmp_path / "train.txt", tmp_path / "hold.txt"
    assert cli(["split", str(root), "--holdout-fraction", "0.45", "--seed", "1",
                "--train-list", str(tr), "--holdout-list", str(ho)]) == 0
    train, hold = read_identity_list(tr), read_identity_list(ho)
    assert sorted(train + hold) == sorted(NAMES) and not set(train) & set(hold)
    assert len(hold) == 5
    for names, lst in ((train, tr), (hold, ho)):
        r = build_rec(root, tmp_path / f"out_{lst.stem}", identities=read_identity_list(lst),
                      resize=None, img_fmt=".png")
        assert r.identities == sorted(names) and r.num_images == 2 * len(names)
    # and through the CLI: the held-out .rec has exactly the held-out identities
    capsys.readouterr()
    assert cli(["build-rec", str(root), str(tmp_path / "cli_out"), "--identities-from", str(ho),
                "--resize", "0", "--format", ".png", "--no-progress"]) == 0
    assert f"{len(hold)} identities, {2 * len(hold)} images" in capsys.readouterr().out


def test_hand_written_lines(tmp_path):
    """Surrounding whitespace is trimmed, blank and '#' lines are skipped, '#' inside a name is
    part of it, and a JSON string line is taken exactly (the way to write the rest)."""
    lst = tmp_path / "ids.txt"
    lst.write_bytes("\ufeff  John #2  \r\n# a comment\n\n   \n  # indented comment\n"
                    '"#hash"\n"trail "\n  "  lead"  \nJosé\n"raw\\udcff\\udcfe"\nlast'
                    .encode("utf-8"))
    assert read_identity_list(lst) == ["John #2", "#hash", "trail ", "  lead", "José",
                                       os.fsdecode(b"raw\xff\xfe"), "last"]


@pytest.mark.parametrize("text,err", [
    ('"unterminated\n', r"ids\.txt: line 1: .*JSON string"),
    ('ok\n"a" # note\n', r"ids\.txt: line 2: .*JSON string"),
    ('""\n', r"ids\.txt: line 1: not a folder name"),
    ("# only comments\n\n", r"ids\.txt: empty identity list"),
])
def test_bad_list_lines_name_file_and_line(tmp_path, text, err):
    from otface_plugin.data.errors import DatasetLayoutError

    lst = tmp_path / "ids.txt"
    lst.write_text(text)
    with pytest.raises(DatasetLayoutError, match=err):
        read_identity_list(lst)


def test_a_name_matching_no_folder_is_an_error_naming_it(tmp_path, capsys):
    root = make_faces(tmp_path / "faces", n_img=2, names=["trail ", "John #2", "Ann"])
    lst = tmp_path / "ids.txt"
    for text, missing in (("Ann\ntrail\n", '"trail"'), ("John\n", '"John"'),
                          ("Ann\nNobody Here\n", '"Nobody Here"')):
        lst.write_text(text)
        assert cli(["build-rec", str(root), str(tmp_path / "x"), "--identities-from", str(lst),
                    "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"identity folders not found: {missing}" in err and len(err.splitlines()) == 1
        assert not list(tmp_path.glob("x*"))
