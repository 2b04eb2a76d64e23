"""Building by name, classifier reset, input checks, and pretrained-weight plumbing."""
from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from xmodal.errors import ConfigError
from xmodal.models import Backbone, available_models, build_model

PAPER_ZOO = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
             "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13"]


def test_registry_lists_the_paper_zoo_and_library_models():
    library = ["resnet18", "resnet50", "smp_resnet18", "smp_resnet34", "efficientnet_lite0", "efficientnet_lite1",
               "efficientnet_lite2"]
    assert set(PAPER_ZOO + library) == set(available_models())


def test_unknown_arch_names_the_nearest():
    with pytest.raises(ConfigError, match="unknown arch 'resnet8x5'; did you mean 'resnet8x4'"):
        build_model("resnet8x5")
    with pytest.raises(ConfigError, match="smp has no encoder 'resnet19'; did you mean 'resnet18'"):
        build_model("smp:resnet19")


def test_unknown_keyword_lists_accepted_ones():
    with pytest.raises(ConfigError, match="resnet8 does not take widht; it takes: width"):
        build_model("resnet8", widht=8)
    with pytest.raises(ConfigError, match="multiple of 8"):
        build_model("wrn_16_2", width=12)


def test_build_records_resolved_keywords():
    model = build_model("resnet18", in_channels=1)
    assert isinstance(model, Backbone)
    assert model.build_kwargs == {"small_input": True, "weights": None}


def test_reset_classifier():
    model = build_model("resnet8", in_channels=2, width=8)
    x = torch.randn(2, 2, 32, 32)
    assert model(x).logits is None
    model.reset_classifier(4)
    assert model.num_classes == 4 and model(x).logits.shape == (2, 4)
    model.reset_classifier(0)
    assert model.fc is None and model(x).logits is None
    assert "fc.weight" not in model.state_dict()
    model.double()
    model.reset_classifier(2)
    assert model.fc.weight.dtype == torch.float64  # the new head follows the network


def test_wrong_input_channels_raise_early():
    with pytest.raises(ValueError, match=r"resnet8 expects input \(B, 2, H, W\), got \(1, 3, 32, 32\)"):
        build_model("resnet8", in_channels=2)(torch.randn(1, 3, 32, 32))


def test_torchvision_weights_are_loaded_and_adapted(monkeypatch):
    """No network here: serve torchvision's download from a fresh ResNet-18's state dict."""
    reference = torchvision.models.resnet18()
    served = reference.state_dict()
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", lambda self, **kwargs: served)
    model = build_model("resnet18", 1, 1000, small_input=False, weights="IMAGENET1K_V1")
    torch.testing.assert_close(model.stem[0].weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.stages[3][-1].conv2.weight, reference.layer4[-1].conv2.weight)
    assert torch.equal(model.fc.weight, reference.fc.weight)


def test_failed_download_is_one_clear_line(monkeypatch):
    def offline(self, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ConfigError, match=r"could not download weights 'IMAGENET1K_V1' \(needs internet\)"):
        build_model("resnet18", small_input=False, weights="IMAGENET1K_V1")
    with pytest.raises(ConfigError, match="Wrong pretrained weights `imagenet21k`"):
        build_model("smp_resnet18", weights="imagenet21k")


def test_torchvision_weights_need_the_standard_stem():
    with pytest.raises(ConfigError, match="small_input=False"):
        build_model("resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(ConfigError, match="unknown weights 'imagenet'"):
        build_model("resnet18", weights="imagenet", small_input=False)
