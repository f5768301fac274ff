"""Inference engines (fracray.inference.engines): ONNX Runtime float32 gives eager PyTorch's
outputs, the export is made once per weights and reused, the engine choice and its override,
one runtime thread per CPU that Ray reserved, and the fast precision (OpenVINO bf16): close to
eager PyTorch, refused on a bundle without a passed validation, validated and recorded by
``fracray validate-fast-mode``, and followed from $FRACRAY_PRECISION."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")

from conftest import write_localizing_bundle  # noqa: E402
from fracray.artifacts.bundle import load_bundle, save_bundle  # noqa: E402
from fracray.artifacts.index import ModelIndex, read_model_index, write_model_index  # noqa: E402
from fracray.data.synthetic import render_radiograph  # noqa: E402
from fracray.imaging.decode import decode_image  # noqa: E402
from fracray.inference.engines import base, choice, factory, fast_gate, int8  # noqa: E402
from fracray.inference.engines import export as engine_export  # noqa: E402
from fracray.inference.engines import onnxruntime_engine, openvino_engine, torch_engine  # noqa: E402
from fracray.inference.predictor import BundleModel  # noqa: E402

TOLERANCE = 1e-4
# OpenVINO bf16 against eager PyTorch (float32): probabilities and fracture-map probabilities.
FAST_TOLERANCE = 2e-2
KINDS = ("router", "fracture", "localizing")
needs_openvino = pytest.mark.skipif(not choice.openvino_available(),
                                    reason="openvino is not importable (a dependency: pip install -e . installs it)")


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
        mp.setenv(engine_export.CACHE_ENV, str(cache))
        mp.delenv(choice.ENGINE_ENV, raising=False)
        mp.delenv(choice.PRECISION_ENV, raising=False)
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


def _assert_same_outputs(pair: tuple[BundleModel, BundleModel], images: list, tta_flip: bool,
                         tolerance: float = TOLERANCE) -> None:
    eager, ort = pair
    eager.tta_flip = ort.tta_flip = tta_flip
    probs_t, maps_t = eager.predict(images)
    probs_o, maps_o = ort.predict(images)
    assert probs_o.shape == probs_t.shape == (len(images), len(eager.meta.classes))
    np.testing.assert_allclose(probs_o, probs_t, rtol=0, atol=tolerance)
    if eager.localizes:
        assert maps_o is not None and len(maps_o) == len(maps_t) == len(images)
        for a, b in zip(maps_o, maps_t):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=tolerance)
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
    return sorted(cache.glob(f"*/{engine_export.MODEL_FILE}"))


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
            built.append(onnxruntime_engine.OnnxRuntimeEngine(net, (3, 32, 32), cache_dir=tmp_path, threads=1))
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
    monkeypatch.delenv(choice.ENGINE_ENV, raising=False)
    assert choice.resolve_engine("auto", "cpu") == "onnxruntime"
    assert choice.resolve_engine(None, "cpu") == "onnxruntime"
    assert choice.resolve_engine("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        choice.resolve_engine("onnxruntime", "cuda")


def test_the_environment_decides_only_where_no_engine_is_given(bundles, engine_cache, monkeypatch):
    monkeypatch.setenv(choice.ENGINE_ENV, "torch")
    model = BundleModel(bundles["fracture"])  # none given (or auto): the variable decides
    assert model.engine.name == "torch" and isinstance(model.engine, torch_engine.TorchEngine)
    assert base.engine_label(model.engine) == "torch-float32"  # what answers and scoring rows say
    assert BundleModel(bundles["fracture"], engine="auto").engine.name == "torch"
    # Given explicitly, the engine beats the variable.
    assert base.engine_label(BundleModel(bundles["fracture"], engine="onnxruntime").engine) == "onnxruntime-float32"
    monkeypatch.setenv(choice.ENGINE_ENV, "onnxruntime")
    assert base.engine_label(BundleModel(bundles["fracture"], engine="torch").engine) == "torch-float32"
    assert base.engine_label(BundleModel(bundles["fracture"]).engine) == "onnxruntime-float32"
    monkeypatch.delenv(choice.ENGINE_ENV)
    assert base.engine_label(BundleModel(bundles["fracture"]).engine) == "onnxruntime-float32"


def test_an_unknown_engine_names_the_choices(bundles, engine_cache, monkeypatch):
    monkeypatch.delenv(choice.ENGINE_ENV, raising=False)
    with pytest.raises(ValueError, match="choose one of auto, torch, onnxruntime"):
        BundleModel(bundles["fracture"], engine="tensorrt")
    monkeypatch.setenv(choice.ENGINE_ENV, "openvino")  # not an engine to choose: it is the fast precision
    with pytest.raises(ValueError, match=r"'openvino' \(\$FRACRAY_ENGINE\); choose one of auto, torch, onnxruntime "
                                         r"\(OpenVINO is the fast precision: FRACRAY_PRECISION=fast\)"):
        BundleModel(bundles["fracture"])


# ----------------------------------------------------------------------------- threads

def test_one_runtime_thread_per_reserved_cpu_in_a_ray_actor(ray_local, tmp_path):
    ray = ray_local

    @ray.remote(num_cpus=1)
    class Probe:
        def threads(self, cache: str) -> tuple[int, int]:
            from fracray.inference.engines.base import default_threads
            from fracray.inference.engines.onnxruntime_engine import OnnxRuntimeEngine

            torch.manual_seed(0)
            net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                      torch.nn.Linear(4, 2)).eval()
            return default_threads(), OnnxRuntimeEngine(net, (3, 16, 16), cache_dir=cache).threads

    probe = Probe.remote()
    try:
        assert ray.get(probe.threads.remote(str(tmp_path)), timeout=120) == (1, 1)
    finally:
        ray.kill(probe)
    # Outside Ray's workers (this driver): torch's own thread count.
    assert base.default_threads() == max(1, torch.get_num_threads())


def test_an_export_that_does_not_match_eager_is_never_used(tmp_path, monkeypatch):
    """auto falls back to torch with a warning; onnxruntime by name raises; no file is published."""
    monkeypatch.delenv(choice.ENGINE_ENV, raising=False)
    monkeypatch.setattr(engine_export, "EXPORT_TOLERANCE", -1.0)  # no export can pass
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2)).eval()
    with pytest.warns(RuntimeWarning, match="ExportMismatch"):
        engine = factory.make_engine(net, (3, 16, 16), engine="auto", cache_dir=tmp_path)
    assert engine.name == "torch"
    with pytest.raises(engine_export.ExportMismatch):
        factory.make_engine(net, (3, 16, 16), engine="onnxruntime", cache_dir=tmp_path)
    assert _onnx_files(tmp_path) == [] and not list(tmp_path.glob("*/*.tmp"))


# ----------------------------------------------------------------------------- the fast precision (OpenVINO bf16)

def _cpu_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="module")
def openvino_models(bundles, engine_cache) -> dict[str, BundleModel]:
    """Per kind, the bundle with its engine replaced by OpenVINO bf16 (the engine itself, no gate)."""
    if not choice.openvino_available():
        pytest.skip("openvino is not importable (a dependency: pip install -e . installs it)")
    out = {}
    for kind, uri in bundles.items():
        model = BundleModel(uri, engine="torch")
        model.engine = openvino_engine.OpenVinoEngine(model.model, (model.config.channels, *model.config.image_size),
                                              model_spec=model.meta.model)
        out[kind] = model
    return out


@needs_openvino
@pytest.mark.parametrize("tta_flip", [False, True], ids=["plain", "tta_flip"])
@pytest.mark.parametrize("kind", KINDS)
def test_openvino_bf16_is_close_to_eager_torch(model_pairs, openvino_models, synthetic_images, kind, tta_flip):
    _assert_same_outputs((model_pairs[kind][0], openvino_models[kind]), synthetic_images, tta_flip, FAST_TOLERANCE)


@needs_openvino
@pytest.mark.shared_data
@pytest.mark.parametrize("kind", KINDS)
def test_openvino_bf16_is_close_to_eager_torch_on_real_fracatlas(model_pairs, openvino_models, shared_fracatlas, kind):
    folder = shared_fracatlas / "FracAtlas" / "images"
    paths = sorted((folder / "Fractured").glob("*.jpg"))[:2] + sorted((folder / "Non_fractured").glob("*.jpg"))[:2]
    images = [decode_image(p.read_bytes()) for p in paths]
    _assert_same_outputs((model_pairs[kind][0], openvino_models[kind]), images, True, FAST_TOLERANCE)


@needs_openvino
def test_openvino_compiles_the_same_cached_export_and_says_what_it_runs(model_pairs, openvino_models, engine_cache):
    ort, ov = model_pairs["fracture"][1].engine, openvino_models["fracture"].engine
    assert ov.path == ort.path and not ov.exported  # ONNX Runtime's export, not a second one
    stamps = sorted(p.name for p in ov.folder.glob("verified-*.json"))
    assert [s.split("-")[1] for s in stamps] == ["onnxruntime", "openvino"], stamps  # each read checked once
    assert json.loads((ov.folder / f"verified-openvino-{ov.version}.json").read_text())["max_difference"]
    precision = "bf16" if _cpu_has_bf16() else "f32"
    assert base.engine_label(ov) == f"openvino-{precision}"
    assert ov.describe() == {"engine": "openvino", "precision": precision, "device": "cpu", "threads": 1,
                             "onnx": str(ort.path), "cache_key": ort.key, "openvino": choice.openvino_version()}
    assert ov.threads == torch.get_num_threads() == 1  # the module's one thread, as in a one-CPU actor


@needs_openvino
def test_fast_is_refused_on_a_bundle_without_a_validation(bundles, engine_cache, monkeypatch):
    uri = bundles["fracture"]
    with pytest.raises(fast_gate.FastModeRefused) as refused:
        BundleModel(uri, precision="fast")
    message = str(refused.value)
    assert isinstance(refused.value, ValueError) and uri in message and "records no fast-mode validation" in message
    assert f"fracray validate-fast-mode --bundle {uri} --dataset fracatlas --data" in message
    monkeypatch.setenv(choice.PRECISION_ENV, "fast")  # the environment asks for it: the same refusal
    with pytest.raises(fast_gate.FastModeRefused, match="records no fast-mode validation"):
        BundleModel(uri)
    # A router has no gate of its own: in fast mode it runs exact.
    assert base.engine_label(BundleModel(bundles["router"]).engine) == "onnxruntime-float32"


def test_precision_choices_and_where_fast_is_not_offered(monkeypatch):
    monkeypatch.delenv(choice.PRECISION_ENV, raising=False)
    monkeypatch.delenv(choice.ENGINE_ENV, raising=False)
    assert choice.requested("precision") == "exact" and choice.requested("precision", "FAST") == "fast"
    with pytest.raises(ValueError, match="'int4' \\(precision\\); choose one of exact, fast"):
        choice.requested("precision", "int4")
    with pytest.raises(ValueError, match="runs on CPU only"):
        choice.resolve_precision("fast", "cuda")
    with pytest.raises(ValueError, match="runs on the openvino engine, but engine 'torch' was asked for"):
        choice.resolve_precision("fast", "cpu", "torch")
    monkeypatch.setenv(choice.PRECISION_ENV, "half")
    with pytest.raises(ValueError, match="'half' \\(\\$FRACRAY_PRECISION\\); choose one of exact, fast"):
        choice.requested("precision")
    assert choice.requested("precision", "exact") == "exact"  # given: the variable is not read
    assert choice.requested("precision", "fast", environment=False) == "fast"


# ----------------------------------------------------------------------------- validating the fast mode

@pytest.fixture(scope="module")
def tiny_fracatlas(tmp_path_factory) -> Path:
    from fracray.data.synthetic import generate_fracatlas

    root = tmp_path_factory.mktemp("tiny-fracatlas")
    generate_fracatlas(str(root), n_images=40, seed=3, fractured_fraction=0.4, large_images=False)
    return root


def _single_index(bundle: str, folder: Path) -> str:
    """A copy of ``bundle`` (so the record written into it stays in this test) as a one-model index."""
    copy = shutil.copytree(bundle, folder / "fracture_all")
    index = str(folder / "model_index.json")
    write_model_index(index, ModelIndex(router=None, classifiers={"all": str(copy)}, dataset="untrained"))
    return index


def _validate(*args) -> tuple[int, str, str]:
    from fracray.cli.validate_fast_mode import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args], prog="fracray validate-fast-mode")
    return code, out.getvalue(), err.getvalue()


def _record(bundle: Path) -> dict:
    return json.loads((bundle / "bundle.json").read_text())["inference"].get(fast_gate.FAST_MODE_KEY)


# The gate the validation test runs under. An untrained network's probabilities lie within about
# 1e-3 of each other, so one bf16 rounding (up to ~1e-3 here) may swap two images' order, on some
# CPU if not on this one: the real gate (fast_mode.MAX_DELTA_*) is checked by the unit test below,
# this one only makes the command's pass deterministic.
TEST_GATE = {"MAX_DELTA_AUROC": 0.5, "MAX_DELTA_SENSITIVITY": 0.5}


@pytest.fixture
def test_gate(monkeypatch):
    """The engine accepts records made against TEST_GATE (it refuses any gate looser than the
    product's: test_a_record_against_a_looser_gate_or_on_training_images_is_refused)."""
    for name, value in TEST_GATE.items():
        monkeypatch.setattr(fast_gate, name, value)


@pytest.fixture(scope="module")
def validated(bundles, tiny_fracatlas, tmp_path_factory, engine_cache) -> tuple[Path, int, str, str]:
    """The fracture-map bundle, copied, validated by the command on the tiny FracAtlas's valid split."""
    return _validated_copy(bundles, tiny_fracatlas, tmp_path_factory, "validated", "--split", "valid", "--kind", "bf16")


def _validated_copy(bundles, data, tmp_path_factory, name: str, *flags) -> tuple[Path, int, str, str]:
    """The fracture-map bundle copied into its own index and validated by the command with ``flags``
    (at the test gate); the copy's folder and the command's exit code and output."""
    from fracray.evaluation import fast_mode

    if not choice.openvino_available():
        pytest.skip("openvino is not importable (a dependency: pip install -e . installs it)")
    index = _single_index(bundles["localizing"], tmp_path_factory.mktemp(name))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in TEST_GATE.items():
            mp.setattr(fast_mode, key, value)
        code, out, err = _validate("--models", index, "--dataset", "fracatlas", "--data", data, *flags)
    return Path(index).parent / "fracture_all", code, out, err


def test_the_gate_is_delta_auroc_0_005_and_delta_sensitivity_0_01_either_way():
    from fracray.evaluation import fast_mode

    assert (fast_mode.MAX_DELTA_AUROC, fast_mode.MAX_DELTA_SENSITIVITY) == (0.005, 0.01)
    assert fast_mode.passes_gate(0.0, 0.0) and fast_mode.passes_gate(-0.005, 0.01)
    assert fast_mode.passes_gate(0.004, -0.01)
    assert not fast_mode.passes_gate(0.0051, 0.0) and not fast_mode.passes_gate(-0.0051, 0.0)
    assert not fast_mode.passes_gate(0.0, 0.0101) and not fast_mode.passes_gate(0.0, -0.02)


@needs_openvino
def test_the_validation_records_a_passed_fast_mode_in_the_bundle(validated, bundles, tiny_fracatlas):
    bundle, code, out, err = validated
    assert code == 0, out + err
    record = _record(bundle)
    original = json.loads((Path(bundles["localizing"]) / "bundle.json").read_text())
    now = json.loads((bundle / "bundle.json").read_text())
    now["inference"].pop(fast_gate.FAST_MODE_KEY)
    assert now == original  # everything else in bundle.json as it was
    assert record["passed"] is True and record["engine"] == "openvino"
    assert record["precision"] == ("bf16" if _cpu_has_bf16() else "f32")
    assert (record["max_delta_auroc"], record["max_delta_sensitivity"]) == (0.5, 0.5)  # TEST_GATE
    assert record["max_probability_difference"] < FAST_TOLERANCE
    assert record["delta_auroc"] == pytest.approx(record["auroc_fast"] - record["auroc_exact"])
    assert record["delta_sensitivity"] == pytest.approx(record["sensitivity_fast"] - record["sensitivity_exact"])
    assert (record["dataset"], record["split"], record["body_part"]) == ("fracatlas", "valid", "all")
    assert record["images"] >= 4 and 0 < record["positives"] < record["images"]
    assert record["openvino"] == choice.openvino_version() and record["exact_engine"] == "onnxruntime-float32"
    assert record["validated_at"] and record["cpu"] and len(record["weights_sha256"]) == 64
    assert "AUROC" in out and "sensitivity" in out and "PASSED" in out and str(bundle / "bundle.json") in out


@needs_openvino
def test_a_validated_bundle_runs_fast_and_the_environment_decides(validated, synthetic_images, monkeypatch,
                                                                   test_gate):
    bundle = str(validated[0])
    fast = BundleModel(bundle, precision="fast")
    assert base.engine_label(fast.engine) == f"openvino-{'bf16' if _cpu_has_bf16() else 'f32'}"
    assert base.engine_label(BundleModel(bundle).engine) == "onnxruntime-float32"  # exact by default
    monkeypatch.setenv(choice.PRECISION_ENV, "fast")
    assert BundleModel(bundle).engine.name == "openvino"
    assert base.engine_label(BundleModel(bundle, precision="exact").engine) == "onnxruntime-float32"  # given wins
    monkeypatch.setenv(choice.PRECISION_ENV, "exact")  # the code's precision="fast" beats the environment
    assert BundleModel(bundle, precision="fast").engine.name == "openvino"
    # The whole predictor follows it, and every answer names the engine.
    from fracray.inference.predictor import FracturePredictor

    monkeypatch.setenv(choice.PRECISION_ENV, "fast")
    predictor = FracturePredictor(str(Path(bundle).parent / "model_index.json"), device="cpu", check_scope=False)
    answers = predictor.predict_decoded(synthetic_images[:1])
    assert answers[0]["engine"] == base.engine_label(fast.engine)


@needs_openvino
def test_a_record_for_other_weights_or_another_openvino_is_refused(validated, tmp_path, engine_cache, test_gate):
    model, meta = load_bundle(str(validated[0]))
    assert meta.inference[fast_gate.FAST_MODE_KEY]["passed"] is True  # the record travels with the metadata ...
    with torch.no_grad():
        model.head[-1].bias.add_(0.5)
    changed = save_bundle(str(tmp_path / "changed"), model, dataclasses.replace(meta))
    with pytest.raises(fast_gate.FastModeRefused, match="weights are not the ones validated"):
        BundleModel(changed, precision="fast")  # ... but not to other weights
    other = shutil.copytree(validated[0], tmp_path / "other-openvino")
    raw = json.loads((other / "bundle.json").read_text())
    raw["inference"][fast_gate.FAST_MODE_KEY]["openvino"] = "2020.1.0"
    (other / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(fast_gate.FastModeRefused, match="validated with OpenVINO 2020.1.0"):
        BundleModel(str(other), precision="fast")


@needs_openvino
def test_a_record_against_a_looser_gate_or_on_training_images_is_refused(validated, tmp_path, engine_cache):
    from fracray.evaluation import fast_mode

    assert (fast_gate.MAX_DELTA_AUROC, fast_gate.MAX_DELTA_SENSITIVITY) == (fast_mode.MAX_DELTA_AUROC,
                                                                         fast_mode.MAX_DELTA_SENSITIVITY)
    # The fixture's record passed against TEST_GATE (0.5): the product's gate (0.005 / 0.01) does not take it.
    with pytest.raises(fast_gate.FastModeRefused, match="validated against the gate .*0.5.* not this version's 0.005"):
        BundleModel(str(validated[0]), precision="fast")
    strict = shutil.copytree(validated[0], tmp_path / "on-train")
    raw = json.loads((strict / "bundle.json").read_text())
    raw["inference"][fast_gate.FAST_MODE_KEY].update(max_delta_auroc=0.005, max_delta_sensitivity=0.01, split="train")
    (strict / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(fast_gate.FastModeRefused, match="split 'train', which holds images the model was trained on"):
        BundleModel(str(strict), precision="fast")
    raw["inference"][fast_gate.FAST_MODE_KEY]["split"] = "valid"  # the same record on valid runs
    (strict / "bundle.json").write_text(json.dumps(raw))
    assert BundleModel(str(strict), precision="fast").engine.name == "openvino"


def test_the_validation_is_refused_on_training_images(bundles, tiny_fracatlas, tmp_path):
    index = _single_index(bundles["localizing"], tmp_path)
    for split in ("train", "all"):
        code, _, err = _validate("--models", index, "--dataset", "fracatlas", "--data", tiny_fracatlas,
                                 "--split", split, "--dry-run")
        assert code == 2 and f"split '{split}' holds training images" in err, err


@needs_openvino
def test_a_failed_validation_is_recorded_and_refused(bundles, tiny_fracatlas, tmp_path, engine_cache, monkeypatch):
    from fracray.evaluation import fast_mode

    index = _single_index(bundles["localizing"], tmp_path)
    bundle = tmp_path / "fracture_all"
    monkeypatch.setattr(fast_mode, "MAX_DELTA_AUROC", -1.0)  # no measurement can pass
    before = (bundle / "bundle.json").read_bytes()
    code, out, err = _validate("--models", index, "--dataset", "fracatlas", "--data", tiny_fracatlas, "--dry-run")
    assert code == 1 and "FAILED" in out and "not recorded" in out, out + err
    assert (bundle / "bundle.json").read_bytes() == before  # --dry-run writes nothing
    code, out, err = _validate("--models", index, "--dataset", "fracatlas", "--data", tiny_fracatlas)
    assert code == 1 and "fast mode failed its gate" in err and "fracture_all" in err, out + err
    record = _record(bundle)
    assert record["passed"] is False and record["max_delta_auroc"] == -1.0
    with pytest.raises(fast_gate.FastModeRefused, match="fast-mode validation failed \\(ΔAUROC"):
        BundleModel(str(bundle), precision="fast")


def test_the_validation_refuses_what_it_cannot_measure(bundles, tiny_fracatlas, tmp_path, engine_cache):
    code, _, err = _validate("--models", bundles["router"].rsplit("/", 1)[0], "--dataset", "fracatlas",
                             "--data", tiny_fracatlas)  # the untrained index: wrist and humerus, not in FracAtlas
    assert code == 2 and "No labelled humerus images in split valid" in err, err
    code, _, err = _validate("--bundle", bundles["router"], "--dataset", "fracatlas", "--data", tiny_fracatlas)
    assert code == 2 and "is a 'body_part' bundle" in err, err


# ----------------------------------------------------------------------------- --engine / --precision in the jobs

def test_the_commands_offer_the_engines_and_precisions_and_pass_them_on():
    """serve, score and evaluate: --engine and --precision land in each job's config (serve's in
    the application's arguments too); the choices are the engine module's."""
    from fracray.cli import evaluate, score_archive, serve
    from fracray.jobs.serve import serve_args

    flags = ["--engine", "torch", "--precision", "fast"]
    config = serve.config_from_args(serve.build_parser().parse_args(["--models", "m.json", *flags]))
    assert (config.args.engine, config.args.precision) == ("torch", "fast")
    app_args = serve_args(config)
    assert (app_args.models, app_args.engine, app_args.precision) == ("m.json", "torch", "fast")
    config = score_archive.config_from_args(score_archive.build_parser().parse_args(
        ["--input", "a", "--models", "m.json", "--output", "o", *flags]))
    assert (config.engine, config.precision) == ("torch", "fast")
    config = evaluate.config_from_args(evaluate.build_parser().parse_args(
        ["--models", "m.json", "--dataset", "fracatlas", "--data", "d", *flags]))
    assert (config.engine, config.precision) == ("torch", "fast")
    defaults = evaluate.config_from_args(evaluate.build_parser().parse_args(
        ["--models", "m.json", "--dataset", "fracatlas", "--data", "d"]))
    assert (defaults.engine, defaults.precision) == ("auto", None)  # None: $FRACRAY_PRECISION, else exact
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        score_archive.build_parser().parse_args(["--input", "a", "--models", "m", "--output", "o", "--precision", "int8"])


@pytest.fixture(scope="module")
def strict_index(validated_int8, tmp_path_factory) -> str:
    """A one-model index whose bundle's INT8 validation record stands against the product's own
    gate (the fixture's passed against TEST_GATE): what every process accepts, Ray's actors and
    Serve's replicas included (each reads the graph from the bundle), where the test's
    monkeypatched gate does not reach."""
    from fracray.evaluation import fast_mode

    bundle, code, out, err = validated_int8
    assert code == 0, out + err
    folder = tmp_path_factory.mktemp("strict")
    index = _single_index(str(bundle), folder)
    meta = folder / "fracture_all" / "bundle.json"
    raw = json.loads(meta.read_text())
    raw["inference"][fast_gate.FAST_MODE_KEY].update(max_delta_auroc=fast_mode.MAX_DELTA_AUROC,
                                                   max_delta_sensitivity=fast_mode.MAX_DELTA_SENSITIVITY)
    meta.write_text(json.dumps(raw))
    return index


def _fast_label() -> str:
    return "openvino-int8"  # strict_index's kind


@needs_openvino
def test_score_and_evaluate_run_at_the_engine_and_precision_asked(ray_local, strict_index, bundles, tiny_fracatlas,
                                                                  tmp_path, engine_cache):
    import pyarrow.parquet as pq

    from fracray.cli.evaluate import main as evaluate
    from fracray.cli.score_archive import main as score

    archive = tmp_path / "archive"
    archive.mkdir()
    for path in sorted((tiny_fracatlas / "FracAtlas" / "images").rglob("*.jpg"))[:4]:
        shutil.copy(path, archive / path.name)

    def run(main, *args) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
        return code, out.getvalue(), err.getvalue()

    for flags, label in ((["--precision", "fast"], _fast_label()), (["--engine", "torch"], "torch-float32")):
        output = tmp_path / f"scores-{label}"
        code, out, err = run(score, "--input", archive, "--models", strict_index, "--output", output, *flags)
        assert code == 0, out + err
        rows = pq.read_table(output / "images").to_pylist()
        assert len(rows) == 4 and {r["engine"] for r in rows} == {label}, rows
    # Fast for a bundle that records no validation: refused before the archive is indexed.
    unvalidated = _single_index(bundles["localizing"], tmp_path / "unvalidated")
    code, out, err = run(score, "--input", archive, "--models", unvalidated, "--output", tmp_path / "refused",
                         "--precision", "fast")
    assert code == 2 and "Fast precision refused" in err and "fracray validate-fast-mode --bundle" in err, err
    assert not (tmp_path / "refused").exists()
    # evaluate: every stage at the precision asked; the summary says what was asked and what ran.
    code, out, err = run(evaluate, "--models", strict_index, "--dataset", "fracatlas", "--data", tiny_fracatlas,
                         "--precision", "fast")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["engine"], summary["precision"], summary["engines"]) == ("auto", "fast", [_fast_label()])
    assert summary["pointing_game"] is not None
    code, out, err = run(evaluate, "--models", unvalidated, "--dataset", "fracatlas", "--data", tiny_fracatlas,
                         "--precision", "fast")
    assert code == 2 and "Fast precision refused" in err, err


@needs_openvino
def test_serve_runs_the_precision_asked_and_refuses_fast_where_unvalidated(serve_url, strict_index, bundles,
                                                                           tmp_path, engine_cache):
    import requests

    from conftest import radiograph_bytes as _image
    from fracray.serving.app import build_app
    from conftest import served

    # Refused by the builder, before a replica starts (they load classifiers on demand).
    unvalidated = _single_index(bundles["localizing"], tmp_path)
    with pytest.raises(fast_gate.FastModeRefused, match="records no fast-mode validation"):
        build_app({"models": unvalidated, "precision": "fast"})
    with pytest.raises(ValueError, match="precision must be one of exact, fast. Got 'half'"):
        build_app({"models": strict_index, "precision": "half"})
    with served(serve_url, {"models": strict_index, "min_replicas": 1, "precision": "fast"}, "fast") as url:
        got = requests.post(f"{url}/v1/classify", data=_image(seed=12), timeout=120).json()
        assert got["engine"] == _fast_label(), got
        assert requests.get(f"{url}/v1/models", timeout=30).json()["precision"] == "fast"


# ----------------------------------------------------------------------------- fast as INT8


@pytest.fixture(scope="module")
def validated_int8(bundles, tiny_fracatlas, tmp_path_factory, engine_cache) -> tuple[Path, int, str, str]:
    """The fracture-map bundle, copied, quantised and validated by the command (its default
    kind, INT8) on the tiny FracAtlas: calibrated on 8 training images, measured on valid."""
    return _validated_copy(bundles, tiny_fracatlas, tmp_path_factory, "validated-int8", "--calibration-images", 8)


@needs_openvino
def test_int8_validation_quantises_on_training_images_and_stores_the_graph(validated_int8, tiny_fracatlas):
    import hashlib

    from fracray.data import adapters

    bundle, code, out, err = validated_int8
    assert code == 0, out + err
    record = _record(bundle)
    assert (record["engine"], record["precision"], record["passed"]) == ("openvino", "int8", True)
    graph = bundle / record["graph"]
    assert record["graph"] == choice.FAST_GRAPH_FILE and graph.exists()
    assert record["graph_sha256"] == hashlib.sha256(graph.read_bytes()).hexdigest()
    quantization = record["quantization"]
    assert (quantization["split"], quantization["method"], quantization["format"]) == ("train", "minmax", "QDQ")
    train = adapters.index_dataset("fracatlas", str(tiny_fracatlas)).manifest
    n_train = sum(1 for s in train["split"].to_pylist() if s == "train")
    assert 1 <= quantization["images"] <= min(8, n_train)
    # Each calibration image and, as the bundle averages flips, its mirror image.
    flips = 2 if record["tta_flip"] else 1
    assert quantization["calibration_inputs"] == flips * quantization["images"]
    assert record["split"] == "valid" and "int8" in out and "PASSED" in out
    import onnx

    nodes = onnx.load(str(graph)).graph.node
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in nodes}  # not the float graph
    # The full-resolution front stays float: the image itself is never quantised, and the record says so.
    assert not [node.name for node in nodes if node.op_type == "QuantizeLinear" and node.input[0] == "image"]
    assert quantization["float_front_stride"] == int8.FLOAT_FRONT_STRIDE and quantization["float_nodes"] > 0


@needs_openvino
def test_an_int8_bundle_runs_its_own_graph_and_refuses_another(validated_int8, synthetic_images, tmp_path,
                                                               test_gate):
    bundle = validated_int8[0]
    fast, exact = BundleModel(str(bundle), precision="fast"), BundleModel(str(bundle))
    assert base.engine_label(fast.engine) == "openvino-int8"
    assert fast.engine.describe()["graph_sha256"] == _record(bundle)["graph_sha256"]
    p_fast, p_exact = fast.probabilities(synthetic_images), exact.probabilities(synthetic_images)
    assert np.abs(p_fast - p_exact).max() < 0.1  # close, not equal: the gate, not a tolerance, decides
    # Another graph than the one validated: refused, as is a bundle whose graph is gone.
    changed = shutil.copytree(bundle, tmp_path / "changed")
    raw = json.loads((changed / "bundle.json").read_text())
    raw["inference"][fast_gate.FAST_MODE_KEY]["graph_sha256"] = "0" * 64
    (changed / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(fast_gate.FastModeRefused, match="INT8 graph \\(fast_int8.onnx\\) is not the one validated"):
        BundleModel(str(changed), precision="fast")
    missing = shutil.copytree(bundle, tmp_path / "missing")
    (missing / choice.FAST_GRAPH_FILE).unlink()
    with pytest.raises(fast_gate.FastModeRefused, match="validated INT8 graph .* cannot be read"):
        BundleModel(str(missing), precision="fast")


def test_int8_calibrates_on_another_split_than_it_measures(bundles, tiny_fracatlas, tmp_path):
    index = _single_index(bundles["localizing"], tmp_path)
    code, _, err = _validate("--models", index, "--dataset", "fracatlas", "--data", tiny_fracatlas,
                             "--calibration-split", "valid", "--dry-run")
    assert code == 2 and "calibration_split must be another split than 'valid'" in err, err
    code, _, err = _validate("--models", index, "--dataset", "fracatlas", "--data", tiny_fracatlas,
                             "--calibration-split", "nosuch", "--dry-run")
    assert code == 2 and "No labelled all images in split nosuch" in err, err
    assert not (tmp_path / "fracture_all" / choice.FAST_GRAPH_FILE).exists()


@needs_openvino
def test_an_int8_dry_run_writes_no_graph(bundles, tiny_fracatlas, tmp_path, engine_cache, monkeypatch):
    from fracray.evaluation import fast_mode

    for name, value in TEST_GATE.items():
        monkeypatch.setattr(fast_mode, name, value)
    index = _single_index(bundles["localizing"], tmp_path)
    before = (tmp_path / "fracture_all" / "bundle.json").read_bytes()
    code, out, err = _validate("--models", index, "--dataset", "fracatlas", "--data", tiny_fracatlas,
                               "--calibration-images", 4, "--dry-run")
    assert code == 0 and "openvino-int8" in out and "not recorded" in out, out + err
    assert (tmp_path / "fracture_all" / "bundle.json").read_bytes() == before
    assert not (tmp_path / "fracture_all" / choice.FAST_GRAPH_FILE).exists()


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_quantize_int8_keeps_the_front_float_and_calibrates_in_strides(bundles, engine_cache, tmp_path, method):
    """INT8 straight from the float export: every calibration method, 7 inputs (prime: one per
    calibration stride), convolutions at stride < 8 left float, the rest quantised; the graph
    runs and gives finite outputs."""
    import onnx
    import onnxruntime

    model = BundleModel(str(bundles["localizing"]), engine="onnxruntime")
    size = (model.config.channels, *model.config.image_size)
    export = engine_export.cached_export(model.model, size, runtime=f"onnxruntime-{onnxruntime.__version__}",
                                   run=onnxruntime_engine.onnxruntime_outputs, model_spec=model.meta.model)
    rng = np.random.default_rng(0)
    inputs = rng.normal(0, 1, (7, *size)).astype(np.float32)
    info = int8.quantize_int8(export.path, lambda: (inputs[i:i + 2] for i in range(0, 7, 2)),
                                 tmp_path / "q.onnx", method=method)
    assert info["calibration_inputs"] == 7 and info["method"] == method
    front = int8.float_front(export.path, inputs[:1])
    assert info["float_nodes"] == len(front) > 0
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    producer = {out: n.op_type for n in graph.node for out in n.output}
    quantised_convs = {n.name for n in graph.node if n.op_type == "Conv" and producer.get(n.input[0]) == "DequantizeLinear"}
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    assert convs[0] in front and convs[0] not in quantised_convs  # the stem reads the float image
    assert quantised_convs and not quantised_convs & set(front)
    session = onnxruntime.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(["logits"], {"image": inputs[:2]})[0]
    assert out.shape[0] == 2 and np.isfinite(out).all()


def test_quantize_int8_refuses_an_empty_calibration(bundles, engine_cache, tmp_path):
    import onnxruntime

    model = BundleModel(str(bundles["localizing"]), engine="onnxruntime")
    export = engine_export.cached_export(model.model, (model.config.channels, *model.config.image_size),
                                   runtime=f"onnxruntime-{onnxruntime.__version__}",
                                   run=onnxruntime_engine.onnxruntime_outputs, model_spec=model.meta.model)
    with pytest.raises(ValueError, match="No calibration images"):
        int8.quantize_int8(export.path, lambda: iter(()), tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()
