"""``otface-bench``: ArcFace vs CosFace vs OTFace on real faces, one command, with plots.

Pipeline: identity-disjoint split of an identity-folder dataset, ``.rec``/``.bin`` built with
``otface-data``, the same small iresnet-like backbone trained with the same seed, data order
(P x K sampler) and step budget under each loss in the plugin's own minimal loop, evaluation on
the held-out pairs (10-fold accuracy, TAR@FAR, hard pairs), a JSON of all numbers, PNG plots and a
Markdown report. See ``docs/evidence.md``.
"""
__all__ = ["main"]


def main(argv=None) -> int:
    from otface_plugin.bench.cli import main as _main

    return _main(argv)
