"""Modality adapters against independent computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xmodal.errors import ConfigError
from xmodal.modalities import build_modality
from xmodal.modalities.depth import encode_depth
from xmodal.modalities.lab import LAB_MEAN, LAB_STD, normalised_lab


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Textbook sRGB (D65) -> CIE Lab for an (..., 3) array in [0, 1]."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
    xyz = linear @ m.T / np.array([0.950456, 1.0, 1.088754])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    L = np.where(xyz[..., 1] > 0.008856, 116 * np.cbrt(xyz[..., 1]) - 16, 903.3 * xyz[..., 1])
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], -1)


def _denormalise(view: torch.Tensor, channels: slice) -> np.ndarray:
    mean = torch.tensor(LAB_MEAN)[channels][None, :, None, None]
    std = torch.tensor(LAB_STD)[channels][None, :, None, None]
    return (view * std + mean).permute(0, 2, 3, 1).numpy()


def test_grey_luminance_view_is_L_over_50_minus_1():
    # L_grey is the textbook L in [0, 100] put on [-1, 1]; black and white are its ends, and a grey
    # pixel's L_grey moves with its sRGB value (monotone).
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8, generator=g)
    image[0, :, 0, 0], image[0, :, 0, 1] = 0, 255
    grey = build_modality("lab", teacher_view="L_grey").views({"image": image}, ["L_grey"])["L_grey"]
    textbook = srgb_to_lab(image.permute(0, 2, 3, 1).numpy() / 255.0)[..., 0]
    np.testing.assert_allclose(grey[:, 0].numpy(), textbook / 50.0 - 1.0, atol=2e-4)
    assert grey[0, 0, 0, 0] == pytest.approx(-1.0, abs=1e-5) and grey[0, 0, 0, 1] == pytest.approx(1.0, abs=2e-4)
    levels = torch.arange(0, 256, 15, dtype=torch.uint8).view(1, 1, 1, -1).expand(1, 3, 1, -1).contiguous()
    ramp = build_modality("lab").views({"image": levels}, ["L_grey"])["L_grey"].flatten()
    assert bool((ramp[1:] > ramp[:-1]).all())


def test_lab_views_match_textbook_conversion():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=g)
    lab = build_modality("lab")
    teacher, student = lab({"image": image})
    assert teacher.shape == (3, 1, 8, 8) and student.shape == (3, 2, 8, 8)
    expected = srgb_to_lab(image.permute(0, 2, 3, 1).numpy() / 255.0)
    np.testing.assert_allclose(_denormalise(teacher, slice(0, 1))[..., 0], expected[..., 0], atol=0.05)
    np.testing.assert_allclose(_denormalise(student, slice(1, 3)), expected[..., 1:], atol=0.1)


def _kornia_normalised(rgb: torch.Tensor) -> torch.Tensor:
    from kornia.color import rgb_to_lab

    mean = torch.tensor(LAB_MEAN)[None, :, None, None]
    std = torch.tensor(LAB_STD)[None, :, None, None]
    return (rgb_to_lab(rgb) - mean) / std


def test_fused_lab_matches_kornia_on_every_8bit_level_and_on_floats():
    # Every 8-bit level in every channel, and dark colours whose XYZ falls below CIE's knee
    # (the linear piece of f) as well as bright ones; then arbitrary floats in [0, 1].
    levels = torch.arange(256, dtype=torch.uint8)
    image = torch.stack([levels, levels.roll(85), levels.flip(0)])[None, :, None, :]  # (1, 3, 1, 256)
    dark = torch.randint(0, 12, (2, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for batch in (image, dark):
        t = (_kornia_normalised(batch.float() / 255) - normalised_lab(batch)).abs().max()
        assert float(t) < 1e-4, float(t)
    assert bool((normalised_lab(dark)[:, 0] * 25 + 50 < 3).all())  # really below the knee: L* < 3
    floats = torch.rand(3, 3, 7, 7, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(normalised_lab(floats), _kornia_normalised(floats), atol=1e-4, rtol=0)


def test_fused_lab_ignores_autocast():
    image = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = normalised_lab(image)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, normalised_lab(image))


def test_lab_known_colours():
    image = torch.tensor([[255, 255, 255], [0, 0, 0], [255, 0, 0]], dtype=torch.uint8).T.reshape(1, 3, 1, 3)
    teacher, student = build_modality("lab")({"image": image})
    L = _denormalise(teacher, slice(0, 1))[0, 0, :, 0]
    ab = _denormalise(student, slice(1, 3))[0, 0]
    np.testing.assert_allclose(L, [100.0, 0.0, 53.24], atol=0.05)
    np.testing.assert_allclose(ab[0], [0.0, 0.0], atol=0.05)  # white is achromatic
    np.testing.assert_allclose(ab[2], [80.09, 67.20], atol=0.1)  # sRGB red


def test_lab_rgb_view_and_swapped_roles():
    image = torch.full((2, 3, 4, 4), 128, dtype=torch.uint8)
    swapped = build_modality("lab", teacher_view="ab", student_view="L")
    teacher, student = swapped({"image": image})
    assert swapped.teacher_channels == 2 and swapped.student_channels == 1
    assert teacher.shape[1] == 2 and student.shape[1] == 1
    rgb = build_modality("lab", teacher_view="rgb").views({"image": image}, ["rgb"])["rgb"]
    expected = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(rgb[0, :, 0, 0], expected)


def test_identity_gives_the_same_tensor_to_both():
    image = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    teacher, student = build_modality("identity")({"image": image})
    assert torch.equal(teacher, student) and teacher.shape == (2, 3, 4, 4)


def test_bad_views_and_names():
    with pytest.raises(ConfigError, match="student_view='depth' is not a view of modality 'lab'"):
        build_modality("lab", student_view="depth")
    with pytest.raises(ConfigError, match="did you mean 'lab'"):
        build_modality("labb")
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        build_modality("lab")({"image": torch.zeros(2, 1, 4, 4, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"shape \(3, 4, 4\): expected \(B, 3, H, W\)"):
        normalised_lab(torch.zeros(3, 4, 4, dtype=torch.uint8))  # one image without its batch axis


@pytest.mark.parametrize("encoding", ["log", "inverse", "linear"])
def test_depth_encodings_are_monotone_normalised_and_ignore_missing(encoding):
    depth = torch.tensor([0.5, 1.0, 2.0, 4.0, 10.0, 0.0]).reshape(1, 1, 1, 6)
    x = encode_depth(depth, encoding)[0, 0, 0]
    assert x[5] == 0.0  # missing depth carries no fake geometry
    values = x[:5]
    if encoding == "inverse":
        values = values.flip(0)
    assert bool((values[1:] > values[:-1]).all())
    # the range ends map to -+sqrt(3), the extremes of a unit-variance uniform variable
    ends = sorted([float(x[0]), float(x[4])])
    assert ends[0] == pytest.approx(-math.sqrt(3), abs=1e-5) and ends[1] == pytest.approx(math.sqrt(3), abs=1e-5)


def test_log_depth_equal_ratios_equal_steps():
    x = encode_depth(torch.tensor([1.0, 2.0, 4.0, 8.0]).reshape(1, 1, 1, 4), "log")[0, 0, 0]
    steps = x[1:] - x[:-1]
    torch.testing.assert_close(steps, torch.full_like(steps, float(steps[0])))


def test_depth_modality_views():
    batch = {"image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "depth": torch.full((2, 1, 4, 4), 2.0)}
    depth = build_modality("depth")
    teacher, student = depth(batch)
    assert teacher.shape == (2, 3, 4, 4) and student.shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="depth encoding 'sqrt'"):
        build_modality("depth", encoding="sqrt")
