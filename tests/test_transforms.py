"""Video transforms (shapes, exact crop positions, flip, normalisation, factory) and timm image transforms."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datasets.specs import ImageSpec, VideoSpec
from datasets.transforms import (
    RandomHorizontalFlip,
    frames_to_cthw,
    horizontal_flip,
    image_transform,
    normalize,
    random_crop,
    random_short_side_scale,
    short_side_scale,
    uniform_crop,
    uniform_crop_offsets,
    video_transform,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def coords(h: int, w: int, t: int = 2) -> torch.Tensor:
    """(3, T, H, W) float with x[c, t, i, j] = 1000 * i + j: a crop's first value gives its offset."""
    grid = (1000 * torch.arange(h)[:, None] + torch.arange(w)[None, :]).float()
    return grid.expand(3, t, h, w).clone()


@pytest.mark.parametrize("h,w,size,out", [
    (120, 160, 128, (128, 170)),  # floor(160 * 128 / 120) = 170
    (160, 120, 128, (170, 128)),
    (64, 64, 56, (56, 56)),
    (90, 160, 128, (128, 227)),  # floor(227.55)
    (100, 100, 100, (100, 100)),  # no-op
])
def test_short_side_scale_sizes(h, w, size, out):
    for dtype in (torch.float32, torch.uint8):
        x = torch.zeros(3, 4, h, w, dtype=dtype)
        y = short_side_scale(x, size)
        assert tuple(y.shape) == (3, 4, *out) and y.dtype == dtype


def test_short_side_scale_uint8_matches_float_and_upscale_is_plain_bilinear():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 30, 40, 3), dtype=np.uint8)
    x8 = frames_to_cthw(frames)  # uint8 view
    xf = x8.float()
    for size in (24, 45):  # down and up
        y8, yf = short_side_scale(x8, size), short_side_scale(xf, size)
        assert (y8.float() - yf).abs().max() <= 1.01  # integer path rounds
    # Upscaling with antialias is ordinary bilinear interpolation (align_corners=False).
    plain = F.interpolate(xf, size=(45, 60), mode="bilinear", align_corners=False)
    assert torch.allclose(short_side_scale(xf, 45), plain, atol=1e-3)
    # Every frame is resized independently: frame t of the output depends on frame t only.
    one = short_side_scale(xf[:, 1:2], 45)
    assert torch.allclose(short_side_scale(xf, 45)[:, 1:2], one, atol=1e-4)


def test_random_short_side_scale_range():
    x = torch.zeros(3, 2, 40, 60)
    rng = np.random.default_rng(0)
    sizes = {random_short_side_scale(x, 40, 44, rng).shape[-2] for _ in range(200)}
    assert sizes == {40, 41, 42, 43, 44}


def test_random_crop_positions_and_shape():
    x = coords(10, 14)
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(400):
        c = random_crop(x, 8, rng)
        assert c.shape == (3, 2, 8, 8)
        top, left = divmod(int(c[0, 0, 0, 0]), 1000)
        assert 0 <= top <= 2 and 0 <= left <= 6
        assert torch.equal(c, x[..., top : top + 8, left : left + 8])
        seen.add((top, left))
    assert len(seen) == 3 * 7  # every position reachable
    with pytest.raises(ValueError, match="does not fit"):
        random_crop(x, 11, rng)


# (H, W, size, S) -> (top, left) for each spatial index: long side = width when W >= H
CROP_TABLE = [
    (128, 170, 112, 3, [(8, 0), (8, 29), (8, 58)]),  # left, centre, right
    (170, 128, 112, 3, [(0, 8), (29, 8), (58, 8)]),  # top, centre, bottom
    (128, 128, 112, 3, [(8, 0), (8, 8), (8, 16)]),  # square: along the width (PySlowFast)
    (128, 171, 112, 3, [(8, 0), (8, 29), (8, 59)]),  # odd margin: centre floored
    (128, 170, 112, 1, [(8, 29)]),  # S = 1: centre
    (224, 298, 224, 3, [(0, 0), (0, 37), (0, 74)]),
]


@pytest.mark.parametrize("h,w,size,S,expected", CROP_TABLE)
def test_uniform_crop_positions(h, w, size, S, expected):
    x = coords(h, w)
    for i, (top, left) in enumerate(expected):
        assert uniform_crop_offsets(h, w, size, i, S) == (top, left)
        c = uniform_crop(x, size, i, S)
        assert c.shape == (3, 2, size, size)
        assert int(c[0, 0, 0, 0]) == 1000 * top + left
        assert int(c[0, 0, -1, -1]) == 1000 * (top + size - 1) + left + size - 1


def test_uniform_crop_rejects_bad_index():
    with pytest.raises(ValueError, match="spatial_index"):
        uniform_crop(coords(20, 30), 10, 3, 3)


def test_horizontal_flip():
    x = coords(4, 5)
    f = horizontal_flip(x)
    assert torch.equal(f[..., 0], x[..., -1]) and torch.equal(horizontal_flip(f), x)
    rng = np.random.default_rng(0)
    flips = [not torch.equal(RandomHorizontalFlip(0.5)(x, rng), x) for _ in range(400)]
    assert 150 < sum(flips) < 250
    assert torch.equal(RandomHorizontalFlip(0.0)(x, None), x)  # p = 0 needs (and draws) no randomness


