"""Pictures a person looks at before training: a contact sheet and image-size plots."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
from collections import defaultdict

import numpy as np
import pyarrow as pa

from .. import storage
from ..imaging.decode import ImageRejected, decode_image
from ..imaging.ops import resize
from ..storage import StorageOptions

__all__ = ["contact_sheet_png", "size_histogram_png"]

LABEL_NAMES = {1: "abnormal / fractured", 0: "normal", -1: "unlabelled"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def _thumbnail(uri: str, options: StorageOptions | None, side: int) -> np.ndarray | None:
    try:
        decoded = decode_image(storage.read_bytes(uri, options), draft_size=(side, side),
                               name=uri)
    except (ImageRejected, storage.StorageError):
        return None
    return resize(decoded.as_float(), (side, side), keep_aspect=True)


def contact_sheet_png(manifest: pa.Table, options: StorageOptions | None = None, *, per_cell: int = 4,
                      thumb: int = 160) -> bytes:
    """A grid: one row per body part x label, ``per_cell`` images each (a fixed,
    hash-based choice, so the sheet is the same every run)."""
    plt = _pyplot()
    groups: dict[tuple[str, int], list[str]] = defaultdict(list)
    for uri, part, label in zip(manifest["image_uri"].to_pylist(), manifest["body_part"].to_pylist(),
                                manifest["image_label"].to_pylist()):
        groups[(part, label)].append(uri)
    keys = sorted(groups, key=lambda k: (k[0], -k[1]))
    chosen = {k: sorted(groups[k], key=lambda u: hashlib.md5(u.encode()).hexdigest())[: per_cell * 2] for k in keys}
    with cf.ThreadPoolExecutor(16) as pool:
        thumbs = {k: [t for t in pool.map(lambda u: _thumbnail(u, options, thumb), chosen[k]) if t is not None][:per_cell]
                  for k in keys}
    rows = max(1, len(keys))
    fig, axes = plt.subplots(rows, per_cell, figsize=(per_cell * 1.9, rows * 2.0), squeeze=False)
    for r, key in enumerate(keys):
        for c in range(per_cell):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(thumbs[key]):
                ax.imshow(thumbs[key][c], cmap="gray", vmin=0, vmax=1)
            else:
                ax.set_facecolor("#f0f0f0")
            if c == 0:
                ax.set_ylabel(f"{key[0]}\n{LABEL_NAMES.get(key[1], key[1])}\n(n={len(groups[key])})", fontsize=8)
    fig.suptitle("Contact sheet: body part x label", fontsize=10)
    fig.tight_layout()
    return _png(fig, plt)


def size_histogram_png(manifest: pa.Table) -> bytes:
    """Width x height scatter (sized by count) and a histogram of the long side."""
    plt = _pyplot()
    widths = np.array([w for w in manifest["width"].to_pylist() if w is not None])
    heights = np.array([h for h in manifest["height"].to_pylist() if h is not None])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    if len(widths):
        sizes, counts = np.unique(np.stack([widths, heights], 1), axis=0, return_counts=True)
        ax1.scatter(sizes[:, 0], sizes[:, 1], s=10 + 200 * counts / counts.max(), alpha=0.6)
        for (w, h), n in sorted(zip(map(tuple, sizes), counts), key=lambda t: -t[1])[:5]:
            ax1.annotate(f"{w}x{h} ({n})", (w, h), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax2.hist(np.maximum(widths, heights), bins=40, color="#4477aa")
    else:
        for ax in (ax1, ax2):
            ax.text(0.5, 0.5, "no sizes (run with probing)", ha="center", transform=ax.transAxes)
    ax1.set_xlabel("width (px)")
    ax1.set_ylabel("height (px)")
    ax1.set_title(f"Image sizes ({len(widths)} images)")
    ax2.set_xlabel("long side (px)")
    ax2.set_ylabel("images")
    ax2.set_title("Long side")
    fig.tight_layout()
    return _png(fig, plt)


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
