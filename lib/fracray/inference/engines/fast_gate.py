"""The fast-mode gate: a bundle runs the fast precision (OpenVINO, INT8 or bf16) only where its
``bundle.json`` records a passed validation (``inference.fast_mode``, written by ``fracray
validate-fast-mode``: ΔAUROC <= 0.005 and Δsensitivity at the bundle's threshold <= 0.01 on
FracAtlas valid, see :mod:`fracray.evaluation.fast_mode`) for these weights, that kind and this
OpenVINO version; elsewhere it is refused with the command that validates it. A router (a
body-part bundle) runs exact in fast mode: the gate is defined on fracture classifiers."""

from __future__ import annotations

from typing import Any

# Where a bundle records its fast-mode validation (bundle.json's inference[FAST_MODE_KEY]) and the
# gate it must have passed: the bundle format's rules (artifacts.bundle).
from ...artifacts.bundle import FAST_MODE_KEY
from ...artifacts.bundle import FAST_MODE_MAX_DELTA_AUROC as MAX_DELTA_AUROC
from ...artifacts.bundle import FAST_MODE_MAX_DELTA_SENSITIVITY as MAX_DELTA_SENSITIVITY
from ...artifacts.bundle import FAST_MODE_NOT_FOR_VALIDATION as NOT_FOR_VALIDATION
from .base import InferenceEngine, engine_label

__all__ = ["FAST_MODE_KEY", "FastModeRefused", "check_fast_mode", "fast_mode_command"]


class FastModeRefused(ValueError):
    """A bundle asked to run in fast precision without a passed validation of it."""



def fast_mode_command(bundle: str, dataset: str | None = None, data: str | None = None) -> str:
    """The command that validates ``bundle``'s fast mode (the data as the bundle's training
    recorded it, where it did)."""
    return (f"fracray validate-fast-mode --bundle {bundle} --dataset {dataset or 'fracatlas'} "
            f"--data {data or '<the FracAtlas folder>'} --split valid")


def check_fast_mode(record: Any, *, bundle: str, command: str, weights_sha256: str | None = None,
                    engine: InferenceEngine | None = None) -> None:
    """Raise :class:`FastModeRefused` (a ValueError naming the bundle and ``command``) unless
    ``record`` (bundle.json's ``inference.fast_mode``) is a passed validation of these
    weights (``weights_sha256``) and, given the built ``engine``, of its engine, precision and
    OpenVINO version."""

    def refuse(why: str) -> None:
        raise FastModeRefused(f"Fast precision refused for bundle {bundle}: {why}. A bundle runs fast only after "
                              f"a passed validation of fast against exact on labelled data (AUROC and sensitivity "
                              f"at its threshold within the gate of `fracray validate-fast-mode --help`). "
                              f"Validate it with: {command}   (or run it exact: --precision exact)")

    if not record:
        refuse(f"its bundle.json records no fast-mode validation (inference.{FAST_MODE_KEY})")
    if not isinstance(record, dict):
        refuse(f"inference.{FAST_MODE_KEY} in its bundle.json is not a validation record")
    if record.get("passed") is not True:
        refuse(f"its fast-mode validation failed ({_record_summary(record)})")
    gate = (record.get("max_delta_auroc"), record.get("max_delta_sensitivity"))
    if not all(isinstance(v, (int, float)) for v in gate) or gate[0] > MAX_DELTA_AUROC \
            or gate[1] > MAX_DELTA_SENSITIVITY:
        refuse(f"it was validated against the gate |ΔAUROC| <= {gate[0]}, |Δsensitivity| <= {gate[1]}, not "
               f"this version's {MAX_DELTA_AUROC} and {MAX_DELTA_SENSITIVITY}")
    if record.get("split") in NOT_FOR_VALIDATION:
        refuse(f"it was measured on split {record.get('split')!r}, which holds images the model was trained on")
    if weights_sha256 is not None and record.get("weights_sha256") != weights_sha256:
        refuse("its weights are not the ones validated (weights_sha256 differs or is missing)")
    if engine is not None:
        if (record.get("engine"), record.get("precision")) != (engine.name, engine.precision):
            refuse(f"it was validated for {record.get('engine')}-{record.get('precision')}, and this machine "
                   f"runs {engine_label(engine)}")
        ran = engine.describe().get("openvino")
        if record.get("openvino") != ran:
            refuse(f"it was validated with OpenVINO {record.get('openvino')}, and {ran} is installed")
        if record.get("precision") == "int8" and engine.describe().get("graph_sha256") != record.get("graph_sha256"):
            refuse(f"its INT8 graph ({record.get('graph')}) is not the one validated (graph_sha256 differs)")


def _record_summary(record: dict[str, Any]) -> str:
    def num(key: str) -> str:
        value = record.get(key)
        return f"{value:+.5f}" if isinstance(value, (int, float)) else "?"

    return (f"ΔAUROC {num('delta_auroc')}, Δsensitivity {num('delta_sensitivity')} on {record.get('images', '?')} "
            f"images of {record.get('dataset', '?')} {record.get('split', '?')}, {record.get('validated_at', '?')}")

