"""``fp32_stem``: a backbone's stem in float32 under mixed-precision autocast, nothing else changed."""
from __future__ import annotations

import pytest
import torch

from xmodal.errors import ConfigError
from xmodal.models import available_models, build_model
from xmodal.models.base import StagedBackbone, keep_stem_fp32
from xmodal.schema import ModelConfig
from xmodal.tasks.supervised import build_backbone

PRECISIONS = [torch.bfloat16, torch.float16]


def _pair(arch: str = "resnet8", **options):
    """The same weights twice, the second with its stem kept in float32."""
    plain = build_model(arch, in_channels=2, num_classes=3, **options)
    kept = build_model(arch, in_channels=2, num_classes=3, **options)
    kept.load_state_dict(plain.state_dict())
    keep_stem_fp32(kept, arch)
    return plain.eval(), kept.eval()


@pytest.mark.parametrize("dtype", PRECISIONS, ids=str)
@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1", "vgg8"])
def test_under_autocast_the_stem_alone_runs_in_float32(arch, dtype):
    plain, kept = _pair(arch)
    x = torch.randn(4, 2, 32, 32)
    outputs: dict[str, torch.dtype] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.dtype))
             for name, m in kept.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.autocast("cpu", dtype=dtype):
        low, high = plain(x).maps, kept(x).maps
    for hook in hooks:
        hook.remove()
    assert low[0].dtype == dtype and high[0].dtype == torch.float32
    # Every convolution of the stem computes in float32, every other one in low precision.
    stem = {name for name in outputs if name.startswith("stem")}
    assert stem and all(outputs[name] == torch.float32 for name in stem)
    assert all(d == dtype for name, d in outputs.items() if name not in stem)
    # Second formulation: the kept stem's map is the stem evaluated with no autocast at all.
    assert torch.equal(high[0], kept.stem(x))
    assert not torch.equal(high[0], low[0].float())  # and it is not the low-precision one, cast up


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1", "resnet18"])
def test_float32_runs_are_bit_identical_and_weights_untouched(arch):
    plain, kept = _pair(arch)
    x = torch.randn(4, 2, 32, 32)
    a, b = plain(x, preact=True), kept(x, preact=True)
    assert all(torch.equal(p, q) for p, q in zip(a.maps + a.preact_maps + [a.pooled, a.logits],
                                                 b.maps + b.preact_maps + [b.pooled, b.logits], strict=True))
    # Same parameters and buffers under the same names: checkpoints are those of the plain model.
    assert list(plain.state_dict()) == list(kept.state_dict())
    assert all(torch.equal(plain.state_dict()[k], t) for k, t in kept.state_dict().items())
    assert kept.build_kwargs == plain.build_kwargs


@pytest.mark.parametrize("arch", sorted(available_models()))
def test_backbones_that_cannot_keep_their_stem_say_so(arch):
    net = build_model(arch, in_channels=2)
    if isinstance(net, StagedBackbone):
        keep_stem_fp32(net, arch)
        assert net.fp32_stem
    else:
        with pytest.raises(ConfigError, match=rf"fp32_stem=true: {arch} runs its stem inside"):
            keep_stem_fp32(net, arch)


def test_model_config_switches_it_on_and_defaults_off():
    assert not build_backbone(ModelConfig("resnet8", {"width": 4}), 2, 0, seed=0).fp32_stem
    assert build_backbone(ModelConfig("resnet8", {"width": 4}, fp32_stem=True), 2, 0, seed=0).fp32_stem
    with pytest.raises(ConfigError, match="smp_resnet18 runs its stem inside"):
        build_backbone(ModelConfig("smp_resnet18", fp32_stem=True), 2, 0, seed=0)
