"""The package's import graph follows the layers of docs/design.md: a module imports only
modules of its own layer or lower ones, the edges own their libraries (fsspec, the
torch.distributed collectives, torch's private parts), and the format and prefetch stay
free of torch. Fails when an import crosses the layers, or a module is missing from the map
(and from docs/design.md)."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "dckpt"
DESIGN = PACKAGE.parent / "docs" / "design.md"

LAYERS = [
    # pure: the format, names, configs and decisions over lists
    {"errors", "layout", "dtypes", "block_table", "manifest", "decoder", "decode_items", "gcpause", "blocks",
     "codec", "info", "arguments", "triggers", "retention", "config", "watchdog", "step_metrics"},
    # edges: the only users of fsspec, torch.distributed, CUDA streams, torch internals
    {"storage", "files", "s3", "mounts", "direct", "dist", "staging", "torch_internals", "values", "logs", "metrics"},
    # the repository: manifests found, blocks indexed, segments written, blocks read
    {"repository", "dedup", "segments", "reads", "items", "shm", "memory", "discard",
     "live_blocks"},
    # the DCP plug-ins
    {"planner", "state_checks", "overlaps", "optim_state", "meta_tensors", "writer", "commit", "reader",
     "read_plan", "replicas"},
    # the save pipeline
    {"handle", "global_plan", "saver"},
    # operations over a repository, and the public functions
    {"verify", "sweep", "export", "status", "health", "diff", "api", "catalog", "train_state",
     "pipeline"},
    # orchestration
    {"preemption", "upkeep", "tiers", "manager"},
    # the command line, and the launcher-side prefetch
    {"cli", "cli_format", "__main__", "prefetch"},
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}

OWNERS = {  # a library (prefix) -> the only modules that import it
    "fsspec": {"storage"},
    "s3fs": {"storage"},
    "torch.distributed.checkpoint._": {"torch_internals"},
    "torch.distributed._": {"torch_internals"},
}
COLLECTIVES = {"dist"}  # the only module that imports torch.distributed itself
TORCH_FREE = {"errors", "layout", "block_table", "manifest", "decoder", "decode_items", "gcpause", "blocks",
              "codec", "info", "triggers", "retention", "arguments", "prefetch", "watchdog", "storage", "files", "s3", "mounts", "direct",
              "repository", "reads", "shm", "verify", "sweep", "live_blocks", "status", "health", "diff",
              "catalog", "cli_format"}
"""Modules whose import needs no torch: the format, and what ``dckpt ls``, ``inspect``,
``verify``, ``delete``, ``gc``, ``status``, ``health`` and ``diff`` run (a test runs them and
finds no torch imported)."""
PREFETCH_NEEDS = {"layout", "decoder", "decode_items", "gcpause", "manifest", "block_table",
                  "errors", "files"}
"""All ``python -m dckpt.prefetch`` loads of dckpt: the stdlib and xxhash beside them."""


def _imports(path: pathlib.Path) -> list[str]:
    return list(_IMPORTS[path])


def _read_imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if node.module == "dckpt":
                names += [f"dckpt.{a.name}" for a in node.names]
    return names


_IMPORTS = {p: _read_imports(p) for p in PACKAGE.rglob("*.py")}
"""Every module's imports, parsed at collection: Python 3.11's ast.parse shares its
recursion count between threads, and a test's thread left formatting a traceback (which
parses the failing line) made a parse here fail ("AST constructor recursion depth
mismatch", python/cpython#106905)."""


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
BENCH = sorted(p.stem for p in (PACKAGE / "bench").glob("*.py") if p.stem != "__init__")


def test_every_module_has_a_layer_and_a_line_in_the_design():
    assert sorted(LAYER) == MODULES
    design = DESIGN.read_text()
    assert not [m for m in MODULES if f"`{m}`" not in design]


@pytest.mark.parametrize("module", MODULES)
def test_imports_follow_the_layers(module):
    imports = _imports(PACKAGE / f"{module}.py")
    upward = [i for i in imports if i.startswith("dckpt.") and i.split(".")[1] in LAYER
              and LAYER[i.split(".")[1]] > LAYER[module]]
    assert upward == [], f"{module} (layer {LAYER[module]}) imports from above: {upward}"
    for prefix, owners in OWNERS.items():
        found = [i for i in imports if i.startswith(prefix)]
        assert not found or module in owners, f"{module} imports {found}: only {owners} may"
    collective = [i for i in imports if i == "torch.distributed"]
    assert not collective or module in COLLECTIVES, f"{module} imports torch.distributed"
    if module in TORCH_FREE:
        assert not [i for i in imports if i.split(".")[0] == "torch"], module
    if module in PREFETCH_NEEDS | {"prefetch"}:
        mine = {i.split(".")[1] for i in imports if i.startswith("dckpt.")}
        assert mine <= PREFETCH_NEEDS, f"{module} pulls {mine - PREFETCH_NEEDS} into prefetch"
        assert not [i for i in imports if i.split(".")[0] in ("numpy", "fsspec")], module


INTEGRATIONS = sorted(p.stem for p in (PACKAGE / "integrations").glob("*.py")
                      if p.stem != "__init__")
FRAMEWORK_OF = {"lightning": "lightning", "transformers": "hf", "accelerate": "hf",
                "torchtitan": "torchtitan"}
"""A framework's package -> the only integration module that imports it."""


def test_the_integrations_stand_above_the_package():
    assert not [m for m in MODULES
                if any(i.startswith("dckpt.integrations") for i in _imports(PACKAGE / f"{m}.py"))]
    assert set(FRAMEWORK_OF.values()) <= set(INTEGRATIONS)
    assert not [m for m in INTEGRATIONS if f"`integrations.{m}`" not in DESIGN.read_text()]


@pytest.mark.parametrize("module", INTEGRATIONS)
def test_a_framework_is_imported_by_its_own_integration_only(module):
    imports = _imports(PACKAGE / "integrations" / f"{module}.py")
    strays = [i for i in imports if i.split(".")[0] in FRAMEWORK_OF
              and FRAMEWORK_OF[i.split(".")[0]] != module]
    assert strays == [], f"integrations.{module} imports {strays}"
    assert not [i for i in imports if i.split(".")[0] in ("fsspec", "s3fs")], module


def test_the_bench_stands_above_the_package():
    """Only the command line reaches ``dckpt bench``; its modules are in the design's map."""
    assert not [m for m in MODULES if m != "cli"
                and any(i.startswith("dckpt.bench") for i in _imports(PACKAGE / f"{m}.py"))]
    assert not [m for m in BENCH if f"`bench.{m}`" not in DESIGN.read_text()]
    options = _imports(PACKAGE / "bench" / "options.py")
    assert not [i for i in options if i.split(".")[0] == "torch"]  # --help, refusals stay fast
