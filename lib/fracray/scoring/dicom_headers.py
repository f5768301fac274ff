"""A scoring run's DICOM inputs' study date and equipment (StudyDate, else AcquisitionDate or
ContentDate; Manufacturer, ManufacturerModelName), read from each file's header prefix: what the
review app's date filter and the monitoring's per-day and per-equipment plots group by."""

from __future__ import annotations

import datetime as _dt
import io
import re

import pyarrow as pa

from .. import dicomweb, storage
from ..storage import StorageOptions

__all__ = ["dicom_headers", "dicom_date"]


_HEADER_BYTES = 64 * 1024  # a DICOM header's prefix: read again for the study date and equipment


def dicom_date(ds) -> _dt.date | None:
    for keyword in ("StudyDate", "AcquisitionDate", "ContentDate"):
        text = str(ds.get(keyword, "") or "").strip()
        if re.fullmatch(r"\d{8}", text):
            try:
                return _dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
            except ValueError:
                continue
    return None


def dicom_headers(batch: pa.Table, options: StorageOptions | None = None) -> pa.Table:
    """study_date, manufacturer, manufacturer_model of the batch's DICOM rows (those with a SOP
    Instance UID), from the first 64 KiB of each file; null for other rows, PACS (dicomweb://)
    instances, and headers that do not parse. A Ray Data stage after the predictor."""
    import pydicom

    dates, makers, models = [], [], []
    for uri, sop in zip(batch["image_uri"].to_pylist(), batch["sop_instance_uid"].to_pylist()):
        date = maker = model = None
        if sop and uri and not dicomweb.is_dicomweb(uri):
            try:
                data, _ = storage.read_prefix(uri, _HEADER_BYTES, options)
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True,
                                     specific_tags=["StudyDate", "AcquisitionDate", "ContentDate", "Manufacturer",
                                                    "ManufacturerModelName"])
                date = dicom_date(ds)
                maker = str(ds.get("Manufacturer", "") or "").strip() or None
                model = str(ds.get("ManufacturerModelName", "") or "").strip() or None
            except Exception:  # noqa: BLE001 - a header that does not parse in its prefix: nulls, the score stands
                pass
        dates.append(date)
        makers.append(maker)
        models.append(model)
    for name, values, kind in (("study_date", dates, pa.date32()), ("manufacturer", makers, pa.string()),
                               ("manufacturer_model", models, pa.string())):
        column = pa.array(values, kind)
        if name in batch.column_names:
            batch = batch.set_column(batch.column_names.index(name), name, column)
        else:
            batch = batch.append_column(name, column)
    return batch
