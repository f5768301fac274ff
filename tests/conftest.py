"""Shared fixtures: a real local Ray, a real S3-compatible server (moto in server mode
on 127.0.0.1), synthetic datasets in the released layouts, and the real FracAtlas copy."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FRACRAY_SHARED_DATA", REPO.parent / "shared" / "data"))

# Fake credentials for the local S3 server; set before Ray starts so its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# The inference engine's exported graphs: one cache for the session (Ray workers and the CLIs the
# tests start inherit it), never the user's ~/.cache.
import tempfile  # noqa: E402

os.environ.setdefault("FRACRAY_ENGINE_CACHE", tempfile.mkdtemp(prefix="fracray-engines-"))
# Under pytest-xdist each worker is its own session: its own Ray temp dir, so a `ray start` record a
# test leaves (where the CLIs look for a cluster) is never seen by the other worker's commands.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"ray-{os.environ['PYTEST_XDIST_WORKER']}-")
# The bearer token the test Serve application requires (its replicas read it from their environment).
SERVE_TEST_TOKEN_ENV = "FRACRAY_TEST_API_TOKEN"
SERVE_TEST_TOKEN = "test-token-4f2a"



def radiographs(n: int, *, start: int = 0, body_part: str = "hand", size: tuple[int, int] = (600, 480),
                fractured_every: int = 1) -> list:
    """``n`` grey uint8 radiographs: real FracAtlas fractured ones (images ``start`` to
    ``start + n`` in name order) when the shared data is there, else synthetic ones of
    ``body_part`` at ``size`` (every ``fractured_every``-th with a fracture). The DICOM and PACS
    tests wrap them as a modality would."""
    import numpy as np

    folder = SHARED_DATA / "fracatlas" / "FracAtlas" / "images" / "Fractured"
    if folder.is_dir():
        from PIL import Image

        paths = sorted(folder.glob("*.jpg"))[start:start + n]
        assert len(paths) == n, f"only {len(paths)} FracAtlas images from {start} in {folder}"
        return [np.asarray(Image.open(p).convert("L")) for p in paths]
    from fracray.data.synthetic import render_radiograph

    return [render_radiograph(np.random.default_rng(start + i), body_part, *size,
                              fracture=i % fractured_every == 0).pixels for i in range(n)]


def wrapped_study(n: int, *, start: int = 0, patient: tuple[str, str] = ("T2-0001", "Bare^Pat"),
                  accession: str = "T2ACC", syntaxes=("explicit",), body_part: str = "HAND",
                  omit=(), laterality: str | None = None) -> tuple[str, list[bytes]]:
    """A study of ``n`` radiographs (``radiographs``: real FracAtlas ones where the shared data
    is) wrapped as a modality writes them: DX and CR in turn, MONOCHROME1 for the second, each in
    the next of ``syntaxes``. ``omit``: Type 2 attributes left out (``fracray.pacs.results.
    TYPE2_PATIENT_STUDY``: none of PatientBirthDate, StudyID, ReferringPhysicianName, ...).
    Returns (StudyInstanceUID, Part 10 files)."""
    from pydicom.uid import generate_uid

    from fracray.data.synthetic import BODY_PART_BONES
    from fracray.pacs.wrap import StudyIdentity, wrap_radiograph

    # The tag says ``body_part``; the synthetic pixels (no shared data) are a hand where the renderer
    # has no drawing of that part (CHEST: the out-of-scope tests read the tag, not the pixels).
    drawn = body_part.lower() if body_part.lower() in BODY_PART_BONES else "hand"
    study = StudyIdentity(patient_id=patient[0], patient_name=patient[1], study_uid=generate_uid(),
                          accession=accession)
    series = generate_uid()
    files = [wrap_radiograph(pixels, study, series_uid=series, instance_number=i + 1, modality=("DX", "CR")[i % 2],
                             body_part=body_part, monochrome1=(i == 1), transfer_syntax=syntaxes[i % len(syntaxes)],
                             omit=omit, laterality=laterality)
             for i, pixels in enumerate(radiographs(n, start=start, body_part=drawn))]
    return study.study_uid, files


def dicom_check(path, *, sr: bool | None = None) -> str:
    """Every check a result object must pass, or an AssertionError saying which failed:
    David Clunie's dciodvfy (dicom3tools) with no "Error" line, highdicom reads it back, and for
    a Structured Report dcmtk's dsrdump reads it without an error. Returns dciodvfy's output.
    Tests that call it skip where the tools are not installed (scripts/install_pacs_tools.sh)."""
    import shutil as _shutil

    import highdicom as hd
    import pydicom

    missing = [tool for tool in ("dciodvfy", "dsrdump") if _shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: bash scripts/install_pacs_tools.sh "
                    f"(apt-get install dicom3tools dcmtk)")
    path = str(path)
    verify = subprocess.run(["dciodvfy", path], capture_output=True, text=True, timeout=120)
    report = verify.stdout + verify.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, f"dciodvfy found {len(errors)} error(s) in {path}:\n" + "\n".join(errors)
    ds = pydicom.dcmread(path)
    if sr is None:
        sr = ds.Modality == "SR"
    if sr:
        hd.sr.srread(path)
        dump = subprocess.run(["dsrdump", path], capture_output=True, text=True, timeout=120)
        assert dump.returncode == 0 and "error" not in dump.stderr.lower(), dump.stderr
    else:
        image = hd.imread(path)
        assert image.pixel_array.size > 0
    return report


# ----------------------------------------------------------------------------- running on two workers

# scripts/test.sh runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup
# --no-loadscope-reorder`): a module's tests stay on one worker, so its module fixtures are built
# once; modules that share a fixed resource share a worker (`serve run IMPORT_PATH` has no port
# option: Serve's 8000); and the longest modules start first (longest-first keeps both workers busy
# to the end). Order from docs/test-suite.md's per-file times; the rest keep their own order.
_SHARED_WORKER = {"test_serving": "serve-port-8000", "test_serving_args": "serve-port-8000"}
_LONGEST_FIRST = ["test_train_all", "test_cluster", "test_serving", "test_cli", "test_benchmarks", "test_scoring",
                  "test_review", "test_training", "test_config_and_localization", "test_listener", "test_orthanc",
                  "test_serving_overload", "test_engine", "test_serving_hardening", "test_explain",
                  "test_raycluster", "test_serving_args"]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: within a module, as written
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_SHARED_WORKER.get(item.path.stem, item.path.stem)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session (2 CPUs, as on the build machine)."""
    import ray

    if not ray.is_initialized():
        from fracray.serving.proxy_guard import configure_environment

        # Serve's proxy runs fracray's guard (it must be in the environment before Ray starts):
        # small limits here, so that tests reach them quickly.
        configure_environment(max_body_mb=4, max_header_kb=16, body_timeout_s=5)
        from fracray.raycluster import apply_local_ray_environment

        apply_local_ray_environment()  # what a command's own local Ray gets
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "lib"), SERVE_TEST_TOKEN_ENV: SERVE_TEST_TOKEN}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def joining_session_ray(ray) -> dict[str, str]:
    """This process's environment with ``RAY_ADDRESS`` at the session's Ray (``ray_local``): a
    command run in it joins that cluster, as on a cluster, instead of starting a Ray of its own."""
    return dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)


