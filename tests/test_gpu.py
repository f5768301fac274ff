"""The CUDA paths: AMP + GradScaler + channels_last training, Ray Train on a GPU worker,
and GPU inference giving the CPU's answers. Skipped where there is no CUDA device (the
build machine and CI); run them on a GPU machine with `pytest tests/test_gpu.py`."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fracray.data import adapters
from fracray.data.manifest import filter_rows
from fracray.models.registry import create_model
from fracray.training.step import TrainStep, model_input, place_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (the AMP, channels_last and GPU-inference paths)")


def _jpeg(seed: int, size=(384, 320)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random(size[::-1]) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_amp_train_step_on_cuda_trains_the_trainable_layers():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = place_model(create_model("densenet121", pretrained=False, strategy="last60"), device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step = TrainStep(model, optimizer, device=device, amp=True)
    assert step.amp and step.scaler.is_enabled()
    cfg = model.preprocess_config()
    images = np.random.default_rng(0).random((8, 1, *cfg.image_size), dtype=np.float32).astype(np.float16)
    x = model_input(images, cfg, device)
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1] * 4, device=device)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    losses = [float(step(x, y)) for _ in range(6)]
    assert all(np.isfinite(losses)) and step.scaler.get_scale() > 0
    changed = {k for k, p in model.named_parameters() if not torch.equal(before[k], p.detach())}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    # GradScaler skips a step on float16 overflow (and halves its scale); after six, every trainable layer moved.
    assert changed == trainable


def test_gpu_inference_matches_cpu(untrained_index):
    from fracray.inference.predictor import FracturePredictor

    payloads = [_jpeg(i) for i in range(4)]
    # Noise images: the scope check would refuse them (noise); this test is about CPU/GPU parity.
    on_cpu = FracturePredictor(untrained_index, device="cpu", check_scope=False).predict_bytes(payloads)
    on_gpu = FracturePredictor(untrained_index, device="cuda", check_scope=False).predict_bytes(payloads)
    for a, b in zip(on_cpu, on_gpu):
        assert a["body_part"] == b["body_part"]
        assert b["fracture_probability"] == pytest.approx(a["fracture_probability"], abs=1e-3)


def test_train_classifier_on_a_gpu_worker(ray_local, tmp_path):
    import ray

    from fracray.data.synthetic import generate_mura
    from fracray.artifacts.bundle import read_bundle_meta
    from fracray.training.config import TrainConfig
    from fracray.training.trainer import train_classifier

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the local Ray sees no GPU")
    root = tmp_path / "mura"
    generate_mura(str(root), patients_per_part=3, seed=5, max_side=192, valid_fraction=0.3)
    manifest = adapters.index_mura(str(root)).manifest
    train, valid = filter_rows(manifest, split="train"), filter_rows(manifest, split="valid")
    config = TrainConfig(model="efficientnet_b0", pretrained=False, strategy="last20_bn_frozen", epochs=2,
                         batch_size=16, use_gpu=True, amp=True, early_stopping_patience=5)
    result = train_classifier(config, train, valid, output_uri=str(tmp_path / "out"), name="fracture_all")
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    meta = read_bundle_meta(result.bundle_uri)
    assert meta.training["config"]["use_gpu"] is True and meta.metrics["valid"]["n"] == valid.num_rows
