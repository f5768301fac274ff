"""Inference engines (fracray.inference.engine): ONNX Runtime float32 gives eager PyTorch's
outputs, the export is made once per weights and reused, the engine choice and its override,
and one runtime thread per CPU that Ray reserved."""

from __future__ import annotations

import dataclasses
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")

from conftest import write_localizing_bundle  # noqa: E402
from fracray.artifacts.bundle import load_bundle, save_bundle  # noqa: E402
from fracray.artifacts.index import read_model_index  # noqa: E402
from fracray.data.synthetic import render_radiograph  # noqa: E402
from fracray.imaging.decode import decode_image  # noqa: E402
from fracray.inference import engine as engines  # noqa: E402
from fracray.inference.predictor import BundleModel  # noqa: E402

TOLERANCE = 1e-4
KINDS = ("router", "fracture", "localizing")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as in a scoring actor with one CPU (two OpenMP threads on this loaded
    2-core machine run eager PyTorch tens of times slower); the engines follow it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory):
    """A fresh export cache for this module, through the environment as replicas would see it."""
    cache = tmp_path_factory.mktemp("engine-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(engines.CACHE_ENV, str(cache))
        mp.delenv(engines.ENGINE_ENV, raising=False)
        yield cache


@pytest.fixture(scope="module")
def bundles(untrained_index, tmp_path_factory) -> dict[str, str]:
    """Every model kind the fixtures build: the router, a fracture classifier, a fracture-map model."""
    index = read_model_index(untrained_index)
    return {"router": index.router, "fracture": index.classifiers["wrist"],
            "localizing": write_localizing_bundle(str(tmp_path_factory.mktemp("engine") / "localizing"))}


@pytest.fixture(scope="module")
def model_pairs(bundles, engine_cache) -> dict[str, tuple[BundleModel, BundleModel]]:
    """(eager torch, ONNX Runtime) BundleModels per kind."""
    pairs = {}
    for kind, uri in bundles.items():
        pairs[kind] = (BundleModel(uri, engine="torch"), BundleModel(uri, engine="onnxruntime"))
        assert pairs[kind][0].engine.name == "torch" and pairs[kind][1].engine.name == "onnxruntime"
    return pairs


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def synthetic_images() -> list:
    rng = np.random.default_rng(11)
    shapes = [("wrist", 300, 240, True), ("humerus", 260, 400, False), ("wrist", 512, 512, True)]
    return [decode_image(_png(render_radiograph(rng, part, h, w, fracture=frac).pixels)) for part, h, w, frac in shapes]


def _assert_same_outputs(pair: tuple[BundleModel, BundleModel], images: list, tta_flip: bool) -> None:
    eager, ort = pair
    eager.tta_flip = ort.tta_flip = tta_flip
    probs_t, maps_t = eager.predict(images)
    probs_o, maps_o = ort.predict(images)
    assert probs_o.shape == probs_t.shape == (len(images), len(eager.meta.classes))
    np.testing.assert_allclose(probs_o, probs_t, rtol=0, atol=TOLERANCE)
    if eager.localizes:
        assert maps_o is not None and len(maps_o) == len(maps_t) == len(images)
        for a, b in zip(maps_o, maps_t):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=TOLERANCE)
    else:
        assert maps_o is None and maps_t is None


@pytest.mark.parametrize("tta_flip", [False, True], ids=["plain", "tta_flip"])
@pytest.mark.parametrize("kind", KINDS)
def test_onnxruntime_equals_eager_torch_on_synthetic_radiographs(model_pairs, synthetic_images, kind, tta_flip):
    _assert_same_outputs(model_pairs[kind], synthetic_images, tta_flip)


@pytest.mark.shared_data
@pytest.mark.parametrize("tta_flip", [False, True], ids=["plain", "tta_flip"])
@pytest.mark.parametrize("kind", KINDS)
def test_onnxruntime_equals_eager_torch_on_real_fracatlas(model_pairs, shared_fracatlas, kind, tta_flip):
    folder = shared_fracatlas / "FracAtlas" / "images"
    paths = sorted((folder / "Fractured").glob("*.jpg"))[:2] + sorted((folder / "Non_fractured").glob("*.jpg"))[:2]
    assert len(paths) == 4
    _assert_same_outputs(model_pairs[kind], [decode_image(p.read_bytes()) for p in paths], tta_flip)


def test_gradcam_still_runs_on_torch(model_pairs, synthetic_images):
    _, ort = model_pairs["fracture"]
    heat = ort.gradcam(synthetic_images[0], max_side=64)
    assert heat.ndim == 2 and max(heat.shape) <= 64 and np.isfinite(heat).all()


# ----------------------------------------------------------------------------- the export cache

def _onnx_files(cache: Path) -> list[Path]:
    return sorted(cache.glob(f"*/{engines.MODEL_FILE}"))


def test_a_second_model_for_the_same_bundle_reuses_the_export(bundles, model_pairs, engine_cache):
    _, first = model_pairs["fracture"]
    path = first.engine.path
    assert path.parent.parent == engine_cache and path.exists()
    stamp = path.stat().st_mtime_ns
    again = BundleModel(bundles["fracture"], engine="onnxruntime")
    assert again.engine.path == path and not again.engine.exported
    assert path.stat().st_mtime_ns == stamp
    assert not list(path.parent.glob("*.tmp")), "no temporary file is left behind"


