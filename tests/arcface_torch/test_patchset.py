"""The shipped patches as data: parse, apply and un-apply (no upstream checkout needed)."""

import pytest

from otface_plugin.arcface_torch import patchset
from otface_plugin.arcface_torch.patchset import PatchError, apply_file_patch, git_blob_id, parse_patch
from otface_plugin.arcface_torch.pins import UPSTREAM_BLOBS, UPSTREAM_COMMIT

from conftest import REPO


def test_git_blob_id_matches_git_hash_object():
    # `printf 'hello\n' | git hash-object --stdin`
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


def test_every_patch_has_a_header_and_the_license_notice():
    patches = patchset.load_patches()
    assert [p.name for p in patches] == sorted(p.name for p in (REPO / "patches").glob("*.patch"))
    for p in patches:
        assert p.header.startswith("# otface-plugin:"), p.name
        assert "MIT License" in p.header and UPSTREAM_COMMIT in p.header, p.name


def test_patches_touch_only_pinned_files():
    touched = set(patchset.patches_by_file(patchset.load_patches()))
    assert touched == set(UPSTREAM_BLOBS)


def test_notice_file_names_upstream_license():
    text = (REPO / "NOTICE").read_text()
    assert "MIT License" in text and "InsightFace" in text and UPSTREAM_COMMIT in text


OLD = "a\nb\nc\nd\ne\nf\ng\nh\n"
PATCH = """\
# otface-plugin: test
--- a/x.py
+++ b/x.py
@@ -1,3 +1,4 @@
 a
+a2
 b
 c
@@ -6,3 +7,2 @@
 f
-g
 h
"""


def test_apply_and_reverse_roundtrip():
    p = parse_patch("t.patch", PATCH)
    new = apply_file_patch(p.files[0], OLD.encode())
    assert new.decode() == "a\na2\nb\nc\nd\ne\nf\nh\n"
    assert apply_file_patch(p.files[0], new, reverse=True).decode() == OLD


def test_apply_refuses_changed_context():
    p = parse_patch("t.patch", PATCH)
    with pytest.raises(PatchError, match="hunk 2 does not match"):
        apply_file_patch(p.files[0], OLD.replace("g\n", "G\n").encode())


def test_no_newline_at_end_of_file():
    text = (
        "--- a/y.py\n+++ b/y.py\n@@ -1,2 +1,3 @@\n one\n-two\n\\ No newline at end of file\n"
        "+two\n+three\n\\ No newline at end of file\n"
    )
    p = parse_patch("t.patch", text)
    assert apply_file_patch(p.files[0], b"one\ntwo") == b"one\ntwo\nthree"
    assert apply_file_patch(p.files[0], b"one\ntwo\nthree", reverse=True) == b"one\ntwo"


def test_truncated_patch_is_an_error():
    with pytest.raises(PatchError):
        parse_patch("t.patch", PATCH[:-4])


def test_recipe_without_the_plugin_refuses_every_plugin_key():
    """train_v2.py falls back to upstream when the plugin cannot be imported; a config with any
    plugin key must then stop, not train as if the key were absent. The patch cannot import the
    key list, so its copy is checked against schema.PLUGIN_KEYS here."""
    import ast
    import re

    from otface_plugin.arcface_torch.schema import PLUGIN_KEYS

    text = (REPO / "patches" / "20-otface-hooks.patch").read_text()
    line = re.search(r"^\+\s+elif any\(key in cfg for key in (\(.*?\))\):$", text, re.M)
    assert line, "the fallback's plugin-key check is missing from patch 20"
    assert set(ast.literal_eval(line.group(1))) == set(PLUGIN_KEYS)
