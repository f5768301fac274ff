"""The package's layers (``fracray.LAYERS``) hold in every import, read from the source with ``ast``.

A module may import its own subpackage and lower layers, never a higher layer nor another
subpackage of its own layer; imports inside functions count the same. A fracray import inside
a function is allowed only to keep a heavy dependency out of its importer's import (see
DEFERRED); one that dodges a cycle is a layering bug, and one whose importer already imports
that dependency is no use: both belong at the top of the module.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections import defaultdict
from pathlib import Path

import fracray
from conftest import REPO

PACKAGE = REPO / "lib" / "fracray"

# fracray modules that other modules import inside functions, and the heavy package that each
# brings in at import (torch, timm, Ray Serve, OpenCV, Pillow): what the deferral saves.
DEFERRED = {
    "fracray.inference.predictor": "torch",   # evaluation, scoring, serving: the model runs in Ray actors
    "fracray.inference.engines.base": "torch",            # serving and the benchmarks name the engine that ran
    "fracray.inference.engines.export": "torch",          # the fast-mode validation quantises the cached export
    "fracray.inference.engines.onnxruntime_engine": "torch",  # ... checking it with ONNX Runtime's reading
    "fracray.inference.engines.openvino_engine": "torch",  # the engine benchmark's --help without torch
    "fracray.inference.gradcam": "torch",     # evaluation and serving draw heatmaps
    "fracray.models.registry": "timm",        # a model is built only where a bundle is made or loaded
    "fracray.jobs.train": "cv2",              # serve trains the default only when no model exists
    "fracray.training.trainer": "torch",      # train_all's command line parses without it (`--help`)
    "fracray.training.step": "torch",         # the training benchmark's --help without torch
    "fracray.training.losses": "torch",       # ... and without the losses
    "fracray.serving.app": "ray",             # the serving benchmark starts Ray Serve
    "fracray.imaging.preprocess": "cv2",      # the service's ingress, the evaluation, check_scope, bundle metadata
    "fracray.imaging.findings": "cv2",        # the evaluation reads a bundle's findings settings
    "fracray.imaging.scope": "cv2",           # the ingress and check_scope
    "fracray.data.synthetic": "cv2",          # check_scope renders radiographs
    "fracray.imaging.decode": "PIL",          # the ingress, the evaluation and check_scope decode
}


@dataclasses.dataclass(frozen=True)
class Import:
    path: Path
    line: int
    importer: str      # dotted module name
    target: str        # dotted name: a fracray module, or a third-party top-level package
    deferred: bool     # inside a function
    runtime: bool      # False under ``if TYPE_CHECKING:``


def module_name(path: Path, root: Path) -> str:
    parts = (root.name,) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_imports(root: Path, sources: dict[str, str] | None = None) -> list[Import]:
    """Every import of every module under ``root`` (a package folder), or of ``sources``
    ({dotted module name: code}, for the checker's own tests)."""
    if sources is None:
        files = {module_name(p, root): (p, p.read_text()) for p in sorted(root.rglob("*.py"))}
        packages = {module_name(p, root) for p in root.rglob("__init__.py")}
    else:
        files = {name: (Path(name.replace(".", "/") + ".py"), code) for name, code in sources.items()}
        packages = {name.rsplit(".", i)[0] for name in sources for i in range(1, name.count(".") + 1)}
    modules = set(files) | packages
    out: list[Import] = []
    for name, (path, code) in files.items():
        package = name if name in packages else name.rsplit(".", 1)[0]
        _visit(ast.parse(code), path, name, package, modules, root.name, out, deferred=False, runtime=True)
    return out


def _visit(node, path, name, package, modules, top, out, *, deferred, runtime):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            _visit(child, path, name, package, modules, top, out, deferred=True, runtime=runtime)
        elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            _visit(child, path, name, package, modules, top, out, deferred=deferred, runtime=False)
        elif isinstance(child, (ast.Import, ast.ImportFrom)):
            for target in dict.fromkeys(_targets(child, package, modules, top)):
                out.append(Import(path, child.lineno, name, target, deferred, runtime))
        else:
            _visit(child, path, name, package, modules, top, out, deferred=deferred, runtime=runtime)


def _targets(node, package: str, modules: set[str], top: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name if a.name.split(".")[0] == top else a.name.split(".")[0] for a in node.names]
    if node.level:
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module
        if source.split(".")[0] != top:
            return [source.split(".")[0]]
    # ``from fracray.x import y``: the module fracray.x.y where there is one, else fracray.x.
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]


