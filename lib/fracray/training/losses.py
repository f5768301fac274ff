"""The training losses: class-weighted cross-entropy or focal loss on the logits, plus the
fracture map's per-cell loss or the detector's (focal + GIoU, models.detection)."""

from __future__ import annotations



from ..models.detection import detection_loss
from .config import TrainConfig

__all__ = ["make_loss"]


def _focal_loss(logits, target, weight, gamma: float):
    import torch.nn.functional as F

    log_p = F.log_softmax(logits.float(), dim=-1)
    ce = F.nll_loss(log_p, target, weight=weight, reduction="none")
    p_t = log_p.gather(1, target[:, None]).squeeze(1).exp()
    return ((1 - p_t) ** gamma * ce).mean()


def make_loss(tc: TrainConfig, class_weights: list[float], device=None):
    """The training loss of a run: class-weighted cross-entropy (or plain, or focal) on the
    logits; with a fracture map, plus ``map_loss_weight`` x the map loss, and then it takes
    ((logits, maps), (labels, masks, mask_known))."""
    import torch
    import torch.nn.functional as F

    weight = torch.tensor(class_weights, dtype=torch.float32, device=device) if tc.loss != "ce" else None

    def classify(logits, y):
        if tc.loss == "focal":
            return _focal_loss(logits, y, weight, tc.focal_gamma)
        return F.cross_entropy(logits, y, weight=weight)

    if not tc.localization:
        return classify

    if tc.localization_head == "detector":

        def with_boxes(outputs, target):
            (logits, dense), (y, boxes, known) = outputs, target
            return classify(logits, y) + tc.map_loss_weight * detection_loss(dense, boxes, known)

        return with_boxes

    def with_map(outputs, target):
        (logits, maps), (y, mask, known) = outputs, target
        return classify(logits, y) + tc.map_loss_weight * _map_loss(maps, mask, known, tc.map_pos_weight)

    return with_map


def _map_loss(maps, mask, known, pos_weight: float):
    """Per-cell binary cross-entropy of the fracture map against the mask, on images whose
    fracture regions are known (annotated positives, and negatives: known empty). A cell is
    positive when any part of a fracture falls in it (max-pooled mask)."""
    import torch
    import torch.nn.functional as F

    if not bool(known.any()):
        return maps.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) whole
    target = (F.adaptive_max_pool2d(mask.float(), maps.shape[-2:])[:, 0] > 0.25).float()
    return F.binary_cross_entropy_with_logits(
        maps[known], target[known], pos_weight=torch.tensor(pos_weight, device=maps.device))
