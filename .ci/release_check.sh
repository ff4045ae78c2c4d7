#!/usr/bin/env bash
# The release artefacts as a user gets them: build the sdist and the wheel, check their metadata,
# install the wheel (not the tree, not editable) into a fresh venv and use it there. This proves
# the wheel carries what a user needs (patches, configs, entry points), which tests run from the
# tree cannot: the tree has those files whether the wheel ships them or not.
#
# Inputs beside the checkout, each step skipped with a line saying why when absent:
#   the pinned recipe export: $ARCFACE_TORCH_DIR, else ../shared/upstream/<pins.SHARED_EXPORT>
#   real faces:               $OTFACE_SHARED_DATA/{data/extyaleb,extyaleb,.}, else ../shared/data/extyaleb
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"  # the CPU build; an unpinned torch may pull a multi-GB CUDA build
WORK="$(mktemp -d "${TMPDIR:-/tmp}/otface-release.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
say() { echo "release-check [$((SECONDS - START))s]: $*"; }
fail() { echo "release-check: FAILED: $*" >&2; exit 1; }

VERSION="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$REPO/otface_plugin/__init__.py")"
[[ -n "$VERSION" ]] || fail "no __version__ in otface_plugin/__init__.py"
grep -q "^## $VERSION\b" "$REPO/CHANGELOG.md" || fail "CHANGELOG.md has no '## $VERSION' section"

# 1. Build from a copy of the files git knows (tracked, or new and not ignored), so neither the
#    checkout's build/, *.egg-info and .venv nor stray local files reach the artefacts.
say "building sdist and wheel of otface-plugin $VERSION"
mkdir "$WORK/src"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else
    cp -a "$REPO/." "$WORK/src/"
fi
"$PYTHON" -m venv "$WORK/build-env"
"$WORK/build-env/bin/pip" install -q build twine
# sdist first, then the wheel from the unpacked sdist (python -m build's default): a file the
# sdist forgets is missing from the wheel too, and the install below fails on it
(cd "$WORK/src" && "$WORK/build-env/bin/python" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1) \
    || { tail -30 "$WORK/build.log"; fail "python -m build"; }
SDIST="$(ls "$WORK"/dist/otface_plugin-"$VERSION".tar.gz)"
WHEEL="$(ls "$WORK"/dist/otface_plugin-"$VERSION"-py3-none-any.whl)"
say "built $(basename "$SDIST") ($(du -k "$SDIST" | cut -f1) KiB), $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"

# 2. Metadata: twine's check (the long description renders), then the fields a user relies on.
"$WORK/build-env/bin/twine" check --strict "$SDIST" "$WHEEL"
"$WORK/build-env/bin/python" - "$WHEEL" "$VERSION" <<'EOF'
import sys, zipfile
from email.parser import Parser
whl, version = sys.argv[1], sys.argv[2]
z = zipfile.ZipFile(whl)
info = f"otface_plugin-{version}.dist-info"
meta = Parser().parsestr(z.read(f"{info}/METADATA").decode())
want = {"Name": "otface-plugin", "Version": version, "Requires-Python": ">=3.10",
        "Description-Content-Type": "text/markdown"}
bad = [f"{k}: {meta.get(k)!r}, expected {v!r}" for k, v in want.items() if meta.get(k) != v]
if not (meta.get("License") or meta.get("License-Expression")):
    bad.append("no licence field")
if "# otface-plugin" not in (meta.get_payload() or ""):
    bad.append("the long description is not README.md")
requires = " ".join(meta.get_all("Requires-Dist") or [])
bad += [f"Requires-Dist lacks {d}" for d in ("torch", "numpy", "pyyaml") if d not in requires]
scripts = z.read(f"{info}/entry_points.txt").decode()
bad += [f"no console script {s}" for s in
        ("otface-data", "otface-install", "otface-train", "otface-demo", "otface-bench") if s + " =" not in scripts]
names = z.namelist()
for folder in ("patches", "configs"):
    if not any(n.startswith(f"otface_plugin/{folder}/") and not n.endswith("__init__.py") for n in names):
        bad.append(f"no otface_plugin/{folder}/ files in the wheel")
if bad:
    sys.exit("release-check: metadata: " + "; ".join(bad))
print(f"metadata: {meta['Name']} {meta['Version']}, Requires-Python {meta['Requires-Python']}, "
      f"{len(meta.get_all('Requires-Dist') or [])} requirements, {scripts.count(' = ')} console scripts, "
      f"{len(names)} files in the wheel")
