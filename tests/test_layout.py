"""The layering holds (ARCHITECTURE.md): the maths packages import no Ray, no MLflow and no application layer,
directly, through another module, or in a function body, and no module of metallo_core imports itself back.

So the maths runs and is tested without a cluster or a tracking server, and the dependency graph reads top
down: commands -> train / tuning -> tracking -> maths -> shared base modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "metallo_core"
MATHS_PACKAGES = ("data", "datasets", "models", "ssl", "fewshot", "multilabel")
# Small modules every layer shares (config loading, errors, paths, precision, progress lines, CSV writing):
# each imports nothing but another of them.
SHARED_BASE = ("config", "csv_output", "errors", "precision", "progress", "seeding", "settings", "storage",
               "user_paths", "versioned_json")
# The layers, lowest first (ARCHITECTURE.md): a module imports only from its own layer and those below.
LAYERS = (
    ("base", (*SHARED_BASE, "console", "__init__")),
    ("maths", MATHS_PACKAGES),
    ("tracking", ("tracking",)),
    ("stages", ("train", "tuning", "report")),
    ("commands", ("cli", "__main__", "commands", "stage_table", "entrypoint", "config_docs", "output_guard",
                  "quickstart", "quickstart_scratch")),
)
# The one exception: Ray Data in data's streaming and ingestion modules (they plan and run Ray tasks).
MAY_USE_RAY = ("data.stream", "data.ingest")
ORCHESTRATION = ("ray", "mlflow")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name a file imports, at any depth (function-level imports included), relative imports
    made absolute; `from a import b` gives both `a` and `a.b` (b may be a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


class ImportGraph:
    """The modules of one package and what each imports: edges inside the package, external top-level names."""

    def __init__(self, root: Path, package: str):
        self.package = package
        files = {module_name(path, root): path for path in sorted((root / package).rglob("*.py"))}
        self.internal: dict[str, set[str]] = {}
        self.external: dict[str, set[str]] = {}
        for module, path in files.items():
            names = imported_names(path, module)
            own = {self._owner(name, files) for name in names if name.split(".")[0] == package}
            self.internal[module] = {target for target in own if target and target != module}
            self.external[module] = {name.split(".")[0] for name in names if name.split(".")[0] != package}

    @staticmethod
    def _owner(name: str, files: dict[str, Path]) -> str | None:
        """The module a dotted name lives in (`a.b.func` -> `a.b`)."""
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    def reachable(self, module: str) -> dict[str, list[str]]:
        """Every module `module` imports transitively -> one import chain that reaches it."""
        chains = {module: [module]}
        stack = [module]
        while stack:
            current = stack.pop()
            for target in sorted(self.internal[current]):
                if target not in chains:
                    chains[target] = chains[current] + [target]
                    stack.append(target)
        return chains

    def cycles(self) -> list[list[str]]:
        """Strongly connected groups of more than one module (Tarjan), each sorted."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []

        def visit(module: str) -> None:
            index[module] = low[module] = len(index)
            stack.append(module)
            on_stack.add(module)
            for target in sorted(self.internal[module]):
                if target not in index:
                    visit(target)
                    low[module] = min(low[module], low[target])
                elif target in on_stack:
                    low[module] = min(low[module], index[target])
            if low[module] == index[module]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == module:
                        break
                if len(group) > 1:
                    found.append(sorted(group))

        for module in sorted(self.internal):
            if module not in index:
                visit(module)
        return found


def within(module: str, package: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == f"{package}.{prefix}" or module.startswith(f"{package}.{prefix}.") for prefix in prefixes)


