"""The application with default arguments, for ``serve build serving.graph:app``.

serving/config.yaml was written from it (then pointed at the builder with ``args``);
tests/test_serving.py rebuilds it and checks the two still agree. Binding only
declares the graph: nothing loads until Serve starts the replicas.
"""
from fracray.serving.app import build_app
from fracray.serving.args import ServeArgs

app = build_app(ServeArgs())
