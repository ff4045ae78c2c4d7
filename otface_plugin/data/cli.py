"""otface-data: build InsightFace-format face datasets (.rec/.idx, verification .bin) from
one folder per identity, inspect them, and make identity-disjoint splits. No mxnet needed."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from otface_plugin.cli_output import run_cli
from otface_plugin.data.errors import DatasetLayoutError, RecordIOError
from otface_plugin.interrupts import sigterm_as_interrupt

__all__ = ["main"]


def _identities(args) -> Optional[List[str]]:
    from otface_plugin.data.folders import read_identity_list

    return read_identity_list(args.identities_from) if args.identities_from else None


def _list_inputs(args) -> List[str]:
    """The identity list a build reads: an input that no output may overwrite."""
    return [args.identities_from] if args.identities_from else []


def _one_line_each(text: str) -> str:
    """:func:`_one_line` on each line of a multi-line report."""
    return "\n".join(map(_one_line, text.split("\n")))


def _say(msg: str, file=None) -> None:
    """Print a report line; names in it are escaped (:func:`_one_line`), so a file name that is
    not UTF-8 cannot fail the print, and so the run, after the outputs were written."""
    print(_one_line(msg), file=file or sys.stdout)


def _add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="overwrite existing outputs (never the command's own inputs)")


def _add_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resize", type=int, default=112,
                   help="square output size in pixels; 0 keeps the original size (default 112)")
    p.add_argument("--resize-mode", choices=("crop", "stretch"), default="crop",
                   help="crop: centre-crop to a square, then resize (default); stretch: resize")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    p.add_argument("--format", dest="img_fmt", choices=(".jpg", ".png"), default=".jpg")
    p.add_argument("--workers", type=int, default=1, help="encoding processes (default 1)")
    p.add_argument("--identities-from", metavar="LIST",
                   help="only these identity folders: one name per line, e.g. from `split` "
                        "(surrounding spaces are trimmed and '#' starts a comment line unless the "
                        "line is a JSON string such as \"trail \"; see docs/data.md)")
    _add_force(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="otface-data", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("build-rec", help="identity folders -> .rec/.idx (InsightFace layout)")
    p.add_argument("image_dir")
    p.add_argument("out_prefix", help="PREFIX -> PREFIX.rec/.idx; an existing directory or a "
                   "path ending in '/' -> DIR/train.rec, DIR/train.idx, DIR/property")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and list) unreadable images and empty identity folders")
    p.add_argument("--recursive", action="store_true",
                   help="include images in sub-folders of each identity folder (default: they "
                        "are left out, with a warning saying how many)")
    _add_image_options(p)

    p = sub.add_parser("build-bin", help="identity folders -> verification .bin (LFW-style)")
    p.add_argument("image_dir")
    p.add_argument("out_bin")
    p.add_argument("--pairs", type=int, help="number of pairs (half same); required unless --pairs-file")
    p.add_argument("--folds", default=None, help="identity-disjoint folds (default 10); with "
                   "--pairs-file: which of the file's folds, 1-based (e.g. 6-10 or 1,3; default all)")
    p.add_argument("--pairs-file", metavar="PAIRS_TXT",
                   help="take the pairs, in order, from an LFW-format pairs file (header '10 300', "
                   "'name i j' same and 'name1 i name2 j' different lines per fold; images "
                   "IMAGE_DIR/name/name_NNNN.jpg) instead of drawing them")
    p.add_argument("--seed", type=int, default=0)
    _add_image_options(p)

    p = sub.add_parser("inspect", help="summarise a .rec (or a directory with train.rec)")
    p.add_argument("rec")
    p.add_argument("--verify", action="store_true", help="decode every image")
    p.add_argument("--no-cache", action="store_true", help="do not read/write the label cache")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("split", help="identity-disjoint train/holdout lists of folder names")
    p.add_argument("image_dir")
    p.add_argument("--holdout-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-list", required=True, help="output: train identity names")
    p.add_argument("--holdout-list", required=True, help="output: held-out identity names")
    _add_force(p)
    return ap


def _run(args) -> int:
    progress = False if getattr(args, "no_progress", False) else None
    if args.cmd == "build-rec":
        from otface_plugin.data.rec_builder import build_rec

        r = build_rec(args.image_dir, args.out_prefix, workers=args.workers,
                      resize=args.resize or None, resize_mode=args.resize_mode,
                      skip_bad=args.skip_bad, quality=args.quality, img_fmt=args.img_fmt,
                      identities=_identities(args), overwrite=args.force, progress=progress,
                      recursive=args.recursive, inputs=_list_inputs(args))
        for path, why in r.skipped:
            _say(f"skipped {path}: {why}", file=sys.stderr)
        _say(f"wrote {r.rec} and {r.idx}" + (f" and {r.property_file}" if r.property_file
                                             else "")
             + f": {r.num_identities} identities, {r.num_images} images"
             + (f", {len(r.skipped)} skipped" if r.skipped else ""))
    elif args.cmd == "build-bin" and args.pairs_file:
        _build_bin_from_pairs_file(args, progress)
    elif args.cmd == "build-bin":
        from otface_plugin.data.bin_builder import build_bin

        if args.pairs is None:
            raise ValueError("build-bin needs --pairs N (or --pairs-file PAIRS_TXT)")
        try:
            args.folds = 10 if args.folds is None else int(args.folds)
        except ValueError:
            raise ValueError(f"--folds {args.folds!r}: a number of folds (a range like 6-10 needs "
                             "--pairs-file)") from None
        r = build_bin(args.image_dir, args.out_bin, args.pairs, folds=args.folds,
                      seed=args.seed, resize=args.resize or None, resize_mode=args.resize_mode,
                      quality=args.quality, img_fmt=args.img_fmt,
                      identities=_identities(args), workers=args.workers,
                      overwrite=args.force, progress=progress, inputs=_list_inputs(args))
        _say(f"wrote {r.path}: {r.pairs} pairs ({r.same} same), {r.folds} identity-disjoint "
             f"folds, {r.num_identities} identities, {r.num_images} images")
    elif args.cmd == "inspect":
        from otface_plugin.data.inspect_rec import format_summary, inspect_rec

        s = inspect_rec(args.rec, verify=args.verify, cache=not args.no_cache)
        print(json.dumps(s, indent=2) if args.json else _one_line_each(format_summary(s)))
    elif args.cmd == "split":
        from otface_plugin.data.atomic import atomic_outputs
        from otface_plugin.data.folders import (scan_identity_folders, split_identities,
                                                write_identity_list)

        folders = scan_identity_folders(args.image_dir, skip_empty=True)
        train, hold = split_identities([f.name for f in folders], args.holdout_fraction,
                                       args.seed)
        lists = {Path(args.train_list): train, Path(args.holdout_list): hold}
        if Path(args.train_list).resolve() == Path(args.holdout_list).resolve():
            raise ValueError("--train-list and --holdout-list are the same file")
        images = [p for f in folders for p in f.files]  # the dataset being split: never overwritten
        with atomic_outputs(list(lists), overwrite=args.force,
                            inputs=images) as tmp:  # both lists or neither
            for path, items in lists.items():
                write_identity_list(tmp[path], items)
        _say(f"{len(train)} train identities -> {args.train_list}, {len(hold)} held out -> "
             f"{args.holdout_list}")
    return 0


def _os_error(e: OSError) -> str:
    """One line for an OSError: the path and the reason, without the errno noise."""
    if e.filename is None or not e.strerror:
        return str(e)
    what = f"{e.filename}: {e.strerror}"
    if e.filename2 is not None:
        what += f" (-> {e.filename2})"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        what += " (no output was changed)"  # atomic_outputs: temp files first, then renames
    return what


def _one_line(msg: str) -> str:
    """``msg`` with control characters (a newline in a file name) and undecodable bytes
    escaped, so an error stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in msg)


