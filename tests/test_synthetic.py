"""The synthetic radiograph generator: layouts, determinism, sizes, learnable fractures."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fracray.data import adapters
from fracray.data.synthetic import BODY_PART_BONES, generate_fracatlas, generate_mura, render_radiograph


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    generate_mura(str(tmp_path / "a"), patients_per_part=1, seed=11, max_side=128)
    generate_mura(str(tmp_path / "b"), patients_per_part=1, seed=11, max_side=128)
    generate_mura(str(tmp_path / "c"), patients_per_part=1, seed=12, max_side=128)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_mura_images_are_pngs_up_to_512_grayscale_and_rgb(mura_root):
    modes, sides = set(), []
    for p in (mura_root / "MURA-v1.1").rglob("image*.png"):
        with Image.open(p) as img:
            assert img.format == "PNG"
            modes.add(img.mode)
            sides.append(max(img.size))
    assert modes == {"L", "RGB"}
    assert max(sides) <= 256  # the fixture's max_side


def test_fracatlas_sizes_modes_and_truncation(tmp_path):
    counts = generate_fracatlas(str(tmp_path), n_images=40, seed=5, truncated=3, fractured_fraction=0.3)
    assert counts["truncated"] == 3
    sizes, modes, broken = set(), set(), 0
    for p in (tmp_path / "FracAtlas" / "images").rglob("*.jpg"):
        with Image.open(p) as img:
            sizes.add(img.size)
            modes.add(img.mode)
            try:
                img.load()
            except OSError:
                broken += 1
    assert broken == 3
    assert (2304, 2880) in sizes and {(373, 454), (454, 373)} & sizes
    assert modes == {"L", "RGB"}
    text = (tmp_path / "FracAtlas" / "dataset.csv").read_bytes()
    assert b"\r\n" in text and text.startswith(b"image_id,hand,leg,hip,shoulder,mixed,hardware")


@pytest.mark.parametrize("part", sorted(BODY_PART_BONES))
def test_fracture_is_local_and_its_box_contains_it(part):
    base = render_radiograph(np.random.default_rng(1), part, 320, 256, fracture=False, subtlety=0.2)
    broken = render_radiograph(np.random.default_rng(1), part, 320, 256, fracture=True, subtlety=0.2)
    assert base.fracture_box is None and broken.fracture_box is not None
    xc, yc, w, h = broken.fracture_box
    assert 0 < w < 0.6 and 0 < h < 0.6 and 0 <= xc <= 1 and 0 <= yc <= 1
    # The broken bone differs from an intact one inside the box (a dark line).
    x0, x1 = int((xc - w / 2) * 256), int((xc + w / 2) * 256)
    y0, y1 = int((yc - h / 2) * 320), int((yc + h / 2) * 320)
    region = broken.pixels[y0:y1, x0:x1].astype(int)
    assert region.size and region.min() < region.max()


def test_subtlety_controls_fracture_contrast():
    """Obvious fractures carve a deeper, wider lucent line than subtle ones."""
    def line_depth(subtlety):
        depths = []
        for seed in range(6):
            img = render_radiograph(np.random.default_rng(seed), "humerus", 320, 256, fracture=True,
                                    subtlety=subtlety)
            ref = render_radiograph(np.random.default_rng(seed), "humerus", 320, 256, fracture=False,
                                    subtlety=subtlety)
            depths.append(np.abs(img.pixels.astype(int) - ref.pixels.astype(int)).sum())
        return np.mean(depths)
    assert line_depth(0.05) > line_depth(0.95)


def test_generated_mura_indexes_cleanly(mura_root):
    result = adapters.index_mura(str(mura_root))
    assert result.label_disagreements == 0
    assert result.manifest.num_rows > 20
