"""otface_plugin.features: FeatureCapture, the forward hook that hands OTFace a layer's output."""
import pytest
import torch

from otface_plugin.features import FeatureCapture
from helpers import TinyBackbone


def test_feature_capture_unwraps_and_names_missing_layer():
    net = TinyBackbone()
    wrapped = torch.nn.DataParallel(net)
    cap = FeatureCapture(wrapped, "layer4")
    net(torch.randn(2, 3, 16, 16))
    assert cap.pop().shape == (2, 24, 4, 4)
    with pytest.raises(RuntimeError, match="no output"):
        cap.pop()
    with pytest.raises(ValueError, match="layer9"):
        FeatureCapture(net, "layer9")
