"""timm:<name>, tv:<name> and a user's own module as backbones: their maps against the library's
own forward, a 3-channel weight file read by a 1-channel network (grey input = the RGB network on
grey RGB), checkpoints, bad names, and recipes end to end."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from torch import nn

from xmodal.cli import main
from xmodal.errors import ConfigError
from xmodal.models import build_model, from_module, load_backbone, save_backbone

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tv_resnet18_maps_are_torchvisions_stages():
    torch.manual_seed(0)
    net = build_model("tv:resnet18", in_channels=3, num_classes=7).eval()
    ref = torchvision.models.resnet18()
    ref.load_state_dict({k.removeprefix("trunk."): v for k, v in net.state_dict().items() if k.startswith("trunk.")},
                        strict=False)
    ref.eval()
    x = torch.randn(2, 3, 32, 32)
    f = net(x)
    with torch.no_grad():
        stem = ref.relu(ref.bn1(ref.conv1(x)))
        stages = [ref.layer1(ref.maxpool(stem))]
        for layer in (ref.layer2, ref.layer3, ref.layer4):
            stages.append(layer(stages[-1]))
    for got, want in zip(f.maps, [stem, *stages]):
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(f.pooled, torch.flatten(ref.avgpool(stages[-1]), 1), atol=1e-5)
    assert f.logits.shape == (2, 7)


def test_timm_maps_are_timms_feature_stages():
    torch.manual_seed(0)
    net = build_model("timm:resnet18", in_channels=3).eval()
    ref = timm.create_model("resnet18", features_only=True).eval()
    ref.load_state_dict({k.removeprefix("trunk."): v for k, v in net.state_dict().items()})
    x = torch.randn(2, 3, 32, 32)
    assert all(torch.allclose(a, b) for a, b in zip(net(x).maps, ref(x)))


@pytest.mark.parametrize("arch,full", [("tv:resnet18", lambda: torchvision.models.resnet18()),
                                       ("timm:resnet18", lambda: timm.create_model("resnet18"))])
def test_an_rgb_weight_file_read_by_a_grey_network(tmp_path, arch, full):
    """In the 1-channel network, the first convolution is the RGB one summed over its inputs, so
    grey input gives what the RGB network gives on the same grey in all three channels."""
    torch.manual_seed(0)
    rgb = full().eval()
    path = tmp_path / "weights.pt"
    torch.save(rgb.state_dict(), path)
    grey = build_model(arch, in_channels=1, weights=str(path)).eval()
    same_rgb = build_model(arch, in_channels=3, weights=str(path)).eval()
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(grey(x).pooled, same_rgb(x.repeat(1, 3, 1, 1)).pooled, atol=1e-4)


def test_checkpoint_round_trip(tmp_path):
    net = build_model("tv:mobilenet_v3_small", in_channels=2, num_classes=5).eval()
    back = load_backbone(save_backbone(tmp_path / "m.pt", net)).eval()
    x = torch.randn(2, 2, 32, 32)
    assert torch.equal(net(x).logits, back(x).logits)


@pytest.mark.parametrize("arch,kwargs,message", [
    ("timm:resnet1800", {}, "timm has no model 'resnet1800'"),
    ("tv:resnet1800", {}, "torchvision has no classification model 'resnet1800'"),
    ("tv:resnet18", {"weights": "/no/such.pt"}, "is not a file"),
    ("tv:resnet18", {"width": 8}, "does not take width"),
])
def test_bad_names_and_files_are_config_errors(arch, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_model(arch, in_channels=1, **kwargs)


class _Mine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.proj = nn.Linear(6, 3)

    def forward(self, x):
        return self.proj(self.b(self.a(x)).mean(dim=(2, 3)))


def test_own_module_maps_and_embedding_are_its_layers():
    torch.manual_seed(0)
    mine = _Mine()
    net = from_module(mine, maps=["a.1", "b.1"], in_channels=2, num_classes=4)
    x = torch.randn(2, 2, 16, 16)
    f = net(x)
    a = mine.a(x)
    assert torch.allclose(f.maps[0], a) and torch.allclose(f.maps[1], mine.b(a))
    assert torch.allclose(f.pooled, mine.b(a).mean(dim=(2, 3))) and f.logits.shape == (2, 4)
    projected = from_module(mine, maps=["a.1", "b.1"], in_channels=2, embedding="proj")
    assert torch.allclose(projected(x).pooled, mine(x)) and projected.num_features == 3
    with pytest.raises(ValueError, match="no graph node 'c.1'"):
        from_module(mine, maps=["c.1"], in_channels=2)


TINY = ["data.options={num_samples: 160}", "teacher.train.epochs=1", "teacher.train.batch_size=32",
        "distill.train.batch_size=32", "distill.loss_options.crd.nce_k=32", "linear_probe.epochs=2",
        "finetune.batch_size=32", "data.num_workers=0", "distill.methods=[random,kd,fitnet,crd]"]


@pytest.mark.slow
@pytest.mark.parametrize("student,teacher", [("tv:resnet18", "timm:resnet18"),
                                             ("tv:mobilenet_v3_small", "timm:mobilenetv3_small_100")])
def test_library_networks_distil_in_the_lab_recipe(tmp_path, student, teacher):
    out = tmp_path / "run"
    assert main(["run", "lab-color-transfer", "quick=true", f"student.arch={student}", f"teacher.model.arch={teacher}",
                 f"output_dir={out}", *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {r["method"] for r in report["results"]} == {"random", "kd", "fitnet", "crd"}
    assert report["teacher"]["arch"] == teacher
    # the ab student's first convolution reads two channels
    state = torch.load(out / "stages" / "distill-crd" / "final.pt", weights_only=True)
    first = next(v for k, v in state.items() if k.startswith("student.") and v.dim() == 4)
    assert first.shape[1] == 2
