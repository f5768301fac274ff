"""Small scoring outputs for the review tests, written with pyarrow in the schema score_archive writes
(scoring.archive.IMAGE_RESULT_SCHEMA), with real image files behind them."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from fracray.scoring.archive import IMAGE_RESULT_SCHEMA, _study_table

CLASSIFIER = "fracture_wrist:efficientnet_lite0@2026-01-01T00:00:00+00:00"


def _radiograph(path: Path, seed: int, size=(320, 256)) -> None:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.normal(40, 8, size[::-1]).clip(0, 255)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.rectangle([size[0] // 3, 20, size[0] // 3 + 60, size[1] - 20], fill=200)  # a bone
    draw.line([size[0] // 3, size[1] // 2, size[0] // 3 + 60, size[1] // 2 + 10], fill=30, width=3)  # a crack
    img.save(path)


def make_run(root: Path, studies: int = 12, images_per_study: int = 2, *, with_dates: bool = True,
             missing_image: str | None = None) -> Path:
    """A scoring output under root/run with image files under root/archive. Study k has probability
    rising with k; every third study has findings; body parts alternate wrist/hand.
    ``missing_image``: a study id whose first image file is deleted after scoring."""
    archive, run = root / "archive", root / "run"
    (run / "images").mkdir(parents=True)
    rows = []
    for k in range(studies):
        sid = f"patient{k:03d}/study1"
        (archive / sid).mkdir(parents=True, exist_ok=True)
        for j in range(images_per_study):
            path = archive / sid / f"image{j}.png"
            _radiograph(path, seed=k * 10 + j)
            prob = round(0.05 + 0.9 * k / max(studies - 1, 1) + 0.01 * j, 4)
            findings = ([{"x0": 100, "y0": 100, "x1": 170, "y1": 150, "score": 0.8, "peak_x": 130, "peak_y": 125},
                         {"x0": 40, "y0": 30, "x1": 80, "y1": 70, "score": 0.4, "peak_x": 60, "peak_y": 50}]
                        if k % 3 == 2 else [])
            rows.append({
                "image_uri": str(path), "study_id": sid, "status": "ok", "error": None,
                "body_part": "wrist" if k % 2 == 0 else "hand", "body_part_probability": 0.9,
                "fracture_probability": min(prob, 0.999), "label": int(prob >= 0.5), "threshold": 0.5,
                "classifier": CLASSIFIER, "router": "router:efficientnet_lite0@2026-01-01", "engine": "onnxruntime-float32",
                "width": 320, "height": 256, "sop_instance_uid": None, "findings": findings,
                "layout_body_part": None, "known_label": -1, "chunk_id": k // 4,
                "study_date": dt.date(2026, 1, 1 + k % 28) if with_dates else None,
                "manufacturer": "ACME" if with_dates else None, "manufacturer_model": "DR-1" if with_dates else None,
            })
    schema = IMAGE_RESULT_SCHEMA if with_dates else pa.schema(
        [f for f in IMAGE_RESULT_SCHEMA if f.name not in ("study_date", "manufacturer", "manufacturer_model")])
    table = pa.Table.from_pylist(rows, schema=schema)
    for chunk in sorted({r["chunk_id"] for r in rows}):
        pq.write_table(table.filter(pa.compute.equal(table["chunk_id"], chunk)),
                       run / "images" / f"part-{chunk:06d}.parquet")
    rejects = pa.Table.from_pylist([{"image_uri": str(archive / "notes.txt"), "study_id": None, "status": "stray_file",
                                     "error": "not an image", "label": -1, "known_label": -1, "chunk_id": -1}],
                                   schema=schema)
    pq.write_table(rejects, run / "images" / "part-rejects.parquet")
    full = pa.Table.from_pylist(rows, schema=IMAGE_RESULT_SCHEMA) if with_dates else table
    pq.write_table(_study_table(full), run / "studies.parquet")
    (run / "summary.json").write_text(json.dumps({"input": str(archive), "models": None, "output": str(run),
                                                  "inputs": len(rows) + 1, "scored": len(rows), "studies": studies}))
    if missing_image:
        (archive / missing_image / "image0.png").unlink()
    return run