def test_normalize_values_and_input_untouched():
    x8 = torch.tensor([0, 255, 128], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 2, 2, 2)
    y = normalize(x8, MEAN, STD)
    assert y.dtype == torch.float32
    expected = [(0 - MEAN[0]) / STD[0], (1 - MEAN[1]) / STD[1], (128 / 255 - MEAN[2]) / STD[2]]
    assert torch.allclose(y[:, 0, 0, 0], torch.tensor(expected), atol=1e-5)
    xf = x8.float() / 255
    before = xf.clone()
    assert torch.allclose(normalize(xf, MEAN, STD), y, atol=1e-5)  # floats are taken as [0, 1]
    assert torch.equal(xf, before)
    batch = x8.unsqueeze(0).expand(4, 3, 2, 2, 2)  # (B, C, T, H, W): channels at dim -4
    assert torch.allclose(normalize(batch, MEAN, STD)[2], y)
    with pytest.raises(ValueError, match="C=3"):
        normalize(torch.zeros(4, 2, 2, 2), MEAN, STD)


def test_video_transform_train_shapes_and_determinism():
    spec = VideoSpec(num_frames=4, stride=2, crop_size=32, train_short_side=(36, 44))
    frames = np.random.default_rng(0).integers(0, 256, (4, 40, 60, 3), dtype=np.uint8)
    pipe = video_transform(True, spec)
    a = pipe(frames, np.random.default_rng(5))
    b = pipe(frames, np.random.default_rng(5))
    assert a.shape == (3, 4, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    raw = video_transform(True, spec, normalize=False)(frames, np.random.default_rng(5))
    assert raw.dtype == torch.uint8 and torch.allclose(normalize(raw, spec.mean, spec.std), a)
    with pytest.raises(ValueError, match="rng"):
        pipe(frames, None)


def test_video_transform_eval_views_are_uniform_crops_of_scaled_frames():
    spec = VideoSpec(num_frames=4, crop_size=32, train_short_side=(32, 40), eval_short_side=36, num_crops=3)
    frames = np.random.default_rng(0).integers(0, 256, (4, 40, 60, 3), dtype=np.uint8)
    views = video_transform(False, spec)(frames)
    assert views.shape == (3, 3, 4, 32, 32)  # (S, C, T, crop, crop)
    scaled = short_side_scale(frames_to_cthw(frames), 36)  # (3, 4, 36, 54)
    for s in range(3):
        assert torch.allclose(views[s], normalize(uniform_crop(scaled, 32, s, 3), spec.mean, spec.std))
    assert not torch.equal(views[0], views[2])


def test_hflip_zero_keeps_orientation():
    spec = VideoSpec(num_frames=2, crop_size=8, train_short_side=(8, 8), hflip=0.0)
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    frames[:, :, :4] = 255  # left half white
    for seed in range(20):
        out = video_transform(True, spec, normalize=False)(frames, np.random.default_rng(seed))
        assert int(out[0, 0, 0, 0]) == 255 and int(out[0, 0, 0, -1]) == 0


def test_image_transforms_timm():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    spec = ImageSpec(size=32, crop_pct=0.875)
    train, val = image_transform(True, spec), image_transform(False, spec)
    x = train(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    names = " ".join(type(t).__name__ for t in train.transforms)
    assert "RandomResizedCrop" in names and "RandomHorizontalFlip" in names and "RandAugment" in names
    y1, y2 = val(img), val(img)
    assert y1.shape == (3, 32, 32) and torch.equal(y1, y2)  # eval is deterministic
    # eval = resize short side to size / crop_pct (36) then centre crop 32, ImageNet normalisation
    vnames = [type(t).__name__ for t in val.transforms]
    assert vnames[:2] == ["Resize", "CenterCrop"] and "Normalize" in vnames
    assert val.transforms[0].size in (36, [36], (36,))
    no_aa = image_transform(True, ImageSpec(size=32, auto_augment=None))
    assert "RandAugment" not in " ".join(type(t).__name__ for t in no_aa.transforms)


def test_normalize_batch_is_the_float_loaders_arithmetic():
    """uint8 batches normalised on the device equal what the output="float" loader returns, bit for bit
    (same float32 multiply-add), for video (B, C, T, H, W) and images (B, C, H, W)."""
    from datasets.loader import NormalizedStack
    from datasets.transforms import normalize_batch

    g = torch.Generator().manual_seed(0)
    clips = [torch.randint(0, 256, (3, 4, 8, 8), dtype=torch.uint8, generator=g) for _ in range(3)]
    video = normalize_batch(torch.stack(clips), MEAN, STD)
    assert video.dtype == torch.float32 and video.shape == (3, 3, 4, 8, 8)
    assert torch.equal(video, NormalizedStack(MEAN, STD)(clips))
    assert torch.allclose(video, normalize(torch.stack(clips), MEAN, STD), atol=1e-6)
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8, generator=g)
    ref = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(normalize_batch(images, MEAN, STD), ref, atol=1e-5)
    assert normalize_batch(images[:, :, :0], MEAN, STD).shape == (2, 3, 0, 5)
    with pytest.raises(TypeError, match="expects a uint8 batch"):
        normalize_batch(video, MEAN, STD)  # already normalised: refused, never normalised twice
    with pytest.raises(ValueError, match="C=3"):
        normalize_batch(torch.zeros(2, 4, 5, 5, dtype=torch.uint8), MEAN, STD)
