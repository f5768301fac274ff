"""fracray: distributed fracture and abnormality detection in musculoskeletal radiographs, on Ray.

The package is built in layers (:data:`LAYERS`, bottom to top). A module may import its own
subpackage and any lower layer, never a higher one nor another subpackage of its own layer;
tests/test_layering.py checks every import, and that docs/layout.md shows the
same order.
"""

__version__ = "0.1.0"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("dicomweb",),                       # a PACS as a storage scheme (storage reads through it)
    ("storage", "raycluster"),           # where bytes live; which Ray a command runs on
    ("imaging",),                        # decode, preprocess, fracture regions and findings
    ("data", "models"),                  # manifests and Ray Data streams; the networks
    ("artifacts", "metrics"),            # bundles and the model index; metrics, calibration, the study rule
    ("training", "inference"),           # Ray Train runs; the predictor (router -> bone classifier)
    ("evaluation",),                     # the predictor's graph on labelled data
    ("scoring", "serving", "reports"),   # bulk scoring, the HTTP service, report files
    ("pacs",),                           # results as DICOM objects, published to a PACS
    ("review",),                         # a scoring run in the browser: worklist, feedback, monitoring
    ("jobs", "benchmarks"),              # the jobs (typed config -> typed result); the benchmarks
    ("cli",),                            # arguments -> jobs: the `fracray` command and pipelines/*.py
)