def unit(module: str) -> str:
    """The top-level subpackage or module a dotted fracray name belongs to ("" for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of() -> dict[str, int]:
    return {u: i for i, units in enumerate(fracray.LAYERS) for u in units}


def layering_violations(imports: list[Import], top: str = "fracray") -> list[str]:
    layers = layer_of()
    found = []
    for imp in imports:
        if imp.target.split(".")[0] != top:
            continue
        src, dst = unit(imp.importer), unit(imp.target)
        if src == dst or dst == "":
            continue
        if layers[dst] >= layers[src]:
            how = "a higher layer" if layers[dst] > layers[src] else "its own layer"
            found.append(f"{imp.path}:{imp.line}: {imp.importer} imports {imp.target}, {how} "
                         f"({src}: layer {layers[src]}, {dst}: layer {layers[dst]})")
    return found


def heavy_at_import(imports: list[Import]) -> dict[str, set[str]]:
    """Per fracray module: every other top-level package (third-party or standard library)
    that importing it imports, through the fracray modules it imports at module level."""
    direct: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        direct[imp.importer]  # every module, even one that imports nothing
        if imp.runtime and not imp.deferred:
            direct[imp.importer].add(imp.target)
    heavy = {m: {t for t in targets if t.split(".")[0] != "fracray"} for m, targets in direct.items()}
    changed = True
    while changed:
        changed = False
        for module, targets in direct.items():
            for target in targets:
                extra = heavy.get(target, set()) - heavy[module]
                if extra:
                    heavy[module] |= extra
                    changed = True
    return heavy


def deferral_problems(imports: list[Import]) -> list[str]:
    heavy = heavy_at_import(imports)
    found = []
    for imp in imports:
        if not imp.deferred or imp.target.split(".")[0] != "fracray":
            continue
        where = f"{imp.path}:{imp.line}: {imp.importer} imports {imp.target} inside a function"
        if imp.target not in DEFERRED:
            found.append(f"{where}: import it at the top of the module (or, to keep a heavy dependency "
                         f"out, add it to DEFERRED with that dependency)")
        elif DEFERRED[imp.target] not in heavy.get(imp.target, set()):
            found.append(f"{where}: DEFERRED says it brings in {DEFERRED[imp.target]}, which it does not")
        elif DEFERRED[imp.target] in heavy.get(imp.importer, set()):
            found.append(f"{where}, but {imp.importer} imports {DEFERRED[imp.target]} already: "
                         f"import it at the top of the module")
    return found


# ----------------------------------------------------------------------------- the package

def test_every_part_of_the_package_has_one_layer():
    parts = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    parts |= {p.parent.name for p in PACKAGE.glob("*/*.py")}  # serving/ is a namespace package
    declared = [u for units in fracray.LAYERS for u in units]
    assert len(declared) == len(set(declared)), f"a part is in two layers: {declared}"
    assert parts - set(declared) == set(), "give these a layer in fracray.LAYERS"
    assert set(declared) - parts == set(), "fracray.LAYERS names parts that do not exist"


def test_no_module_imports_a_higher_layer_or_a_neighbour():
    assert layering_violations(read_imports(PACKAGE)) == []


def test_imports_inside_functions_only_defer_a_heavy_dependency():
    imports = read_imports(PACKAGE)
    assert deferral_problems(imports) == []
    used = {imp.target for imp in imports if imp.deferred}
    assert set(DEFERRED) - used == set(), "DEFERRED names modules nobody imports inside a function"


def test_the_layout_page_shows_the_layers():
    """docs/layout.md (linked from the README) states the layer order, exactly as fracray.LAYERS."""
    assert "(docs/layout.md)" in (REPO / "README.md").read_text(), "the README should link docs/layout.md"
    page = (REPO / "docs" / "layout.md").read_text()
    assert page.startswith("# Layout\n"), "docs/layout.md should be the Layout page"
    shown = re.findall(r"Layers, bottom to top: (.+?)\.\n", page, re.DOTALL)
    assert len(shown) == 1, "docs/layout.md should say once 'Layers, bottom to top: a, b < c < ...'"
    assert " ".join(shown[0].split()) == " < ".join(", ".join(units) for units in fracray.LAYERS)


# ----------------------------------------------------------------------------- the checker itself

def test_the_checker_finds_an_import_upwards_a_neighbour_and_a_useless_deferral():
    sources = {
        "fracray.storage": "import pyarrow.fs\n",
        "fracray.training.trainer": "from ..inference.predictor import FracturePredictor\n",
        "fracray.training.orchestrate": "def run():\n    from ..evaluation import graph\n",
        "fracray.inference.predictor": ("import torch\nfrom .. import storage\n"
                                        "from ..artifacts import bundle\n"
                                        "def f():\n    from ..training.config import TrainConfig\n"),
        "fracray.artifacts.bundle": ("from typing import TYPE_CHECKING\n"
                                     "if TYPE_CHECKING:\n    from ..inference import predictor\n"),
        "fracray.evaluation.graph": ("import torch\n"
                                     "def f():\n    from ..inference.predictor import FracturePredictor\n"),
    }
    imports = read_imports(Path("fracray"), sources)
    problems = layering_violations(imports)
    assert any("fracray.training.trainer imports fracray.inference.predictor, its own layer" in p for p in problems)
    assert any("fracray.training.orchestrate imports fracray.evaluation.graph, a higher layer" in p for p in problems)
    assert any("fracray.inference.predictor imports fracray.training.config, its own layer" in p for p in problems)
    assert any("fracray.artifacts.bundle imports fracray.inference.predictor" in p for p in problems)
    assert not any("imports fracray.storage" in p for p in problems)
    deferrals = deferral_problems(imports)
    assert any("fracray.inference.predictor imports fracray.training.config inside a function: import it at the "
               "top" in p for p in deferrals)
    assert any("fracray.evaluation.graph imports fracray.inference.predictor inside a function, but "
               "fracray.evaluation.graph imports torch already" in p for p in deferrals)
    heavy = heavy_at_import(imports)
    assert heavy["fracray.inference.predictor"] >= {"torch", "pyarrow"}
    assert "torch" not in heavy["fracray.artifacts.bundle"]  # TYPE_CHECKING imports do not run
