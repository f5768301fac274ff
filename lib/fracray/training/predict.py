"""A trained model over a manifest, driver-side: logits (and a map's probabilities, a detector's
boxes) for every ok row, for calibration, thresholds and reports."""

from __future__ import annotations


import pyarrow as pa

from ..data.pipeline import StreamConfig, StreamTally, build_image_dataset, iter_model_batches
from ..imaging.preprocess import PreprocessConfig, finalize, to_tensor
from ..models.detection import dense_detections
from ..storage import StorageOptions

__all__ = ["predict_manifest"]


def predict_manifest(model, manifest: pa.Table, preprocess: PreprocessConfig, *,
                     storage_options: StorageOptions | None = None, batch_size: int = 64,
                     tta_flip: bool = False) -> dict[str, list]:
    """Logits (and fracture-map probabilities, for a model with a map; a detector's boxes in
    input pixels and scores, with its score map) for every ok row of a manifest: driver-side,
    for calibration, thresholds and reports."""
    import torch

    out: dict[str, list] = {"image_uri": [], "study_id": [], "image_label": [], "body_part": [], "logits": [],
                            "maps": [], "source_size": []}
    tally = StreamTally()
    model.eval()
    with torch.no_grad():
        ds = build_image_dataset(manifest, preprocess, storage_options=storage_options,
                                 stream=StreamConfig(batch_size=batch_size))
        ds.context.enable_progress_bars = False
        for batch in iter_model_batches(ds, batch_size=batch_size, tally=tally):
            x = finalize(to_tensor(batch["image"]), preprocess)
            logits, maps = model.infer(x, tta_flip=tta_flip)
            out["logits"] += logits.float().numpy().tolist()
            if maps is not None and getattr(model, "detects", False):
                out.setdefault("detections", [])
                for dense in maps:
                    boxes, scores, score_map = dense_detections(dense)
                    out["detections"].append((boxes, scores))
                    out["maps"].append(score_map)
            elif maps is not None:
                out["maps"] += list(torch.sigmoid(maps.float()).numpy())
            out["source_size"] += list(zip(batch["source_height"].tolist(), batch["source_width"].tolist()))
            for key in ("image_uri", "study_id", "image_label", "body_part"):
                out[key] += [v.item() if hasattr(v, "item") else v for v in batch[key]]
    out["rejected"] = tally.as_dict()["rejected"]
    return out
