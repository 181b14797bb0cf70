"""Small, deterministic synthetic datasets that need time to solve, written as real shards.

**Video ("moving digits").** A digit glyph (hand-made 5x7 bitmap font, so the pixels do not depend on
the installed fonts) moves over a static cluttered background while distractor blobs drift and
bounce. The class is the digit's *motion*, in four time-reversed pairs::

    0 left       1 right              (translation, x decreasing / increasing)
    2 up         3 down               (translation, y decreasing / increasing)
    4 clockwise  5 counterclockwise   (orbit around a point, on screen)
    6 grow       7 shrink             (scale increasing / decreasing)

The second class of each pair is generated as the exact time reversal of the first (render a
clip of the first class, reverse the frame order). Clips of both classes are drawn from the same
distribution of backgrounds, digits, paths and distractors, and every ingredient other than the
digit's motion is itself reversal-symmetric (static background, distractors with uniformly random
direction bouncing in a box, whose uniform start distribution the motion preserves), so

    P(clip | second class) = P(reversed clip | first class).

A model that ignores frame order sees the same distribution of frame multisets for both classes
of a pair and cannot beat 50% within a pair (25% over the 8 classes if it identifies the pair).
Only the encoder adds a (tiny) asymmetry: mp4 compresses the reversed frame sequence slightly
differently; the default quality keeps that far below what a model could exploit.

**Images ("cluttered digits").** Ten classes ``zero`` ... ``nine``: a digit glyph at random scale,
rotation, position and colour on a gradient, clutter or noise background with distractor shapes.
Every fifth image is a PNG, the rest JPEG, so readers exercise both decoders.

Everything is seeded per sample (``seed``, kind, split, index), so shards are byte-identical
across runs and worker counts. See :data:`VIDEO_PRESETS` / :data:`IMAGE_PRESETS` for the sizes.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from datasets.build import build_shards
from datasets.encode import encode_video
from datasets.manifest import Manifest, ManifestError, read_manifest
from datasets.writer import PlanItem

__all__ = [
    "IMAGE_CLASSES",
    "IMAGE_PRESETS",
    "REVERSAL_PAIRS",
    "VIDEO_CLASSES",
    "VIDEO_PRESETS",
    "ImagePreset",
    "VideoPreset",
    "ensure_synthetic",
    "make_synthetic",
    "render_digit_image",
    "render_moving_digit",
    "sample_rng",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when the pixels change: it enters the shard fingerprints
VIDEO_CLASSES = ("left", "right", "up", "down", "clockwise", "counterclockwise", "grow", "shrink")
REVERSAL_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7))
IMAGE_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "val")
_KIND_CODE = {"video": 0, "image": 1}
_SPLIT_CODE = {"train": 0, "val": 1}


@dataclass(frozen=True)
class VideoPreset:
    num_train: int
    num_val: int
    size: int  # frames are size x size
    num_frames: int
    fps: float
    shard_size: int  # samples per shard: several shards per split so loaders can spread them over workers
    crf: int = 18
    # Distractor blobs travel this fraction of the frame per clip (uniform range). Fast distractors
    # (the default) make the digit's motion hard to pick out; the demo uses slow ones so a small
    # model learns in minutes on a CPU. Both keep the time-reversal symmetry.
    distractor_speed: tuple[float, float] = (0.3, 0.9)


@dataclass(frozen=True)
class ImagePreset:
    num_train: int
    num_val: int
    size: int
    shard_size: int


VIDEO_PRESETS = {
    "smoke": VideoPreset(num_train=48, num_val=24, size=32, num_frames=16, fps=8, shard_size=12),
    # Learnable by a small 3D CNN in minutes on a CPU: enough clips (8 classes x 200) and slow distractors.
    "demo": VideoPreset(num_train=1600, num_val=160, size=32, num_frames=16, fps=10, shard_size=100,
                        distractor_speed=(0.0, 0.1)),
    "full": VideoPreset(num_train=2400, num_val=480, size=112, num_frames=32, fps=12, shard_size=100),
}
IMAGE_PRESETS = {
    "smoke": ImagePreset(num_train=100, num_val=50, size=32, shard_size=25),
    "demo": ImagePreset(num_train=1000, num_val=200, size=32, shard_size=125),
    "full": ImagePreset(num_train=10000, num_val=2000, size=64, shard_size=1000),
}

# 5x7 bitmap digits: 7 rows of 5 columns, '#' = ink.
_FONT_ROWS = {
    0: [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."],
    1: ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
    2: [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
    3: ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."],
    4: ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
    5: ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
    6: ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."],
    7: ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
    8: [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
    9: [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."],
}
GLYPHS = {d: np.array([[c == "#" for c in row] for row in rows], dtype=np.float32)  # (7, 5)
          for d, rows in _FONT_ROWS.items()}


def sample_rng(seed: int, kind: str, split: str, index: int) -> np.random.Generator:
    """The generator for one sample: independent of how samples are split over shards or workers."""
    return np.random.default_rng([seed, _KIND_CODE[kind], _SPLIT_CODE[split], index])


# ----------------------------------------------------------------------------- drawing helpers


def _glyph_mask(digit: int, height: float, angle: float = 0.0) -> np.ndarray:
    """Anti-aliased digit mask in [0, 1], ``height`` pixels tall (7 font rows), rotated by ``angle`` degrees."""
    up = np.kron(GLYPHS[digit], np.ones((8, 8), np.float32))  # (56, 40): smooth edges after resizing
    img = Image.fromarray((up * 255).astype(np.uint8), mode="L")
    h = max(3, int(round(height)))
    w = max(2, int(round(height * 5 / 7)))
    img = img.resize((w, h), Image.Resampling.BILINEAR)
    if angle:
        img = img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    return np.asarray(img, dtype=np.float32) / 255.0  # (h, w)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 max filter: the glyph plus a one-pixel outline ring."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    return np.max([p[i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)


def _paste(canvas: np.ndarray, mask: np.ndarray, color: np.ndarray, cx: float, cy: float) -> None:
    """Alpha-blend ``color`` through ``mask`` (h, w) centred at (cx, cy) into ``canvas`` (H, W, 3), clipped."""
    H, W = canvas.shape[:2]
    h, w = mask.shape
    x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if xa >= xb or ya >= yb:
        return
    m = mask[ya - y0:yb - y0, xa - x0:xb - x0, None]  # (h', w', 1)
    region = canvas[ya:yb, xa:xb]
    region *= 1.0 - m
    region += m * color


def _draw_glyph(canvas: np.ndarray, mask: np.ndarray, color: np.ndarray, outline: np.ndarray,
                cx: float, cy: float) -> None:
    ring = _dilate(np.pad(mask, 1))
    _paste(canvas, ring, outline, cx, cy)
    _paste(canvas, np.pad(mask, 1), color, cx, cy)


def _bright_color(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour with a bright channel, so the glyph stands out with its dark outline."""
    c = rng.uniform(0, 120, size=3)
    c[rng.integers(3)] = rng.uniform(220, 255)
    c[rng.integers(3)] = max(c[rng.integers(3)], rng.uniform(150, 255))
    return c.astype(np.float32)


