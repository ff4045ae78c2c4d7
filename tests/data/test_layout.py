"""data/layout.py directly (the CLI tests reach it through inspect and the builders): the record-0
header, the property file, the class bound and the label check."""
import numpy as np
import pytest

from otface_plugin.data.errors import RecordIOError
from otface_plugin.data.layout import ClassBound, FLOAT32_EXACT, check_label, class_bound, parse_header, read_property
from otface_plugin.data.recordio import IRHeader


def test_parse_header_reads_an_identity_range_and_ignores_plain_records():
    assert parse_header(IRHeader(2, np.array([5.0, 9.0], np.float32), 0, 0), "x.rec") == (5, 9)
    assert parse_header(IRHeader(0, 3.0, 0, 0), "x.rec") is None
    for bad in ([5.5, 9.0], [9.0, 5.0], [0.0, 3.0], [float("nan"), 4.0], [3.0]):
        with pytest.raises(RecordIOError, match="x.rec: record 0 is a header"):
            parse_header(IRHeader(len(bad), np.array(bad, np.float32), 0, 0), "x.rec")


def test_read_property(tmp_path):
    assert read_property(str(tmp_path / "property")) is None
    (tmp_path / "property").write_text("93431,112,112\n")
    assert read_property(str(tmp_path / "property")) == 93431
    for text in ("0,112,112", "abc", ""):
        (tmp_path / "property").write_text(text)
        with pytest.raises(RecordIOError, match="num_classes,height,width"):
            read_property(str(tmp_path / "property"))


def test_class_bound_takes_the_tightest_known_count(tmp_path):
    rec = str(tmp_path / "train.rec")
    assert class_bound(rec, None).num_classes is None
    assert class_bound(rec, (10, 14)).num_classes == 4  # identity records 10..13
    (tmp_path / "property").write_text("3,112,112")
    assert class_bound(rec, (10, 14)) == (3, f"num_classes 3 in {tmp_path / 'property'}")
    assert class_bound(str(tmp_path / "other.rec"), (10, 14)).num_classes == 4  # property only beside train.rec
    assert class_bound(rec, (FLOAT32_EXACT, FLOAT32_EXACT + 8)).num_classes == 3  # a rounded header range is not used


def test_check_label_names_the_record_and_the_bound():
    bound = ClassBound(4, "the 4 identity records named by record 0")
    assert check_label(3.0, bound, "t.rec", 7) == 3
    for label in (4.0, -1.0, 1.5, float("nan")):
        with pytest.raises(RecordIOError, match=r"t.rec: record 7 \(dataset position 2\) has label .*\[0, 4\)"):
            check_label(label, bound, "t.rec", 7, position=2)
    assert check_label(10**6, ClassBound(None, "none"), "t.rec", 1) == 10**6
