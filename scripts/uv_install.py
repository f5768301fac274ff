"""`uv pip install` with what pip is configured with here (pip.conf files and PIP_* variables:
index URLs, find-links, constraints, the certificate bundle), which uv does not read itself.

    .venv/bin/python scripts/uv_install.py -e '.[test]'

Used by scripts/bootstrap.sh; the arguments go to `uv pip install` after the ones read from pip.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

# pip's option -> uv's, with the same meaning (pip's configuration separates several values by spaces)
OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
           "find-links": "--find-links", "constraint": "--constraint", "trusted-host": "--allow-insecure-host"}
# The sections `pip install` reads, in its override order (pip.conf's [global], [install], then PIP_*)
SECTIONS = {"global": 0, "install": 1, ":env:": 2}


def pip_configuration(listing: str | None = None) -> tuple[list[str], dict[str, str]]:
    """uv's options and environment for what `pip config list` shows (``key='value'`` lines,
    the value as Python's repr, so a multi-line pip.conf value arrives with its newlines)."""
    if listing is None:
        listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                 check=True).stdout
    # As pip's install command reads them: the [global] sections of every file, then [install],
    # then the PIP_* variables (":env:"); a later one overrides an earlier one, file by file.
    lines = [line.partition("=") for line in listing.splitlines()]
    lines = sorted((line for line in lines if line[0].rsplit(".", 1)[0] in SECTIONS),
                   key=lambda line: SECTIONS[line[0].rsplit(".", 1)[0]])
    values: dict[str, str] = {}
    for key, _, raw in lines:
        try:
            value = str(ast.literal_eval(raw.strip()))
        except (ValueError, SyntaxError):
            value = raw.strip()
        values[key.rsplit(".", 1)[-1]] = value
    args: list[str] = []
    for option, flag in OPTIONS.items():
        for item in values.get(option, "").split():
            args += [flag, item]
    if values.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    env = {"SSL_CERT_FILE": values["cert"]} if values.get("cert") else {}  # uv's TLS roots
    if "--extra-index-url" in args or "--find-links" in args:
        # pip takes the best version from all indexes together; uv only from the first that has the
        # package, which would miss PyPI's release when a local index holds an older one of it.
        args += ["--index-strategy", "unsafe-best-match"]
    return args, env


def main(argv: list[str]) -> int:
    args, env = pip_configuration()
    uv = Path(sys.executable).with_name("uv")
    command = [str(uv), "pip", "install", "--python", sys.executable, *args, *argv]
    return subprocess.run(command, env={**os.environ, **env}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