def wait_ready(url: str, timeout: float = 180, headers=None) -> None:
    """Until ``url``'s /readyz answers 200 (a condition, not a sleep), or an AssertionError
    with the last answer."""
    import requests

    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = requests.get(f"{url}/readyz", timeout=60, headers=headers)
            if last.status_code == 200:
                return
        except requests.RequestException as exc:  # not listening yet, or still loading models
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"service not ready after {timeout}s: {getattr(last, 'text', last)}")


@pytest.fixture(scope="session")
def serve_url(ray_local) -> str:
    """One Ray Serve instance (HTTP on a free port of 127.0.0.1) for the whole session: each
    test module deploys its named application on it (:func:`served`) and deletes it after,
    instead of starting and stopping Serve and its proxy every time."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@contextlib.contextmanager
def served(serve_url: str, app_args: dict, name: str, *, ready: bool = True, headers=None):
    """The application built from ``app_args`` deployed as ``name`` on the session's Serve
    (``serve_url``), ready (unless ``ready`` is False: the caller waits its own way); yields the
    URL and deletes the application after. Serve is started again on the same port if
    something (a benchmark) shut it down."""
    from ray import serve

    from fracray.serving.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": int(serve_url.rsplit(":", 1)[1])})
    serve.run(build_app(app_args), name=name, route_prefix="/", blocking=False)
    try:
        if ready:
            wait_ready(serve_url, headers=headers)
        yield serve_url
    finally:
        serve.delete(name)


def radiograph_bytes(part="wrist", h=900, w=700, fmt="JPEG", seed=0, fracture=True) -> bytes:
    """One synthetic radiograph of ``part`` encoded as ``fmt`` (what a client uploads)."""
    import numpy as np
    from PIL import Image

    from fracray.data.synthetic import render_radiograph

    pixels = render_radiograph(np.random.default_rng(seed), part, h, w, fracture=fracture).pixels
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, quality=92) if fmt == "JPEG" else Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def stop_sessions(sessions: list[int]) -> None:
    """Stop only the processes of these sessions (`ray stop` would stop every Ray on the machine,
    the test session's own included). Each `ray start` a test makes runs in a session of its own,
    and the daemons it forks (GCS, raylet, dashboard, agents, workers) stay in it."""
    def members() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if os.getsid(int(proc.name)) in sessions:
                        pids.append(int(proc.name))
                except OSError:
                    pass
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in members():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 3
        while members() and time.time() < deadline:  # gone already: no need to wait the whole grace
            time.sleep(0.2)


# ----------------------------------------------------------------------------- test inputs

def dicom_bytes(pixels, *, photometric="MONOCHROME2", window=None, rescale=None, body_part=None,
                 voi_lut=None, with_pixels=True, transfer_syntax=None) -> bytes:
    """A DX radiograph as a Part 10 file, with the attribute under test set (photometric
    interpretation, window, rescale, VOI LUT sequence, no pixels, a syntax no handler decodes)."""
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    if body_part:
        ds.BodyPartExamined = body_part
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if voi_lut is not None:
        from pydicom.dataset import Dataset
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 8]
        item.LUTData = np.asarray(voi_lut, np.uint16).tobytes()
        ds.VOILUTSequence = [item]
    if with_pixels and transfer_syntax is not None:
        from pydicom.encaps import encapsulate
        # A JPEG 2000 codestream start; no pixel handler for it is installed.
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    elif with_pixels:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def synthetic_jpeg(rng, part="wrist", h=400, w=320) -> bytes:
    """A synthetic radiograph of ``part`` as JPEG, fractured or not at random (``rng``)."""
    from PIL import Image

    from fracray.data.synthetic import render_radiograph

    buf = io.BytesIO()
    Image.fromarray(render_radiograph(rng, part, h, w, fracture=bool(rng.random() < 0.5)).pixels).save(buf, "JPEG")
    return buf.getvalue()


def instance_zoo() -> dict[str, bytes]:
    """Part 10 files, one per case the rule decides: radiographs it classifies, and pydicom's own
    test objects and edited radiographs it refuses."""
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from fracray.pacs.wrap import StudyIdentity, wrap_radiograph

    study = StudyIdentity(patient_id="Z1", patient_name="Zoo^Pat", study_uid=generate_uid(), accession="ZACC")
    series = generate_uid()
    pixels = (np.arange(256 * 200, dtype=np.uint32).reshape(256, 200) % 251).astype(np.uint8)
    dx = wrap_radiograph(pixels, study, series_uid=series, instance_number=1, modality="DX", body_part="WRIST")
    cr = wrap_radiograph(pixels, study, series_uid=series, instance_number=2, modality="CR", body_part="WRIST")

    def edited(data: bytes, change) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        change(ds)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()

    def own_result(ds):
        ds.Manufacturer = "fracray"

    def no_pixels(ds):
        del ds.PixelData

    def bad_frames(ds):
        ds.NumberOfFrames = "7"  # replaced by "x1" in the bytes below (pydicom writes no invalid IS)

    def no_study(ds):
        ds.StudyInstanceUID = ""

    files = {"dx": dx, "cr": cr, "own_result": edited(dx, own_result), "no_pixels": edited(dx, no_pixels),
             "bad_frames": edited(dx, bad_frames).replace(b"\x28\x00\x08\x00IS\x02\x007 ", b"\x28\x00\x08\x00IS\x02\x00x1"),
             "no_study_uid": edited(dx, no_study)}
    for name in ("test-SR.dcm", "rtplan.dcm", "waveform_ecg.dcm", "SC_rgb_rle_2frame.dcm", "CT_small.dcm",
                 "MR_small.dcm"):
        files[name] = open(get_testdata_file(name), "rb").read()
    return files


def corpus_dir() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"


def corpus_files() -> list[Path]:
    return sorted(p for p in corpus_dir().rglob("*") if p.is_file())


# One file of each compressed transfer syntax PACS store: these must decode (the pixel-data
# handlers pydicom documents, pylibjpeg with libjpeg/openjpeg/rle, are dependencies).
MUST_DECODE = {
    "JPEG Baseline": "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG Extended 12-bit": "JPGExtended.dcm",
    "JPEG Lossless (Process 14)": "SC_rgb_jpeg_gdcm.dcm",
    "JPEG-LS lossless": "MR_small_jpeg_ls_lossless.dcm",
    "JPEG-LS near-lossless": "JPEGLSNearLossless_16.dcm",
    "JPEG 2000 lossless": "MR_small_jp2klossless.dcm",
    "JPEG 2000": "JPEG2000.dcm",
    "RLE Lossless": "MR_small_RLE.dcm",
    "Explicit VR Big Endian": "MR_small_bigendian.dcm",
    "Deflated": "image_dfl.dcm",
}


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server as its own process on 127.0.0.1; yields the endpoint URL."""
    port = _free_port()
    # This interpreter's moto (a moto_server on PATH may be another install's).
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start within 30 s")
    yield endpoint
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the local S3 server; yields (boto3 client, bucket name, endpoint)."""
    import uuid

    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    name = f"fracray-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    return client, name, s3_server


def upload_tree(client, local_root: Path, bucket: str, prefix: str) -> int:
    count = 0
    for path in sorted(local_root.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(local_root).as_posix()}"
            client.upload_file(str(path), bucket, key)
            count += 1
    return count


@pytest.fixture(scope="session")
def mura_root(tmp_path_factory) -> Path:
    from fracray.data.synthetic import generate_mura

    root = tmp_path_factory.mktemp("mura")
    generate_mura(str(root), patients_per_part=3, seed=7, max_side=256)
    return root


@pytest.fixture(scope="session")
def fracatlas_root(tmp_path_factory) -> Path:
    from fracray.data.synthetic import generate_fracatlas

    root = tmp_path_factory.mktemp("fracatlas")
    generate_fracatlas(str(root), n_images=60, seed=3, fractured_fraction=0.3, truncated=2, large_images=True)
    return root


@pytest.fixture(scope="session")
def shared_fracatlas() -> Path:
    root = SHARED_DATA / "fracatlas"
    if not (root / "FracAtlas" / "dataset.csv").exists():
        pytest.skip(f"real FracAtlas data not found at {root} (../shared/data beside the checkout; "
                    f"set FRACRAY_SHARED_DATA to point elsewhere)")
    return root


@pytest.fixture(scope="session")
def shared_fracatlas_fullres() -> Path:
    root = SHARED_DATA / "fracatlas-fullres"
    if not (root / "FracAtlas" / "dataset.csv").exists():
        pytest.skip(f"full-resolution FracAtlas sample not found at {root}")
    return root


@pytest.fixture(scope="session")
def untrained_index(tmp_path_factory):
    """A router + wrist/humerus classifiers with untrained heads (same compute as trained ones)."""
    from fracray.artifacts.scaffold import build_untrained_index

    return build_untrained_index(str(tmp_path_factory.mktemp("models")), body_parts=("humerus", "wrist"))


# What the localising test bundle says of its training (so /v1/models has something to show).
LOCALIZING_DATA = {"images_with_outlines": 3, "images_with_boxes_only": 5, "positives_without_regions": 1}
LOCALIZING_TRAINING = {"config": {"model": "efficientnet_lite0", "image_size": 128, "localization": True,
                                  "negatives_per_positive": 1.5, "seed": 0},
                       "epochs_run": 0, "seconds": 0.0, "history": [{"epoch": 1, "loss": 0.7}]}
LOCALIZING_VALIDATION = {"pointing_game": 0.5, "pointing_centre_baseline": 0.25, "pointing_images": 4,
                         "lesion_sensitivity_at_0.5_fp": 0.4, "lesion_sensitivity_at_1_fp": 0.6, "lesions": 5,
                         "images": 10, "froc": {"fp_per_image": [0.1, 0.5, 1.0], "sensitivity": [0.2, 0.4, 0.6]}}


def write_localizing_bundle(uri: str, *, image_size: int = 128, seed: int = 0) -> str:
    """An untrained EfficientNet-Lite0 with a fracture map at a small input size, no Ray Train:
    the map head's output bias is raised from -4 (its "nothing anywhere" start) to 0, so its
    peaks reach ~0.9 and every image gets findings (where depends on the random weights)."""
    import torch

    from fracray.models.registry import create_model, resolve_preprocess
    from fracray.artifacts.bundle import BundleMeta, save_bundle

    torch.manual_seed(seed)
    net = create_model("efficientnet_lite0", pretrained=False, localization=True)
    with torch.no_grad():
        net.map_head.out.bias.fill_(0.0)
    config = resolve_preprocess("efficientnet_lite0", image_size=image_size)
    meta = BundleMeta(task="fracture", model={}, preprocess=config.to_dict(), classes=["normal", "abnormal"],
                      threshold=0.5, threshold_rule="fixed (untrained)",
                      operating_points={"sensitivity>=0.90": {"threshold": 0.3, "sensitivity": None,
                                                              "specificity": None}},
                      metrics={"valid": {"auroc": 0.5, "n": 10}, "valid_localization": LOCALIZING_VALIDATION},
                      data={"dataset": "synthetic", "train_images": 8, "valid_images": 10,
                            "localization": LOCALIZING_DATA},
                      training=LOCALIZING_TRAINING,
                      inference={"tta_flip": False, "findings": {"min_score": 0.5, "region_level": 0.8,
                                                                 "max_findings": 3}},
                      intended_use="Untrained weights for tests only. Outputs are meaningless.")
    return save_bundle(uri, net.eval(), meta)


def write_detector_bundle(uri: str, *, image_size: int = 128, seed: int = 0) -> str:
    """An untrained EfficientNet-Lite0 with the box detector (models.detection), no Ray Train: the
    detector's class bias is raised from its "nothing anywhere" prior to 0, so every image gets
    boxes (where depends on the random weights); a fusion and a box calibration as a trained
    detector's bundle carries them, so both are exercised wherever the bundle is used."""
    import torch

    from fracray.models.registry import create_model, resolve_preprocess
    from fracray.artifacts.bundle import BundleMeta, save_bundle

    torch.manual_seed(seed)
    net = create_model("efficientnet_lite0", pretrained=False, localization=True, localization_head="detector")
    with torch.no_grad():
        net.detector.cls.bias.fill_(0.0)
    config = resolve_preprocess("efficientnet_lite0", image_size=image_size)
    meta = BundleMeta(task="fracture", model={}, preprocess=config.to_dict(), classes=["normal", "abnormal"],
                      threshold=0.5, threshold_rule="fixed (untrained)",
                      metrics={"valid": {"auroc": 0.5, "n": 10}, "valid_localization": LOCALIZING_VALIDATION},
                      data={"dataset": "synthetic", "train_images": 8, "valid_images": 10,
                            "localization": LOCALIZING_DATA},
                      training=LOCALIZING_TRAINING,
                      inference={"tta_flip": True, "findings": {"min_score": 0.3, "region_level": 0.5,
                                                                "max_findings": 3},
                                 "fusion": {"features": ["classifier_logit", "top_box_logit"], "weights": [1.0, 0.5],
                                            "bias": -0.2},
                                 "box_calibration": {"a": 1.2, "b": -0.1}},
                      intended_use="Untrained weights for tests only. Outputs are meaningless.")
    return save_bundle(uri, net.eval(), meta)


@pytest.fixture(scope="session")
def detector_single_index(tmp_path_factory) -> str:
    """An untrained box-detector bundle as a single-model index (no router)."""
    from fracray.artifacts.index import ModelIndex, write_model_index

    root = tmp_path_factory.mktemp("detector")
    bundle = write_detector_bundle(str(root / "fracture_all"))
    index_uri = str(root / "model_index.json")
    write_model_index(index_uri, ModelIndex(router=None, classifiers={"all": bundle}, dataset="untrained"))
    return index_uri


@pytest.fixture(scope="session")
def localizing_index(tmp_path_factory, untrained_index):
    """untrained_index's router and humerus model with a wrist model that has a fracture map."""
    from fracray.artifacts.index import ModelIndex, read_model_index, write_model_index

    root = tmp_path_factory.mktemp("localizing")
    base = read_model_index(untrained_index)
    wrist = write_localizing_bundle(str(root / "fracture_wrist"))
    index_uri = str(root / "model_index.json")
    write_model_index(index_uri, ModelIndex(router=base.router, classifiers={**base.classifiers, "wrist": wrist},
                                            dataset="untrained", created=base.created))
    # The same fracture-map model alone (no router): one classifier for every image.
    write_model_index(str(root / "single" / "model_index.json"),
                      ModelIndex(router=None, classifiers={"all": wrist}, dataset="untrained", created=base.created))
    return index_uri


@pytest.fixture(scope="session")
def localizing_single_index(localizing_index) -> str:
    """The fracture-map model as a single-model index (no router)."""
    return str(Path(localizing_index).parent / "single" / "model_index.json")
