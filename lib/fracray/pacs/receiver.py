"""The DICOM node's C-STORE receiver (SCP): the presentation contexts it accepts, and the
handler that answers each instance: radiographs it can classify are spooled before the sender
gets its success; everything else is acknowledged and skipped, with one log line naming the
SOP class and the reason (the rule: ``imaging.instances``, which STOW-RS applies too)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pydicom import uid as dicom_uid
from pynetdicom import AE, AllStoragePresentationContexts, VerificationPresentationContexts

from ..imaging.instances import RADIOGRAPH_SOP_CLASSES, refusal
from .privacy import study_key
from .spool import Spool

if TYPE_CHECKING:
    from .listener import ListenerStats

__all__ = ["DECODABLE_SYNTAXES", "skip_reason", "add_contexts", "Receiver"]

logger = logging.getLogger(__name__)

# Transfer syntaxes that the service decodes (pydicom with pylibjpeg, openjpeg and rle); only
# these are accepted for the radiograph classes, so a sender that could also send another syntax
# sends one of these.
DECODABLE_SYNTAXES = [
    dicom_uid.ExplicitVRLittleEndian, dicom_uid.ImplicitVRLittleEndian, dicom_uid.DeflatedExplicitVRLittleEndian,
    dicom_uid.ExplicitVRBigEndian,
    dicom_uid.JPEGBaseline8Bit, dicom_uid.JPEGExtended12Bit, dicom_uid.JPEGLossless, dicom_uid.JPEGLosslessSV1,
    dicom_uid.JPEGLSLossless, dicom_uid.JPEGLSNearLossless, dicom_uid.JPEG2000Lossless, dicom_uid.JPEG2000,
    dicom_uid.RLELossless,
]


def _sop_class_name(sop_class: str) -> str:
    name = dicom_uid.UID(sop_class).name
    return name if name != sop_class else f"SOP class {sop_class}"


def skip_reason(sop_class: str, ds) -> str | None:
    """Why an instance is acknowledged but not classified, or None to classify it: the one rule
    (``imaging.instances.refusal``, which STOW-RS applies too). Says the SOP class and the reason,
    never anything from the header that identifies someone."""
    refused = refusal(ds, sop_class)
    return refused.detail if refused else None


def add_contexts(ae: AE) -> None:
    """Verification, and every storage SOP class: radiographs in the syntaxes that decode, the
    rest (skipped anyway) in any syntax."""
    for context in VerificationPresentationContexts:
        ae.add_supported_context(context.abstract_syntax)
    for context in AllStoragePresentationContexts:
        sop_class = context.abstract_syntax
        ae.add_supported_context(sop_class, DECODABLE_SYNTAXES if sop_class in RADIOGRAPH_SOP_CLASSES
                                 else list(dicom_uid.AllTransferSyntaxes))


class Receiver:
    """The EVT_C_STORE handler: ``(evt.EVT_C_STORE, Receiver(spool, stats).on_store)``."""

    def __init__(self, spool: Spool, stats: "ListenerStats"):
        self.spool = spool
        self.stats = stats

    def on_store(self, event) -> int:
        sop_class = str(event.context.abstract_syntax)
        try:
            ds = event.dataset
        except Exception as exc:  # a data set pydicom cannot parse: acknowledged, never a crash
            self.stats.skipped += 1
            logger.warning("skipped an instance of %s: unreadable data set (%s); acknowledged, not classified",
                           _sop_class_name(sop_class), type(exc).__name__)
            return 0x0000
        try:
            reason = skip_reason(sop_class, ds)
        except Exception as exc:  # a header element that does not parse
            reason = f"{_sop_class_name(sop_class)} with an unreadable header ({type(exc).__name__})"
        if reason:
            self.stats.skipped += 1
            logger.info("skipped an instance: %s; acknowledged, not classified", reason)
            return 0x0000
        key = study_key(str(ds.StudyInstanceUID))
        try:
            data = event.encoded_dataset(include_meta=True)  # as sent: no re-encoding
            first = self.spool.write(key, str(ds.SOPInstanceUID), data)
        except OSError as exc:  # spool full or not writable: the sender keeps the image and may retry
            logger.error("could not spool an instance of study %s (%s): answered 'out of resources' (0xA700)",
                         key, type(exc).__name__)
            return 0xA700
        self.stats.received += 1
        if first:
            logger.info("study %s: receiving", key)
        return 0x0000
