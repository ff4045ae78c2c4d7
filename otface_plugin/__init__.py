"""OTFace for InsightFace's arcface_torch: margin softmax plus optimal transport on hard triplets.

Reference: Qian et al., "OTFace: Hard Samples Guided Optimal Transport Loss for Deep Face
Representation", IEEE TMM 2022, arXiv:2203.14461.
"""
__version__ = "1.0.0"

from otface_plugin.registry import available_losses, build_loss, register_loss  # noqa: E402

__all__ = ["__version__", "available_losses", "build_loss", "register_loss"]
