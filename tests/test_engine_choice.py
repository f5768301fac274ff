"""Which engine and precision run (fracray.inference.engines.choice): a value given by a flag,
a config field or the code wins; not given (None, or "auto"), $FRACRAY_ENGINE / $FRACRAY_PRECISION
decide where set, else auto and exact. The same rule for serve, evaluate, score and the benchmarks."""

from __future__ import annotations

import pytest

from fracray.inference.engines.choice import ENGINE_ENV, PRECISION_ENV, requested


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(ENGINE_ENV, raising=False)
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    return monkeypatch


def test_a_given_value_beats_the_environment(clean_env):
    clean_env.setenv(ENGINE_ENV, "onnxruntime")
    clean_env.setenv(PRECISION_ENV, "fast")
    assert requested("engine", "torch") == "torch"
    assert requested("precision", "exact") == "exact"


def test_the_environment_decides_where_nothing_is_given(clean_env):
    clean_env.setenv(ENGINE_ENV, "onnxruntime")
    clean_env.setenv(PRECISION_ENV, "fast")
    assert requested("engine") == requested("engine", "auto") == "onnxruntime"
    assert requested("precision") == requested("precision", None) == "fast"
    assert requested("engine", environment=False) == "auto"  # the fast-mode validation's own use


def test_defaults_without_either(clean_env):
    assert (requested("engine"), requested("precision")) == ("auto", "exact")


def test_unknown_names_say_where_they_came_from(clean_env):
    with pytest.raises(ValueError, match=r"'tensorrt' \(engine\)"):
        requested("engine", "tensorrt")
    clean_env.setenv(ENGINE_ENV, "tensorrt")
    with pytest.raises(ValueError, match=r"'tensorrt' \(\$FRACRAY_ENGINE\)"):
        requested("engine")
    assert requested("engine", "torch") == "torch"  # a flag given is not spoiled by a bad variable


def _serve(argv):
    from fracray.cli import serve

    return serve.config_from_args(serve.build_parser().parse_args(argv)).args


def _evaluate(argv):
    from fracray.cli import evaluate

    return evaluate.config_from_args(evaluate.build_parser().parse_args(
        ["--models", "m.json", "--dataset", "fracatlas", "--data", "d", *argv]))


def _score(argv):
    from fracray.cli import score_archive

    return score_archive.config_from_args(score_archive.build_parser().parse_args(
        ["--input", "a", "--models", "m.json", "--output", "o", *argv]))


@pytest.mark.parametrize("command", [_serve, _evaluate, _score], ids=["serve", "evaluate", "score"])
def test_the_commands_flag_beats_the_environment_and_no_flag_follows_it(command, clean_env):
    """FRACRAY_ENGINE=onnxruntime with --engine torch: torch; without --engine: onnxruntime.
    The same for the precision."""
    clean_env.setenv(ENGINE_ENV, "onnxruntime")
    clean_env.setenv(PRECISION_ENV, "fast")
    given = command(["--engine", "torch", "--precision", "exact"])
    assert (requested("engine", given.engine), requested("precision", given.precision)) == ("torch", "exact")
    none_given = command([])
    assert (requested("engine", none_given.engine), requested("precision", none_given.precision)) == \
        ("onnxruntime", "fast")
