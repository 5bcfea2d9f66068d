"""The package's layers only point down: every module imports only modules of lower layers (read from its source,
function-level imports included), and every module imports first, alone, in an interpreter of its own.

A new module must be given a layer in ``LAYERS``: the test fails for a module it does not place.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dmin_diffusers"
#: lowest first; a module may import modules of lower layers only (names relative to ``dmin_diffusers``)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves: no package imports", ("_version", "output_functions", "preconditionings", "locks", "knn_file",
                                     "per_layer", "objectives", "training_data", "fingerprints", "dataset_rows")),
    ("the config", ("config",)),
    ("what needs only the config", ("inputs", "store", "hnsw", "model_state", "setting_arguments", "code_cache")),
    ("storage and compression", ("knn_projection", "preconditioner", "sketch", "result")),
    ("search", ("search",)),
    ("artefacts and the Hub", ("artefacts", "hub")),
    ("family base", ("families.base",)),
    ("family registry", ("families.registry",)),
    ("families", ("families", "families.ddpm", "families.sd", "families.sdxl", "families.sd3", "families.flux")),
    ("config resolution", ("resolution",)),
    ("gradients, card and build directory", ("gradients", "card", "build_directory")),
    ("index", ("index",)),
    ("caching", ("caching",)),
    ("mixin", ("mixin",)),
    ("ready-made pipelines", ("pipelines",)),
    ("applications", ("app", "callbacks.gradient_cache")),
    ("entry points", ("cli", "callbacks", "")),  # "": the package itself
]
#: where a subpackage's files live when they are not under dmin_diffusers/ (pyproject's package-dir)
PACKAGE_DIRS = {PACKAGE: ROOT / "dmin_diffusers", f"{PACKAGE}.callbacks": ROOT / "callbacks"}


def qualified(short: str) -> str:
    return f"{PACKAGE}.{short}" if short else PACKAGE


def package_modules() -> dict[str, Path]:
    """Every module of the package (and its installed subpackages), by dotted name."""
    modules = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports, anywhere in its source except under ``if TYPE_CHECKING:`` (type
    annotations only, never run)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = {f"{source}.{alias.name}" for alias in node.names} & set(modules)
            # `from . import code_cache` imports a module; `from .families import X` imports the package
            found.update(submodules or {source})
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {target for target in found if target in modules and target != name}


def layer_of() -> dict[str, int]:
    return {qualified(short): level for level, (_, shorts) in enumerate(LAYERS) for short in shorts}


def test_every_module_has_a_layer():
    layers = layer_of()
    placed = [qualified(short) for _, shorts in LAYERS for short in shorts]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    modules = package_modules()
    assert not sorted(set(modules) - set(layers)), "give these modules a layer in LAYERS"
    assert not sorted(set(layers) - set(modules)), "LAYERS names modules that do not exist"


def test_no_module_imports_a_higher_layer():
    layers, modules = layer_of(), package_modules()
    upward = [
        f"{name} (layer {layers[name]}: {LAYERS[layers[name]][0]}) imports {target} "
        f"(layer {layers[target]}: {LAYERS[layers[target]][0]})"
        for name, path in modules.items() if name in layers
        for target in sorted(imported_modules(name, path, modules))
        if target in layers and layers[target] >= layers[name]
    ]
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_families_never_import_the_mixin_or_the_pipelines():
    modules = package_modules()
    for name, path in modules.items():
        if name.startswith(f"{PACKAGE}.families"):
            assert not imported_modules(name, path, modules) & {f"{PACKAGE}.mixin", f"{PACKAGE}.pipelines"}, name


# Fresh interpreters: one for all modules, with the heavy third-party packages imported once, then a forked child
# per module in which no dmin_diffusers module is loaded yet (where fork exists; else a new interpreter each).
_IMPORT_EACH = r"""
import importlib, json, os, sys, traceback
names = sys.argv[1:]

def attempt(name):
    try:
        importlib.import_module(name)
        return ""
    except BaseException:
        return traceback.format_exc()

if not hasattr(os, "fork"):
    print(json.dumps({names[0]: attempt(names[0])}))
    raise SystemExit
import torch, datasets, diffusers, transformers, peft, huggingface_hub, hnswlib, safetensors  # noqa: F401
from diffusers import DDPMPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline  # noqa: F401
assert not any(module.startswith("dmin_diffusers") for module in sys.modules)
failures = {}
for name in names:
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        os.write(write, attempt(name).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        failures[name] = pipe.read()
    _, status = os.waitpid(child, 0)
    if status and not failures[name]:
        failures[name] = f"the child importing {name} exited with status {status}"
print(json.dumps(failures))
"""


def _import_each(names: list[str]) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def run(batch: list[str]) -> dict[str, str]:
        done = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *batch], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    if hasattr(os, "fork"):
        return run(names)
    return {name: message for each in names for name, message in run([each]).items()}


def test_each_module_imports_first_in_a_fresh_interpreter():
    failures = {name: message for name, message in _import_each(sorted(package_modules())).items() if message}
    assert not failures, "\n".join(f"{name}:\n{message}" for name, message in failures.items())
