"""The fracture detector: an FCOS-style dense head at stride 8 on the classifier's backbone.

    backbone stride 8 / 16 / 32 features -> feature pyramid (top-down, 1x1 laterals)
      -> P8 (stride 8) -> shared tower (2 x conv3x3 + GroupNorm + ReLU)
      -> per cell: fracture logit, box distances (left, top, right, bottom; log-space),
         centre-ness logit

One output tensor per image, ``N x 6 x H/8 x W/8`` (:data:`DENSE_CHANNELS`), so the ONNX/
OpenVINO engines, test-time flip and the data path carry it like any map. Training follows
FCOS (Tian et al. 2019) with torchvision's losses: sigmoid focal loss on every cell of
images whose fractures are boxed (non-fractured images: every cell is background), GIoU
on the positive cells, BCE on centre-ness. Decoding is scores -> top-k -> batched NMS
(torchvision.ops), boxes in model-input pixels; imaging.findings maps them to the image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, generalized_box_iou_loss, sigmoid_focal_loss

__all__ = ["DetectionHead", "DENSE_CHANNELS", "STRIDE", "flip_dense_back", "detection_targets", "detection_loss",
           "decode_dense", "dense_scores", "dense_detections", "MAX_BOXES"]

STRIDE = 8
DENSE_CHANNELS = 6          # cls, l, t, r, b (log of distance / stride), centre-ness
MAX_BOXES = 8               # boxes per image the data stream ships (FracAtlas: at most 5 here)
_MAX_LOG = math.log(4096 / STRIDE)


class DetectionHead(nn.Module):
    """Feature pyramid over strides 8/16/32 and an FCOS head at stride 8."""

    def __init__(self, c8: int, c16: int, c32: int, width: int = 64, tower: int = 1):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, width, 1) for c in (c8, c16, c32)])
        self.smooth = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(16, width),
                                    nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        for _ in range(tower):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(16, width), nn.ReLU(inplace=True)]
        self.tower = nn.Sequential(*layers)
        self.cls = nn.Conv2d(width, 1, 3, padding=1)
        self.box = nn.Conv2d(width, 4, 3, padding=1)
        self.ctr = nn.Conv2d(width, 1, 3, padding=1)
        for conv in (self.cls, self.box, self.ctr):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        # Start near "no fracture anywhere" (prior 0.01 per cell, as RetinaNet/FCOS) and boxes of ~4 cells.
        nn.init.constant_(self.cls.bias, -math.log(99.0))
        nn.init.constant_(self.box.bias, math.log(2.0))

    def forward(self, f8: torch.Tensor, f16: torch.Tensor, f32: torch.Tensor) -> torch.Tensor:
        p32 = self.lateral[2](f32)
        p16 = self.lateral[1](f16) + F.interpolate(p32, size=f16.shape[-2:], mode="nearest")
        p8 = self.lateral[0](f8) + F.interpolate(p16, size=f8.shape[-2:], mode="nearest")
        t = self.tower(self.smooth(p8))
        return torch.cat([self.cls(t), self.box(t).clamp(-4.0, _MAX_LOG), self.ctr(t)], dim=1)


def flip_dense_back(maps: torch.Tensor) -> torch.Tensor:
    """The output for a mirrored image -> the output for the image itself: flip the cells back,
    and for a detector's dense output swap the left and right distances."""
    flipped = torch.flip(maps, dims=[-1])
    if flipped.ndim == 4 and flipped.shape[1] == DENSE_CHANNELS:
        flipped = flipped[:, [0, 3, 2, 1, 4, 5]]
    return flipped


