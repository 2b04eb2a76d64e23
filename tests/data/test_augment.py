"""Deterministic augmentation: pure in (seed, epoch, index), and RGB/depth/mask stay aligned."""
from __future__ import annotations

import pytest
import torch

from xmodal.data.augment import (
    ImageAugment, RGBDAugment, default_padding, random_crop_flip, resized_crop_box, sample_generator,
)
from xmodal.errors import DataError


def draws(seed: int, epoch: int, index: int) -> torch.Tensor:
    rng = sample_generator(seed, epoch, index)
    return torch.tensor([rng.random() for _ in range(4)])


class TestSampleGenerator:
    def test_same_key_same_stream(self):
        assert torch.equal(draws(3, 1, 7), draws(3, 1, 7))

    def test_each_part_of_the_key_matters(self):
        base = draws(3, 1, 7)
        for key in ((4, 1, 7), (3, 2, 7), (3, 1, 8), (3, 2, 6)):  # (3,2,6) would collide under seed+epoch+index
            assert not torch.equal(base, draws(*key)), key

    def test_negative_key_is_rejected(self):
        with pytest.raises(DataError, match="must be >= 0"):
            sample_generator(0, -1, 0)


def unique_image(channels: int = 3, side: int = 32) -> torch.Tensor:
    """Distinct non-zero values, so any crop/flip is identifiable."""
    return (torch.arange(channels * side * side) % 251 + 1).reshape(channels, side, side).to(torch.uint8)


class TestImageAugment:
    def test_default_padding_scales_with_side(self):
        assert (default_padding(32), default_padding(64), default_padding(96)) == (4, 8, 12)

    def test_crop_is_a_shifted_window_of_the_padded_image(self):
        image = unique_image()
        padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
        for index in range(20):
            out = random_crop_flip(image, sample_generator(0, 0, index))
            windows = [padded[:, t : t + 32, c : c + 32] for t in range(9) for c in range(9)]
            assert any(torch.equal(out, w) or torch.equal(out, w.flip(-1)) for w in windows)

    def test_pure_in_seed_epoch_index(self):
        augment = ImageAugment("crop")
        image = unique_image()
        first = augment(image, sample_generator(0, 5, 9))
        assert torch.equal(first, augment(image, sample_generator(0, 5, 9)))
        others = [augment(image, sample_generator(0, epoch, 9)) for epoch in range(6, 12)]
        assert sum(not torch.equal(first, other) for other in others) >= 5

    def test_eval_view_is_deterministic_and_sized(self):
        image = unique_image(side=96)
        assert torch.equal(ImageAugment("none")(image), image)
        out = ImageAugment("resized_crop", size=64)(image)  # no generator: eval view
        assert out.shape == (3, 64, 64) and out.dtype == torch.uint8

    def test_resized_crop_output_and_flip(self):
        augment = ImageAugment("resized_crop", size=64)
        outs = [augment(unique_image(side=96), sample_generator(1, 0, i)) for i in range(8)]
        assert all(o.shape == (3, 64, 64) and o.dtype == torch.uint8 for o in outs)
        assert len({o.numpy().tobytes() for o in outs}) == 8

    def test_resized_crop_box_respects_scale_and_ratio(self):
        for index in range(200):
            top, left, h, w = resized_crop_box(96, 96, sample_generator(0, 0, index), (0.3, 1.0), (3 / 4, 4 / 3))
            assert 0 <= top <= 96 - h and 0 <= left <= 96 - w
            assert 0.3 - 0.03 <= h * w / 96**2 <= 1.0
            assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05

    def test_bad_settings_raise(self):
        with pytest.raises(DataError, match="unknown augmentation"):
            ImageAugment("jitter")
        with pytest.raises(DataError, match="needs a target size"):
            ImageAugment("resized_crop")