def _build_bin_from_pairs_file(args, progress) -> None:
    """build-bin --pairs-file: the protocol's own pairs (LFW pairs.txt and files in its format)."""
    from otface_plugin.data.bin_builder import build_bin_from_pairs
    from otface_plugin.data.lfw_protocol import parse_folds, read_pairs_file

    for opt, val in (("--pairs", args.pairs), ("--identities-from", args.identities_from)):
        if val is not None:
            raise ValueError(f"{opt} does not apply with --pairs-file (the file lists the pairs)")
    folds = parse_folds(args.folds, len(read_pairs_file(args.pairs_file).folds))
    r = build_bin_from_pairs(args.image_dir, args.out_bin, args.pairs_file, folds=folds,
                             resize=args.resize or None, resize_mode=args.resize_mode,
                             quality=args.quality, img_fmt=args.img_fmt, workers=args.workers,
                             overwrite=args.force, progress=progress)
    _say(f"wrote {r.path}: {r.pairs} pairs ({r.same} same) from {args.pairs_file} folds "
         f"{','.join(str(k + 1) for k in folds)}, {r.num_identities} identities, {r.num_images} images")


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli("otface-data", lambda: _main(argv))


def _main(argv: Optional[List[str]]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with sigterm_as_interrupt():  # inside the try: a SIGTERM handled on the way out is still reported
            return _run(args)
    except (RecordIOError, DatasetLayoutError, FileExistsError, FileNotFoundError,
            ValueError) as e:
        msg = _one_line(_os_error(e) if isinstance(e, OSError) else str(e))
        print(f"otface-data {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, read-only or full disk, a file where a folder should be
        print(f"otface-data {args.cmd}: error: {_one_line(_os_error(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"otface-data {args.cmd}: interrupted; outputs are as before the run (or complete, "
              f"when the interrupt came after they were written)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
