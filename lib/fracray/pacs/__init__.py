"""DICOM in and out of a hospital's PACS: results as DICOM objects (``results``)."""
