"""scripts/uv_install.py: the install hands uv what pip is configured with (uv reads no pip
configuration), in options this uv accepts."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _uv_install():
    spec = importlib.util.spec_from_file_location("uv_install", REPO / "scripts" / "uv_install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pip_configuration_becomes_uv_options():
    # As `pip config list` prints them: the files' lines, then PIP_* variables' (":env:"), later overriding.
    listing = "\n".join([
        "global.cert='/etc/ca.crt'",
        "global.constraint='/etc/pip/constraints.txt'",
        "global.extra-index-url='\\nfile:///a/simple\\nfile:///b/simple'",   # a multi-line pip.conf value
        "global.find-links='/srv/old-wheels'",
        "global.timeout='60'",                                              # nothing of uv's
        "global.trusted-host='mirror.local'",
        ":env:.find-links='/opt/wheels'",                                   # PIP_FIND_LINKS wins, as in pip
    ])
    args, env = _uv_install().pip_configuration(listing)
    assert args == ["--extra-index-url", "file:///a/simple", "--extra-index-url", "file:///b/simple",
                    "--find-links", "/opt/wheels", "--constraint", "/etc/pip/constraints.txt",
                    "--allow-insecure-host", "mirror.local",
                    # pip picks the best version over every index; uv's default stops at the first
                    "--index-strategy", "unsafe-best-match"]
    assert env == {"SSL_CERT_FILE": "/etc/ca.crt"}
    assert _uv_install().pip_configuration("global.index-url='https://pypi.example/simple'\n:env:.no-index='1'") == \
        (["--index-url", "https://pypi.example/simple", "--no-index"], {})
    # [install] of one file over [global] of a later one; [download] is not the install's.
    assert _uv_install().pip_configuration("install.index-url='https://mirror/simple'\n"
                                           "download.find-links='/elsewhere'\n"
                                           "global.index-url='https://pypi.example/simple'") == \
        (["--index-url", "https://mirror/simple"], {})
    assert _uv_install().pip_configuration("") == ([], {})


def test_this_machines_pip_configuration_is_accepted_by_uv():
    uv = Path(sys.executable).with_name("uv")
    if not uv.exists():
        pytest.skip(f"no uv beside {sys.executable} (.venv was installed by pip)")
    args, _ = _uv_install().pip_configuration()
    accepted = subprocess.run([str(uv), "pip", "install", "--help"], capture_output=True, text=True, check=True).stdout
    for option in {a for a in args if a.startswith("--")} | {"--allow-insecure-host", "--index-strategy",
                                                             "--compile-bytecode", "--python", "--no-index"}:
        assert option in accepted, option