EOF

# 3. A user's venv: the pinned CPU torch, then the wheel, installed from a directory that is
#    not the source tree, so nothing can be imported from the checkout.
say "installing the wheel into a fresh venv ($TORCH_PIN)"
"$PYTHON" -m venv "$WORK/user"
U="$WORK/user/bin"
mkdir "$WORK/use" && cd "$WORK/use"
"$U/pip" install -q "$TORCH_PIN"
"$U/pip" install -q "$WHEEL"
LOCATION="$("$U/python" -c 'import otface_plugin as p; print(p.__file__, p.__version__)')"
[[ "$LOCATION" == "$WORK/user/"*" $VERSION" ]] || fail "otface_plugin imports from $LOCATION, not the wheel's install"
"$U/pip" show -f otface-plugin | grep -q "^Editable project location" && fail "the install is editable"
say "imported from the wheel: $LOCATION"
for cmd in otface-install otface-data otface-bench otface-demo otface-train; do
    "$U/$cmd" --help >/dev/null || fail "$cmd --help"
done

# otface-install on a copy of the pinned recipe export: patch, check, revert to the exact files
UPSTREAM="${ARCFACE_TORCH_DIR:-$REPO/../shared/upstream/$("$U/python" -m otface_plugin.arcface_torch.pins export)}"
if [[ -f "$UPSTREAM/train_v2.py" ]]; then
    cp -r "$UPSTREAM" "$WORK/arcface_torch" && chmod -R u+w "$WORK/arcface_torch"
    "$U/otface-install" "$WORK/arcface_torch" | tail -3
    "$U/otface-install" --check "$WORK/arcface_torch" | tail -1
    n_configs="$(ls "$WORK/arcface_torch/configs" | grep -c otface)"
    [[ "$n_configs" -gt 0 ]] || fail "otface-install copied no OTFace configs"
    "$U/python" -c "import ast, sys; ast.parse(open(sys.argv[1]).read())" "$WORK/arcface_torch/train_v2.py"
    "$U/otface-install" --revert "$WORK/arcface_torch" | tail -1
    diff -r -q "$UPSTREAM" "$WORK/arcface_torch" || fail "otface-install --revert left the recipe changed"
    say "otface-install: patched the recipe copy, $n_configs OTFace configs, reverted to the export byte for byte"
else
    say "SKIPPED otface-install: no arcface_torch recipe at $UPSTREAM (set ARCFACE_TORCH_DIR)"
fi

# a short demo: train on synthetic identities, verification accuracy before and after
"$U/otface-demo" --steps 30 --log-every 10 | tail -2

# otface-data on a few real faces: 4 identities x 6 images -> .rec, verified by inspect
FACES=""
if [[ -n "${OTFACE_SHARED_DATA:-}" ]]; then
    for c in "$OTFACE_SHARED_DATA/data/extyaleb" "$OTFACE_SHARED_DATA/extyaleb" "$OTFACE_SHARED_DATA"; do
        [[ -d "$c/yaleB01" ]] && { FACES="$c"; break; }
    done
elif [[ -d "$REPO/../shared/data/extyaleb/yaleB01" ]]; then
    FACES="$REPO/../shared/data/extyaleb"
fi
if [[ -n "$FACES" ]]; then
    people=("$FACES"/yaleB*/)
    for person in "${people[@]:0:4}"; do
        images=("$person"*.pgm)
        mkdir -p "$WORK/faces/$(basename "$person")"
        cp "${images[@]:0:6}" "$WORK/faces/$(basename "$person")/"
    done
    "$U/otface-data" build-rec "$WORK/faces" "$WORK/rec/" --workers 1 | tail -1
    "$U/otface-data" inspect "$WORK/rec" --verify >"$WORK/inspect.txt"
    sed -n 3,4p "$WORK/inspect.txt"
    [[ "$(cat "$WORK/rec/property")" == "4,112,112" ]] || fail "property is $(cat "$WORK/rec/property"), expected 4,112,112"
    say "otface-data: 4 identities x 6 real faces -> train.rec, verified"
else
    say "SKIPPED otface-data on real faces: no extyaleb folder (set OTFACE_SHARED_DATA)"
fi
say "release check passed for otface-plugin $VERSION in $((SECONDS - START)) s"