def _centres(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * STRIDE
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * STRIDE
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    return cx.reshape(-1), cy.reshape(-1)


def detection_targets(boxes: torch.Tensor, h: int, w: int, radius: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """FCOS targets for one image. ``boxes``: K x 4 (x0, y0, x1, y1) in model-input pixels
    (rows with x1 <= x0 are padding). Returns (assigned box per cell, H*W x 4; positive
    mask, H*W). A cell is positive when its centre is inside a box and within ``radius``
    strides of the box's centre (centre sampling); every box gets at least the cell nearest
    its centre, however small; a cell inside two boxes takes the smaller."""
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    cx, cy = _centres(h, w, boxes.device)
    n = cx.numel()
    if boxes.numel() == 0:
        return torch.zeros(n, 4, device=boxes.device), torch.zeros(n, dtype=torch.bool, device=boxes.device)
    x0, y0, x1, y1 = (boxes[:, i][None] for i in range(4))       # 1 x K
    bx, by = (x0 + x1) / 2, (y0 + y1) / 2
    r = radius * STRIDE
    inside = (cx[:, None] > x0) & (cx[:, None] < x1) & (cy[:, None] > y0) & (cy[:, None] < y1)
    near = ((cx[:, None] - bx).abs() < r) & ((cy[:, None] - by).abs() < r)
    candidate = inside & near
    # The cell nearest each box's centre always counts (a hairline box narrower than a cell).
    nearest = ((cx[:, None] - bx) ** 2 + (cy[:, None] - by) ** 2).argmin(dim=0)
    candidate[nearest, torch.arange(boxes.shape[0], device=boxes.device)] = True
    area = ((x1 - x0) * (y1 - y0)).expand(n, -1).masked_fill(~candidate, float("inf"))
    best_area, best = area.min(dim=1)
    positive = torch.isfinite(best_area)
    return boxes[best], positive


def _decode_boxes(reg: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Cells' log-distances (M x 4) -> boxes (M x 4, x0 y0 x1 y1) in input pixels."""
    d = reg.float().exp() * STRIDE
    return torch.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], dim=1)


def detection_loss(dense: torch.Tensor, boxes: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """FCOS loss over a batch. ``dense``: N x 6 x h x w; ``boxes``: N x K x 4 target boxes in
    input pixels (padding rows x1 <= x0); ``known``: N bools, the images whose fractures'
    places are known (boxed fractured images and non-fractured ones). Focal loss summed over
    all cells of known images / number of positives; GIoU weighted by centre-ness targets;
    centre-ness BCE on positives."""
    if not bool(known.any()):
        return dense.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) whole
    n, _, h, w = dense.shape
    cx, cy = _centres(h, w, dense.device)
    flat = dense.float().flatten(2).transpose(1, 2)                  # N x HW x 6
    cls_losses, box_terms, ctr_terms, positives = [], [], [], 0
    for i in torch.nonzero(known).flatten().tolist():
        assigned, pos = detection_targets(boxes[i].float(), h, w)
        target = pos.float()
        cls_losses.append(sigmoid_focal_loss(flat[i, :, 0], target, alpha=0.25, gamma=2.0, reduction="sum"))
        if pos.any():
            positives += int(pos.sum())
            pred = _decode_boxes(flat[i, pos, 1:5], cx[pos], cy[pos])
            tb = assigned[pos]
            l, t = (cx[pos] - tb[:, 0]).clamp(min=0), (cy[pos] - tb[:, 1]).clamp(min=0)
            r, b = (tb[:, 2] - cx[pos]).clamp(min=0), (tb[:, 3] - cy[pos]).clamp(min=0)
            centreness = torch.sqrt((torch.minimum(l, r) / torch.maximum(l, r).clamp(min=1e-6)) *
                                    (torch.minimum(t, b) / torch.maximum(t, b).clamp(min=1e-6)))
            # The forced centre cell of a box thinner than a cell can sit outside it: give it a floor.
            centreness = centreness.clamp(min=0.1)
            box_terms.append((generalized_box_iou_loss(pred, tb, reduction="none") * centreness).sum()
                             / 1.0)
            ctr_terms.append(F.binary_cross_entropy_with_logits(flat[i, pos, 5], centreness, reduction="sum"))
    norm = max(positives, 1)
    loss = torch.stack(cls_losses).sum() / norm
    if box_terms:
        loss = loss + 2.0 * torch.stack(box_terms).sum() / norm + torch.stack(ctr_terms).sum() / norm
    return loss


def dense_scores(dense: torch.Tensor) -> torch.Tensor:
    """Each cell's detection score: sqrt(P(fracture) x centre-ness), as FCOS ranks boxes.
    ``dense``: (N x) 6 x h x w -> (N x) h x w."""
    return torch.sqrt(torch.sigmoid(dense[..., 0, :, :].float()) * torch.sigmoid(dense[..., 5, :, :].float()))


def decode_dense(dense: torch.Tensor, *, min_score: float = 0.05, nms_iou: float = 0.5, max_boxes: int = 5,
                 pre_nms: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's dense output (6 x h x w) -> (boxes M x 4 in input pixels, scores M), best
    first, after torchvision's NMS."""
    dense = dense.float()
    _, h, w = dense.shape
    scores = dense_scores(dense).reshape(-1)
    cx, cy = _centres(h, w, dense.device)
    keep = torch.nonzero(scores >= min_score).flatten()
    if keep.numel() > pre_nms:
        keep = keep[scores[keep].topk(pre_nms).indices]
    if keep.numel() == 0:
        return torch.zeros(0, 4), torch.zeros(0)
    reg = dense[1:5].reshape(4, -1).t()[keep]
    boxes = _decode_boxes(reg, cx[keep], cy[keep])
    s = scores[keep]
    kept = batched_nms(boxes, s, torch.zeros_like(s, dtype=torch.int64), nms_iou)[:max_boxes]
    return boxes[kept], s[kept]


def dense_detections(dense: torch.Tensor, min_score: float = 0.01):
    """One image's dense output -> (boxes K x 4 in input pixels, raw scores K, score map h x w), as
    NumPy: what the predictor and the trainer's validation predictions keep of it."""
    boxes, scores = decode_dense(dense.cpu(), min_score=min_score)
    return boxes.numpy(), scores.numpy(), dense_scores(dense.cpu()).numpy()