def layering_violations(graph: ImportGraph) -> dict[str, list[str]]:
    """maths module -> what it must not reach, each as an import chain `a -> b -> ray`."""
    package = graph.package
    allowed = MATHS_PACKAGES + SHARED_BASE
    violations: dict[str, list[str]] = {}
    for module in sorted(graph.internal):
        if not within(module, package, MATHS_PACKAGES):
            continue
        problems = []
        for target, chain in graph.reachable(module).items():
            if target != package and not within(target, package, allowed):
                problems.append(" -> ".join(chain))
            elif not within(target, package, MAY_USE_RAY):
                reached = sorted(graph.external[target] & set(ORCHESTRATION))
                problems += [" -> ".join(chain + [name]) for name in reached]
            elif "mlflow" in graph.external[target]:
                problems.append(" -> ".join(chain + ["mlflow"]))
        if problems:
            violations[module] = sorted(problems)
    return violations


def layer_of(module: str, package: str) -> int:
    """Index in LAYERS of the layer `module` belongs to; KeyError for a module no layer claims."""
    if module == package:
        return 0
    for index, (_, members) in enumerate(LAYERS):
        if within(module, package, members):
            return index
    raise KeyError(f"{module} belongs to no layer of tests/test_layout.py's LAYERS (and ARCHITECTURE.md)")


def upward_imports(graph: ImportGraph) -> list[str]:
    """`a (layer) -> b (higher layer)` for every import of a module from a layer above its own."""
    found = []
    for module in sorted(graph.internal):
        for target in sorted(graph.internal[module]):
            if layer_of(target, graph.package) > layer_of(module, graph.package):
                found.append(f"{module} ({LAYERS[layer_of(module, graph.package)][0]}) -> {target} "
                             f"({LAYERS[layer_of(target, graph.package)][0]})")
    return found


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph(ROOT, PACKAGE)


def test_maths_packages_reach_no_orchestration_and_no_application_layer(graph):
    assert layering_violations(graph) == {}


def test_every_module_imports_only_its_own_layer_and_those_below(graph):
    assert upward_imports(graph) == []


def test_no_module_imports_itself_back(graph):
    assert graph.cycles() == []


def write_package(root: Path, files: dict[str, str]) -> ImportGraph:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return ImportGraph(root, "pkg")


def test_the_check_sees_an_import_two_hops_away_in_a_function_body(tmp_path):
    """A planted violation: fewshot -> models (fine) -> a function-level import of the application layer."""
    planted = write_package(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "fewshot/__init__.py": "",
        "fewshot/maths.py": "from pkg.models import nets\nfrom . import helpers\n",
        "fewshot/helpers.py": "from ..errors import *\n",
        "models/__init__.py": "",
        "models/nets.py": "def load():\n    from pkg.tracking.store import fetch\n",
        "tracking/__init__.py": "",
        "tracking/store.py": "import mlflow\n",
        "data/__init__.py": "",
        "data/stream.py": "import ray.data\n",
        "data/decode.py": "def f():\n    import ray\n",
    })
    assert layering_violations(planted) == {
        "pkg.data.decode": ["pkg.data.decode -> ray"],
        "pkg.fewshot.maths": ["pkg.fewshot.maths -> pkg.models.nets -> pkg.tracking.store"],
        "pkg.models.nets": ["pkg.models.nets -> pkg.tracking.store"],
    }


def test_the_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    planted = write_package(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/backbones.py": "def load():\n    from pkg.models.sources import read\n",
        "models/sources.py": "from pkg.models import registry\n",
        "models/registry.py": "from pkg.models.backbones import load\n",
        "models/plain.py": "from pkg.models import backbones\n",
    })
    assert planted.cycles() == [["pkg.models.backbones", "pkg.models.registry", "pkg.models.sources"]]


def test_the_check_sees_an_import_from_a_layer_above(tmp_path):
    planted = write_package(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "tracking/__init__.py": "",
        "tracking/store.py": "from pkg.errors import *\ndef f():\n    from pkg.train import dino\n",
        "train/__init__.py": "",
        "train/dino.py": "from pkg.tracking import store\n",
    })
    assert upward_imports(planted) == ["pkg.tracking.store (tracking) -> pkg.train (stages)",
                                       "pkg.tracking.store (tracking) -> pkg.train.dino (stages)"]
