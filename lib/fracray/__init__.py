"""fracray: distributed fracture and abnormality detection in musculoskeletal radiographs, on Ray."""

__version__ = "0.1.0"