def _background(rng: np.random.Generator, size: int, style: str | None = None) -> np.ndarray:
    """Static clutter: a two-colour gradient, random rectangles/ellipses/lines and a fixed noise texture."""
    style = style or ("clutter" if rng.random() < 0.7 else str(rng.choice(["gradient", "noise"])))
    c0, c1 = rng.uniform(30, 200, size=3), rng.uniform(30, 200, size=3)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = np.clip(0.5 + (xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta), 0, 1)[..., None]
    bg = (1 - t) * c0 + t * c1  # (S, S, 3)
    img = Image.fromarray(bg.astype(np.uint8), mode="RGB")
    if style == "clutter":
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(6, 14))):
            x0, y0 = rng.uniform(-0.2, 1.0, size=2) * size
            w, h = rng.uniform(0.08, 0.45, size=2) * size
            fill = tuple(int(v) for v in rng.uniform(20, 210, size=3))
            shape = rng.integers(3)
            if shape == 0:
                draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
            elif shape == 1:
                draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
            else:
                draw.line([x0, y0, x0 + w, y0 + h], fill=fill, width=max(1, size // 32))
    out = np.asarray(img, dtype=np.float32)
    sigma = 18.0 if style == "noise" else 6.0
    return np.clip(out + rng.normal(0, sigma, size=out.shape), 0, 255).astype(np.float32)


def _reflect(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Bounce positions into [lo, hi] (a triangle wave): billiard motion in a box."""
    span = hi - lo
    q = np.mod(p - lo, 2 * span)
    return lo + np.where(q > span, 2 * span - q, q)


# ----------------------------------------------------------------------------- video


def _canonical_path(motion: int, rng: np.random.Generator, size: int, T: int, glyph_h: float) -> np.ndarray:
    """Glyph centre and scale per frame, (T, 3) = (x, y, scale), for the FIRST class of pair ``motion``.

    x/y are pixels (x right, y down); scale multiplies ``glyph_h``. Paths stay inside the frame.
    """
    t = np.linspace(0.0, 1.0, T)  # (T,)
    traj = np.ones((T, 3), np.float64)
    if motion == 3:  # grow: scale from small to large at a fixed point
        s0, s1 = rng.uniform(0.55, 0.75), rng.uniform(1.25, 1.5)
        m = 0.5 * glyph_h * s1 + 1
        cx, cy = rng.uniform(m, size - m, size=2)
        traj[:, 0], traj[:, 1] = cx, cy
        traj[:, 2] = s0 * (s1 / s0) ** t  # geometric: constant relative growth per frame
        return traj
    s = rng.uniform(0.85, 1.15)
    traj[:, 2] = s
    m = 0.5 * glyph_h * s + 1  # keep the glyph (half height, plus outline) inside the frame
    lo, hi = m, size - m
    if motion in (0, 1):  # left / up: a segment of random length and place, travelled backwards
        length = rng.uniform(0.35, 0.65) * (hi - lo)
        start = rng.uniform(lo + length, hi)
        other = rng.uniform(lo, hi)
        along = start - length * t
        traj[:, 0], traj[:, 1] = (along, other) if motion == 0 else (other, along)
        return traj
    # clockwise on screen (y points down, so the angle increases)
    r = rng.uniform(0.18, 0.3) * size
    r = min(r, size / 2 - m - 1)
    c = size / 2 + rng.uniform(-1, 1, size=2) * max(0.0, size / 2 - m - r)
    theta0, arc = rng.uniform(0, 2 * math.pi), rng.uniform(0.6, 1.2) * math.pi
    theta = theta0 + arc * t
    traj[:, 0], traj[:, 1] = c[0] + r * np.cos(theta), c[1] + r * np.sin(theta)
    return traj


def render_moving_digit(label: int, rng: np.random.Generator, size: int = 64, num_frames: int = 16,
                        distractor_speed: tuple[float, float] = (0.3, 0.9)) -> tuple[np.ndarray, np.ndarray, int]:
    """Render one clip of class ``label`` (index into :data:`VIDEO_CLASSES`).

    Returns ``frames`` uint8 (T, H, W, 3), the digit's path (T, 3) as (centre x, centre y, glyph
    height), all in pixels with y pointing down, and the digit.
    Odd labels are the time reversal of the even label with the same ``rng`` state:
    ``render_moving_digit(1, rng_a)[0] == render_moving_digit(0, rng_b)[0][::-1]`` when ``rng_a`` and
    ``rng_b`` are in the same state.
    """
    if not 0 <= label < len(VIDEO_CLASSES):
        raise ValueError(f"label must be in [0, {len(VIDEO_CLASSES)}), got {label}")
    T = num_frames
    motion, reverse = divmod(label, 2)
    bg = _background(rng, size)
    digit = int(rng.integers(10))
    glyph_h = rng.uniform(0.28, 0.36) * size
    color, outline = _bright_color(rng), rng.uniform(0, 40, size=3).astype(np.float32)
    traj = _canonical_path(motion, rng, size, T, glyph_h)
    traj[:, 2] *= glyph_h  # (T, 3): x, y, glyph height in pixels

    # distractors: blobs in billiard motion with a uniformly random direction (reversal-symmetric)
    n_blobs = int(rng.integers(1, 4))
    blobs = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # (S, S) pixel coordinates
    for _ in range(n_blobs):
        rad = rng.uniform(0.04, 0.08) * size
        p0 = rng.uniform(rad, size - rad, size=2)
        ang, speed = rng.uniform(0, 2 * math.pi), rng.uniform(*distractor_speed) * size / T
        pos = p0[None] + np.arange(T)[:, None] * speed * np.array([math.cos(ang), math.sin(ang)])  # (T, 2)
        pos = _reflect(pos, rad, size - rad)
        blobs.append((pos, rad, rng.uniform(20, 235, size=3).astype(np.float32), bool(rng.integers(2))))

    fixed_mask = _glyph_mask(digit, traj[0, 2]) if motion != 3 else None
    frames = np.empty((T, size, size, 3), np.uint8)
    for i in range(T):
        canvas = bg.copy()
        for pos, rad, bcolor, square in blobs:
            dx, dy = xx - pos[i, 0], yy - pos[i, 1]
            if square:
                inside = np.maximum(np.abs(dx), np.abs(dy)) <= rad
            else:
                inside = dx * dx + dy * dy <= rad * rad
            canvas[inside] = bcolor
        mask = fixed_mask if fixed_mask is not None else _glyph_mask(digit, traj[i, 2])
        _draw_glyph(canvas, mask, color, outline, traj[i, 0], traj[i, 1])
        frames[i] = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    if reverse:  # the partner class IS the time reversal (see the module docstring)
        frames, traj = frames[::-1].copy(), traj[::-1].copy()
    return frames, traj, digit


def _video_sample(payload: dict[str, Any]) -> dict[str, bytes]:
    p = VIDEO_PRESETS[payload["preset"]]
    rng = sample_rng(payload["seed"], "video", payload["split"], payload["index"])
    label = payload["label"]
    frames, traj, digit = render_moving_digit(label, rng, p.size, p.num_frames, p.distractor_speed)
    data = encode_video(frames, p.fps, crf=p.crf)
    meta = {
        "video_id": payload["key"], "label": VIDEO_CLASSES[label], "fps": float(p.fps),
        "num_frames": p.num_frames, "duration": p.num_frames / p.fps, "width": p.size, "height": p.size,
        "digit": digit, "trajectory": np.round(traj, 2).tolist(),
    }
    return {"mp4": data, "cls": str(label).encode("ascii"), "json": json.dumps(meta).encode("utf-8")}


# ----------------------------------------------------------------------------- images


def render_digit_image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One image of digit ``label`` (0-9): uint8 (H, W, 3) with clutter and distractor shapes."""
    if not 0 <= label < 10:
        raise ValueError(f"label must be a digit 0-9, got {label}")
    canvas = _background(rng, size)
    draw_img = Image.fromarray(canvas.astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(draw_img)
    for _ in range(int(rng.integers(0, 3))):  # distractor shapes that are not digits
        x0, y0 = rng.uniform(0, 0.8, size=2) * size
        w = rng.uniform(0.12, 0.3) * size
        fill = tuple(int(v) for v in rng.uniform(20, 235, size=3))
        if rng.integers(2):
            draw.ellipse([x0, y0, x0 + w, y0 + w], fill=fill)
        else:
            draw.polygon([(x0, y0 + w), (x0 + w / 2, y0), (x0 + w, y0 + w)], fill=fill)
    canvas = np.asarray(draw_img, dtype=np.float32).copy()
    mask = _glyph_mask(label, rng.uniform(0.45, 0.7) * size, angle=rng.uniform(-20, 20))
    h, w = mask.shape
    cx = rng.uniform(w / 2 + 1, size - w / 2 - 1) if size - w > 2 else size / 2
    cy = rng.uniform(h / 2 + 1, size - h / 2 - 1) if size - h > 2 else size / 2
    _draw_glyph(canvas, mask, _bright_color(rng), rng.uniform(0, 40, size=3).astype(np.float32), cx, cy)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


def _image_sample(payload: dict[str, Any]) -> dict[str, bytes]:
    p = IMAGE_PRESETS[payload["preset"]]
    rng = sample_rng(payload["seed"], "image", payload["split"], payload["index"])
    label = payload["label"]
    img = Image.fromarray(render_digit_image(label, rng, p.size), mode="RGB")
    buf = io.BytesIO()
    ext = "png" if payload["index"] % 5 == 4 else "jpg"
    if ext == "png":
        img.save(buf, format="PNG", optimize=False)
    else:
        img.save(buf, format="JPEG", quality=90)
    meta = {"path": f"{payload['split']}/{IMAGE_CLASSES[label]}/{payload['key']}.{ext}", "label": IMAGE_CLASSES[label]}
    return {ext: buf.getvalue(), "cls": str(label).encode("ascii"), "json": json.dumps(meta).encode("utf-8")}


# ----------------------------------------------------------------------------- shards


def _presets(kind: str) -> dict[str, Any]:
    if kind == "video":
        return VIDEO_PRESETS
    if kind == "image":
        return IMAGE_PRESETS
    raise ValueError(f"synthetic kind must be 'video' or 'image', got {kind!r}")


def _info(kind: str, preset: str, seed: int, split: str) -> dict[str, Any]:
    info = {"source": "synthetic", "generator": f"glimpse.synthetic.{kind}/{GENERATOR_VERSION}",
            "preset": preset, "seed": seed, "split": split, **asdict(_presets(kind)[preset])}
    if kind == "video":
        info["reversal_pairs"] = [list(p) for p in REVERSAL_PAIRS]
    return info


def make_synthetic(
    out: str | os.PathLike,
    kind: str = "video",
    preset: str = "demo",
    seed: int = 0,
    *,
    workers: int = 1,
    overwrite: bool = False,
    max_count: int | None = None,
) -> dict[str, Path]:
    """Write the synthetic dataset(s) as shard folders ``out/<kind>/train`` and ``out/<kind>/val``.

    ``kind`` is ``video``, ``image`` or ``both``. Returns ``{"<kind>/<split>": folder}``. Labels cycle
    through the classes (``index % num_classes``), so every split is balanced. ``max_count``
    overrides the preset's samples per shard.
    """
    kinds = ("video", "image") if kind == "both" else (kind,)
    folders: dict[str, Path] = {}
    for k in kinds:
        presets = _presets(k)
        if preset not in presets:
            raise ValueError(f"unknown {k} preset {preset!r}: choose from {sorted(presets)}")
        p = presets[preset]
        classes = VIDEO_CLASSES if k == "video" else IMAGE_CLASSES
        maker = _video_sample if k == "video" else _image_sample
        for split, n in (("train", p.num_train), ("val", p.num_val)):
            t0 = time.perf_counter()
            folder = Path(out) / k / split
            items = []
            for i in range(n):
                key = f"{split}_{i:06d}"
                items.append(PlanItem(key=key, size=0, payload={
                    "preset": preset, "seed": seed, "split": split, "index": i, "key": key,
                    "label": i % len(classes),
                }))
            build_shards(
                folder, kind=k, classes=classes, items=items, make_sample=maker,
                max_count=max_count or p.shard_size, workers=workers, overwrite=overwrite,
                options={"generator": f"{k}/{GENERATOR_VERSION}"},
                args={"kind": k, "preset": preset, "seed": seed},
                info=_info(k, preset, seed, split), desc=f"{k}/{split}",
            )
            log.info("synthetic %s/%s (%s, seed %d): %d samples in %.1fs", k, split, preset, seed, n,
                     time.perf_counter() - t0)
            folders[f"{k}/{split}"] = folder
    return folders


def _existing(target: Path, kind: str, preset: str, seed: int) -> bool:
    """True if ``target`` holds this exact dataset; raises if it holds a different one."""
    if not target.exists():
        return False
    found = []
    for split in SPLITS:
        try:
            m: Manifest = read_manifest(target / split)
        except ManifestError as e:
            raise ValueError(f"{str(target)!r} exists but is not a complete synthetic dataset: {e}") from None
        found.append((m.info.get("generator"), m.info.get("preset"), m.info.get("seed")))
    want = (f"glimpse.synthetic.{kind}/{GENERATOR_VERSION}", preset, seed)
    if any(f != want for f in found):
        raise ValueError(
            f"{str(target)!r} holds synthetic data (generator, preset, seed) = {found[0]}, not {want}: "
            "use another root or delete the folder"
        )
    return True


def ensure_synthetic(
    root: str | os.PathLike, kind: str = "video", preset: str = "demo", seed: int = 0, *, workers: int = 1
) -> Path:
    """Return ``root/<kind>`` (with ``train/`` and ``val/`` shard folders), building it if absent.

    Cheap when present (reads two manifests). Safe when several processes call it at once: each
    builds in a private temporary folder under ``root`` and renames it into place; losers of the
    race discard their copy. Raises ``ValueError`` if ``root/<kind>`` holds a different preset/seed.
    """
    _presets(kind)
    root = Path(root)
    target = root / kind
    if _existing(target, kind, preset, seed):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-{preset}-building-", dir=root))
    try:
        make_synthetic(tmp, kind, preset, seed, workers=workers)
        try:
            os.rename(tmp / kind, target)  # atomic; fails if another process got there first
        except OSError:
            if not _existing(target, kind, preset, seed):
                raise
            log.info("%s was built concurrently by another process; using it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
