"""Checkpoints: round trip, atomic write, and one clear line for each way they can mismatch."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from xmodal import __version__
from xmodal.errors import CheckpointError
from xmodal.models import build_model, load_backbone, load_weights_into, save_backbone
from xmodal.models.checkpoint import open_checkpoint, taught_by


@pytest.fixture
def saved(tmp_path):
    model = build_model("resnet8", in_channels=1, num_classes=10, width=8).eval()
    return model, save_backbone(tmp_path / "ckpt" / "student.pt", model)


def test_round_trip_rebuilds_the_same_network(saved):
    model, path = saved
    payload = torch.load(path, weights_only=True)
    assert payload["arch"] == "resnet8" and payload["in_channels"] == 1 and payload["num_classes"] == 10
    assert payload["kwargs"] == {"width": 8} and payload["xmodal_version"] == __version__
    loaded = load_backbone(path, arch="resnet8", in_channels=1, width=8).eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert [p.name for p in path.parent.iterdir()] == ["student.pt"]  # no temporary file left


def test_load_weights_into_existing_model(saved):
    model, path = saved
    target = build_model("resnet8", in_channels=1, num_classes=10, width=8)
    assert load_weights_into(target, path, role="student") is target
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), model.state_dict().values()))


def test_skip_classifier_loads_the_encoder_under_a_new_head(saved):
    model, path = saved
    target = build_model("resnet8", in_channels=1, num_classes=3, width=8)
    load_weights_into(target, path, skip_classifier=True)
    assert torch.equal(target.stem[0].weight, model.stem[0].weight) and target.fc.out_features == 3


def test_pretrained_flag_is_not_part_of_identity(tmp_path):
    """Initial-weight choices are recorded but need not match: the state dict replaces them."""
    model = build_model("efficientnet_lite0", pretrained=True).eval()
    path = save_backbone(tmp_path / "e.pt", model)
    assert torch.load(path, weights_only=True)["kwargs"] == {"pretrained": True, "input_size": None}
    into = load_weights_into(build_model("efficientnet_lite0"), path).eval()
    rebuilt = load_backbone(path).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).pooled
        torch.testing.assert_close(into(x).pooled, expected, rtol=0, atol=0)
        torch.testing.assert_close(rebuilt(x).pooled, expected, rtol=0, atol=0)


@pytest.mark.parametrize("model_kwargs,message", [
    ({"arch": "resnet32x4", "in_channels": 1, "num_classes": 10},
     "teacher checkpoint {path} holds arch 'resnet8' (in_channels=1, width=8), "
     "expected 'resnet32x4' (in_channels=1, width=16)"),
    ({"arch": "resnet8", "in_channels": 2, "num_classes": 10, "width": 8},
     "teacher checkpoint {path} holds arch 'resnet8' (in_channels=1), expected 'resnet8' (in_channels=2)"),
    ({"arch": "resnet8", "in_channels": 1, "num_classes": 10, "width": 16},
     "holds arch 'resnet8' (in_channels=1, width=8), expected 'resnet8' (in_channels=1, width=16)"),
    ({"arch": "resnet8", "in_channels": 1, "num_classes": 100, "width": 8},
     "holds arch 'resnet8' (in_channels=1, num_classes=10), "
     "expected 'resnet8' (in_channels=1, num_classes=100)"),
])
def test_identity_mismatch_names_file_and_difference(saved, model_kwargs, message):
    _, path = saved
    with pytest.raises(CheckpointError) as err:
        load_weights_into(build_model(**model_kwargs), path, role="teacher")
    assert message.format(path=path) in str(err.value)
    assert "\n" not in str(err.value)


def test_load_backbone_checks_expectations(saved):
    _, path = saved
    expected = r"holds arch 'resnet8' \(in_channels=1\), expected 'resnet8' \(in_channels=3\)"
    with pytest.raises(CheckpointError, match=expected):
        load_backbone(path, in_channels=3)


def test_state_dict_mismatches_are_listed(saved, tmp_path):
    model, path = saved
    payload = torch.load(path, weights_only=True)
    state = payload["state_dict"]
    del state["stem.1.running_mean"]
    state["extra.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(10, 99)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights_into(model, tmp_path / "bad.pt")
    text = str(err.value)
    assert f"checkpoint {tmp_path / 'bad.pt'} does not fit resnet8" in text
    assert "missing keys stem.1.running_mean" in text and "unexpected keys extra.weight" in text
    assert "shape mismatch fc.weight (10, 99) vs (10, 32)" in text


def test_missing_corrupt_and_foreign_files(tmp_path):
    model = build_model("resnet8", width=8)
    with pytest.raises(CheckpointError, match="nope.pt does not exist"):
        load_weights_into(model, tmp_path / "nope.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pt cannot be read"):
        load_backbone(tmp_path / "corrupt.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a plain state dict, not ours
    with pytest.raises(CheckpointError, match="bare.pt is not an xmodal backbone checkpoint"):
        load_weights_into(model, tmp_path / "bare.pt")


def test_failed_save_leaves_previous_file_intact(saved, monkeypatch):
    model, path = saved
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_backbone(path, build_model("resnet8", width=16))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["student.pt"]


def test_a_checkpoint_read_once_is_hashed_and_loaded_from_the_same_bytes(saved):
    # A teacher's sha256 (what its students record) and its weights come from one read: a file
    # put at the path afterwards changes neither. taught_by takes only a file so read.
    model, path = saved
    first = path.read_bytes()
    held = open_checkpoint(path, "teacher")
    assert held.sha256 == hashlib.sha256(first).hexdigest()
    torch.manual_seed(1)
    save_backbone(path, build_model("resnet8", in_channels=1, num_classes=10, width=8))
    assert path.read_bytes() != first
    x = torch.randn(2, 1, 32, 32)
    for loaded in (load_backbone(held, "teacher").eval(),
                   load_weights_into(build_model("resnet8", 1, 10, width=8), held, "teacher").eval()):
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    recorded = taught_by({"arch": "resnet8", "checkpoint": str(path)}, held)
    assert recorded == {"arch": "resnet8", "checkpoint_sha256": held.sha256}
    with pytest.raises(ValueError, match="must be passed as read"):
        taught_by({"checkpoint": str(path)}, None)
    assert taught_by({"arch": "resnet8", "checkpoint": None}, None) == {"arch": "resnet8", "checkpoint": None}


def test_safetensors_export_carries_its_network_and_refuses_tampering(tmp_path):
    import safetensors.torch
    from safetensors import safe_open

    from xmodal.errors import CheckpointError
    from xmodal.models.checkpoint import weights_sha256

    torch.manual_seed(0)
    net = build_model("resnet8", 2, 10, width=4).eval()
    path = save_backbone(tmp_path / "s.safetensors", net)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    info = json.loads(meta["xmodal"])
    assert (info["arch"], info["in_channels"], info["num_classes"], info["kwargs"]) == ("resnet8", 2, 10, {"width": 4})
    tensors = safetensors.torch.load_file(path)  # any safetensors reader
    assert meta["weights_sha256"] == weights_sha256(tensors)  # what any reader gets is what was hashed
    x = torch.randn(2, 2, 32, 32)
    assert torch.equal(load_backbone(path).eval()(x).logits, net(x).logits)
    # the same tensors with one weight changed, under the original metadata: refused
    tensors["fc.weight"] = tensors["fc.weight"] + 1e-3
    safetensors.torch.save_file(tensors, tmp_path / "t.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match="do not match the sha256"):
        load_backbone(tmp_path / "t.safetensors")
    # a safetensors file that xmodal did not write
    safetensors.torch.save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="without xmodal's metadata"):
        load_backbone(tmp_path / "other.safetensors")
    # the former format still loads
    assert torch.equal(load_backbone(save_backbone(tmp_path / "old.pt", net)).eval()(x).logits, net(x).logits)