def blocks_scene(height: int = 96, width: int = 128, block: int = 16) -> tuple[torch.Tensor, ...]:
    """A mosaic of flat blocks; the mask is the block's palette index (derived from the colour),
    depth is index + 1 metres, with palette entry 0 meaning missing depth (0)."""
    palette = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], dtype=torch.uint8)
    ids = torch.randint(0, len(palette), (height // block, width // block), generator=torch.Generator().manual_seed(0))
    mask = ids.repeat_interleave(block, 0).repeat_interleave(block, 1)
    image = palette[mask].permute(2, 0, 1).contiguous()
    depth = torch.where(mask == 0, 0.0, mask.float() + 1)[None]
    return image, depth, mask, palette


def classify_colours(image: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Nearest palette entry of each pixel: (3, H, W) -> (H, W)."""
    distance = (image.float()[None] - palette.float()[:, :, None, None]).pow(2).sum(1)
    return distance.argmin(0)


class TestRGBDAugment:
    def test_eval_resize_keeps_alignment(self):
        image, depth, mask, palette = blocks_scene()
        out_image, out_depth, out_mask = RGBDAugment(size=(48, 64))(image, depth, mask)
        assert out_image.shape == (3, 48, 64) and out_depth.shape == (1, 48, 64) and out_mask.shape == (48, 64)
        assert torch.equal(out_mask, classify_colours(out_image, palette))

    def test_joint_random_geometry_keeps_rgb_depth_mask_aligned(self):
        image, depth, mask, palette = blocks_scene()
        augment = RGBDAugment(size=(48, 64), scale=(1.0, 2.0))
        for index in range(12):
            out_image, out_depth, out_mask = augment(image, depth, mask, sample_generator(0, 0, index))
            assert out_mask.dtype == torch.int64 and out_depth.dtype == torch.float32
            agree = (out_mask == classify_colours(out_image, palette)).float().mean()
            assert agree > 0.97, f"draw {index}: RGB and mask agree on {agree:.3f} of pixels"
            # Nearest resampling: depth is never blended, missing (0) exactly where the mask says so.
            assert set(out_depth.unique().tolist()) <= {0.0, 2.0, 3.0, 4.0, 5.0}
            assert torch.equal(out_depth[0], torch.where(out_mask == 0, 0.0, out_mask.float() + 1))

    def test_flip_mirrors_all_three_together(self):
        image, depth, mask, _ = blocks_scene()
        augment = RGBDAugment(size=None, scale=(1.0, 1.0))  # no zoom, no crop: identity or mirror
        mirrored = 0
        for index in range(10):
            out = augment(image, depth, mask, sample_generator(0, 0, index))
            flipped = torch.equal(out[2], mask.flip(-1))
            assert flipped or torch.equal(out[2], mask)
            expected = (image.flip(-1), depth.flip(-1)) if flipped else (image, depth)
            assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
            mirrored += flipped
        assert 0 < mirrored < 10

    def test_a_misaligned_mask_would_be_caught(self):
        image, depth, mask, palette = blocks_scene()
        out_image, _, out_mask = RGBDAugment(size=(48, 64))(image, depth, mask, sample_generator(0, 0, 0))
        shifted = torch.roll(out_mask, 3, dims=1)
        assert (shifted == classify_colours(out_image, palette)).float().mean() < 0.95

    def test_pure_in_seed_epoch_index(self):
        image, depth, mask, _ = blocks_scene()
        augment = RGBDAugment(size=(48, 64))
        first = augment(image, depth, mask, sample_generator(2, 0, 3))
        again = augment(image, depth, mask, sample_generator(2, 0, 3))
        later = augment(image, depth, mask, sample_generator(2, 1, 3))
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert not all(torch.equal(a, b) for a, b in zip(first, later))

    def test_zoom_below_one_is_rejected(self):
        with pytest.raises(DataError, match="zoom"):
            RGBDAugment(scale=(0.5, 1.0))


def test_padded_crop_equals_torchvision_crop_for_every_offset():
    import random

    import torchvision.transforms.v2.functional as TF

    from xmodal.data.augment import random_crop_flip

    image = torch.randint(0, 256, (3, 8, 10), dtype=torch.uint8)

    class Fixed(random.Random):  # hands out the offsets under test, and "no flip"
        def __init__(self, top, left):
            super().__init__(0)
            self.values = [top, left]

        def randint(self, low, high):
            return self.values.pop(0)

        def random(self):
            return 0.9

    for top in range(-3, 4):
        for left in range(-3, 4):
            got = random_crop_flip(image, Fixed(top, left), padding=3)
            assert torch.equal(got, TF.crop(image, top, left, 8, 10)), (top, left)
