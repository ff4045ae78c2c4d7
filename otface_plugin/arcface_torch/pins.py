"""The upstream version the patches are made against: the one place that names it.

Tests (``tests/conftest.py``), benchmarks, the CI scripts and the docs read the commit and the
shared export's directory name from here; shell scripts through
``python -m otface_plugin.arcface_torch.pins export`` (this module imports nothing).

Git blob ids (``git hash-object FILE``) of every file the patches touch, at the pinned commit.
The arcface_torch training code is unchanged since ab27f4d6 (2023-04-08), so any checkout whose
files have these ids is accepted, whatever its commit.
"""
UPSTREAM_REPO = "deepinsight/insightface"
UPSTREAM_COMMIT = "7fadd420c2351d0ffa8cac403421c1a3ed733365"
UPSTREAM_SHORT = UPSTREAM_COMMIT[:8]
UPSTREAM_SUBDIR = "recognition/arcface_torch"
# the pristine export of UPSTREAM_SUBDIR laid beside a checkout, at ../shared/upstream/<this>
SHARED_EXPORT = f"arcface_torch-{UPSTREAM_SHORT}"

UPSTREAM_BLOBS = {
    "dataset.py": "6cdbdcf056786c46395cc0dd60a8db0c79bc7f5b",
    "eval/verification.py": "edacf8d8136bc2dadb3d24d37fd2a812d0a443ee",
    "lr_scheduler.py": "6f3cda31d500b54b8a1ad9b36abfeff9cc754ef6",
    "partial_fc_v2.py": "0752554ca1a99c35347dce6cccd121b5cd69f9c6",
    "torch2onnx.py": "f6055d1fe7d20cbf02812d95b509511c943766de",
    "train_v2.py": "9563c6533208392ce1a81cbfaae4bcde78ade704",
    "utils/utils_config.py": "0c02eaf70fc0140aca7925f621c29a496f491cae",
    "utils/utils_distributed_sampler.py": "cea6703965bff81f8b789ffd933f9b2f889cb680",
}

# Upstream modules the no-patch wrapper (otface-train) imports but does not patch; pinned too, so
# it refuses a checkout whose training code it has not been tested with.
UPSTREAM_UNPATCHED_BLOBS = {
    "losses.py": "7d54414c77271dd6455d77b0ab06883d797fcd3a",
    "utils/utils_callbacks.py": "d9368073f8bc091b28e7325a9099881dfc5f54cd",
    "utils/utils_logging.py": "c787b6aae7cd037a4718df44d672b8ffa9e5c249",
}

_PRINTABLE = {"commit": UPSTREAM_COMMIT, "short": UPSTREAM_SHORT, "export": SHARED_EXPORT,
              "repo": UPSTREAM_REPO, "subdir": UPSTREAM_SUBDIR}

if __name__ == "__main__":  # python -m otface_plugin.arcface_torch.pins {commit|short|export|repo|subdir}
    import sys

    if len(sys.argv) != 2 or sys.argv[1] not in _PRINTABLE:
        sys.exit(f"usage: python -m otface_plugin.arcface_torch.pins {{{'|'.join(_PRINTABLE)}}}")
    print(_PRINTABLE[sys.argv[1]])