def test_the_cache_key_follows_the_weights_not_the_path(bundles, model_pairs, tmp_path, engine_cache):
    _, original = model_pairs["fracture"]
    model, meta = load_bundle(bundles["fracture"])
    copy = save_bundle(str(tmp_path / "same"), model, dataclasses.replace(meta))
    assert BundleModel(copy, engine="onnxruntime").engine.key == original.engine.key
    with torch.no_grad():
        model.head[-1].bias.add_(0.5)
    changed = save_bundle(str(tmp_path / "changed"), model, dataclasses.replace(meta))
    other = BundleModel(changed, engine="onnxruntime")
    assert other.engine.key != original.engine.key and other.engine.exported
    assert other.engine.path != original.engine.path and other.engine.path.exists()


def test_processes_starting_together_export_once(tmp_path):
    """Two engines built at once for one model (two replicas on one machine): one exports,
    the other waits for the lock and loads the finished file."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 2)).eval()
    built, errors = [], []

    def build():
        try:
            built.append(engines.OnnxRuntimeEngine(net, (3, 32, 32), cache_dir=tmp_path, threads=1))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    workers = [threading.Thread(target=build) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not errors and len(built) == 2
    assert sorted(e.exported for e in built) == [False, True]
    assert len(_onnx_files(tmp_path)) == 1
    x = torch.randn(2, 3, 32, 32)
    logits, maps = built[0].infer(x)
    assert maps is None
    np.testing.assert_allclose(logits.numpy(), net(x).detach().numpy(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- choosing the engine

def test_auto_is_onnxruntime_on_cpu_and_torch_on_cuda(monkeypatch):
    monkeypatch.delenv(engines.ENGINE_ENV, raising=False)
    assert engines.resolve_engine("auto", "cpu") == "onnxruntime"
    assert engines.resolve_engine(None, "cpu") == "onnxruntime"
    assert engines.resolve_engine("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        engines.resolve_engine("onnxruntime", "cuda")


def test_the_environment_forces_torch(bundles, engine_cache, monkeypatch):
    monkeypatch.setenv(engines.ENGINE_ENV, "torch")
    model = BundleModel(bundles["fracture"], engine="onnxruntime")
    assert model.engine.name == "torch" and isinstance(model.engine, engines.TorchEngine)
    assert engines.engine_label(model.engine) == "torch-float32"  # what answers and scoring rows say
    monkeypatch.delenv(engines.ENGINE_ENV)
    assert engines.engine_label(BundleModel(bundles["fracture"]).engine) == "onnxruntime-float32"


def test_an_unknown_engine_names_the_choices(bundles, engine_cache, monkeypatch):
    monkeypatch.delenv(engines.ENGINE_ENV, raising=False)
    with pytest.raises(ValueError, match="choose one of auto, torch, onnxruntime"):
        BundleModel(bundles["fracture"], engine="tensorrt")
    monkeypatch.setenv(engines.ENGINE_ENV, "openvino")
    with pytest.raises(ValueError, match=r"'openvino' \(\$FRACRAY_ENGINE\); choose one of auto, torch, onnxruntime"):
        BundleModel(bundles["fracture"])


# ----------------------------------------------------------------------------- threads

def test_one_runtime_thread_per_reserved_cpu_in_a_ray_actor(ray_local, tmp_path):
    ray = ray_local

    @ray.remote(num_cpus=1)
    class Probe:
        def threads(self, cache: str) -> tuple[int, int]:
            from fracray.inference import engine as eng

            torch.manual_seed(0)
            net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                      torch.nn.Linear(4, 2)).eval()
            return eng.default_threads(), eng.OnnxRuntimeEngine(net, (3, 16, 16), cache_dir=cache).threads

    probe = Probe.remote()
    try:
        assert ray.get(probe.threads.remote(str(tmp_path)), timeout=120) == (1, 1)
    finally:
        ray.kill(probe)
    # Outside Ray's workers (this driver): torch's own thread count.
    assert engines.default_threads() == max(1, torch.get_num_threads())


def test_an_export_that_does_not_match_eager_is_never_used(tmp_path, monkeypatch):
    """auto falls back to torch with a warning; onnxruntime by name raises; no file is published."""
    monkeypatch.delenv(engines.ENGINE_ENV, raising=False)
    monkeypatch.setattr(engines, "EXPORT_TOLERANCE", -1.0)  # no export can pass
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2)).eval()
    with pytest.warns(RuntimeWarning, match="ExportMismatch"):
        engine = engines.make_engine(net, (3, 16, 16), engine="auto", cache_dir=tmp_path)
    assert engine.name == "torch"
    with pytest.raises(engines.ExportMismatch):
        engines.make_engine(net, (3, 16, 16), engine="onnxruntime", cache_dir=tmp_path)
    assert _onnx_files(tmp_path) == [] and not list(tmp_path.glob("*/*.tmp"))
