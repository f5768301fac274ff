"""The product's jobs as library functions: a typed config in, a typed result out.

``index``, ``train`` (train_all), ``evaluate``, ``score`` and ``serve`` are called the same way
by the ``fracray`` console command, by ``pipelines/*.py`` (what ``ray job submit`` runs) and
by any Python program; ``fracray.cli`` only parses arguments into these configs.
"""
