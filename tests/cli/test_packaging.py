"""The install (issue 9): `pip install .` brings everything `ssapo solve|train|bench|export`
needs, with the known floors pinned (trl >= 1.9 for precomputed reference log-probs
under ZeRO-2/3, huggingface/trl#6403; transformers >= 5), and the installed versions
satisfy them; `pip install bindings/python` is dro_core alone, numpy its only
dependency, and importing dro_core never imports torch."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.join(REPO, "pyproject.toml")
BINDINGS = os.path.join(REPO, "bindings", "python", "pyproject.toml")

# distribution -> the lowest version the code is known to need (and why)
FLOORS = {
    "trl": "1.9",  # precomputed reference log-probs under DeepSpeed ZeRO-2/3 (huggingface/trl#6403)
    "transformers": "5.0",  # the v5 API (dtype=, processing_class=, ...)
    "accelerate": "1.10.1",  # trl 1.16's own floor; tested with 1.15
    "torch": "2.4",
    "datasets": "4.7",  # trl's floor; tested with 5.2
    "peft": "0.13",
    "pyyaml": "6",
    "safetensors": "0.4.3",
    "numpy": "1.26",
}
# imported by ssapo but needed only on request: an extra, or a feature that needs its own install
OPTIONAL_IMPORTS = {"vllm", "deepspeed", "bitsandbytes", "wandb"}


def _load(path):
    if not os.path.isfile(path):
        pytest.skip(f"{path}: not in this checkout")
    with open(path, "rb") as f:
        return tomllib.load(f)


def _reqs(lines):
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def _installed(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def test_every_trainer_dependency_is_a_dependency_not_an_extra():
    project = _load(ROOT)["project"]
    deps = _reqs(project["dependencies"])
    for name in (
        "torch",
        "transformers",
        "trl",
        "accelerate",
        "datasets",
        "peft",
        "pyyaml",
        "safetensors",
        "tokenizers",
        "tqdm",
        "matplotlib",
        "pyarrow",
        "numpy",
    ):
        assert name in deps, f"{name} must be in [project].dependencies (pip install . then ssapo train)"
    extras = project["optional-dependencies"]
    assert {"vllm", "test"} <= set(extras)
    # `train` survives only as an alias of the plain install (old commands keep working)
    assert set(_reqs(extras.get("train", []))) <= set(deps)
    assert "ssapo" in project["scripts"]


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_known_floors_are_pinned(name):
    req = _reqs(_load(ROOT)["project"]["dependencies"])[name]
    floor = Version(FLOORS[name])
    assert req.specifier, f"{name}: unpinned; needs >= {floor}"
    assert req.specifier.contains(floor, prereleases=True), f"{name}{req.specifier} excludes {floor}"
    major, minor, micro = floor.release + (0,) * (3 - len(floor.release))
    below = f"{major}.{minor}.{micro - 1}" if micro else f"{major}.{minor - 1}.99" if minor else f"{major - 1}.99"
    assert not req.specifier.contains(below, prereleases=True), f"{name}{req.specifier} admits {below} (< {floor})"


def test_trl_pin_excludes_versions_without_the_zero3_ref_logprob_fix():
    req = _reqs(_load(ROOT)["project"]["dependencies"])["trl"]
    assert not req.specifier.contains("1.8.9") and req.specifier.contains("1.9.0") and req.specifier.contains("1.16.0")


@pytest.mark.parametrize("group", ["dependencies", "test"])
def test_installed_versions_satisfy_the_pins(group):
    project = _load(ROOT)["project"]
    lines = project["dependencies"] if group == "dependencies" else project["optional-dependencies"]["test"]
    bad, absent = [], []
    for line in lines:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        have = _installed(req.name)
        if have is None:
            absent.append(f"{req.name}: not installed (wants {req.specifier or 'any'})")
        elif req.specifier and not req.specifier.contains(have, prereleases=True):
            bad.append(f"{req.name} {have} does not satisfy {req.specifier}")
    if group == "dependencies":
        bad += absent
    assert not bad, "; ".join(bad) + '  (pip install ".[test]")'
    if absent:  # a test tool missing here (CI installs them all): its tests skip themselves
        pytest.skip("; ".join(absent) + '  (pip install ".[test]")')


def _third_party_imports(package_dir):
    """Top-level names of every `import x` / `from x import` in the package (not relative, not stdlib)."""
    names = set()
    for root, _, files in os.walk(package_dir):
        for f in files:
            if not f.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(root, f), encoding="utf-8").read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("ssapo", "dro_core", "__future__")}


def test_every_module_ssapo_imports_comes_from_a_dependency():
    """The `ModuleNotFoundError: No module named 'yaml'` of issue 9 cannot come back."""
    deps = set(_reqs(_load(ROOT)["project"]["dependencies"]))
    owners = md.packages_distributions()
    missing = []
    for mod in sorted(_third_party_imports(os.path.join(REPO, "python", "ssapo")) - OPTIONAL_IMPORTS):
        dists = {canonicalize_name(d) for d in owners.get(mod, [])}
        if not dists & deps:
            missing.append(f"{mod} (from {sorted(dists) or 'no installed distribution'})")
    assert not missing, f"imported by ssapo but not in [project].dependencies: {missing}"


# -- dro_core on its own --


def test_bindings_package_is_dro_core_with_numpy_only():
    conf = _load(BINDINGS)
    assert canonicalize_name(conf["project"]["name"]) == "dro-core"
    deps = _reqs(conf["project"].get("dependencies", []))
    assert set(deps) == {"numpy"}, f"dro-core must need numpy alone, has {sorted(deps)}"
    mat, root_mat = conf["tool"]["maturin"], _load(ROOT)["tool"]["maturin"]
    assert mat["module-name"] == root_mat["module-name"] == "dro_core._dro_core"
    assert "python-packages" not in mat  # no ssapo in dro-core
    here = os.path.dirname(BINDINGS)
    assert os.path.normpath(os.path.join(here, mat["manifest-path"])) == os.path.normpath(
        os.path.join(REPO, root_mat["manifest-path"])
    )
    src = os.path.normpath(os.path.join(here, mat["python-source"]))
    assert src == os.path.normpath(os.path.join(REPO, root_mat["python-source"]))  # one copy of the sources
    # maturin walks only the project folder for a mixed project's files: a python-source outside it is
    # named file by file in `include`; every file of the package must be matched (the .so is built)
    import fnmatch

    patterns = [i["path"] if isinstance(i, dict) else i for i in mat.get("include", [])]
    pkg = os.path.join(src, "dro_core")
    files = [
        f
        for f in os.listdir(pkg)
        if os.path.isfile(os.path.join(pkg, f)) and not f.endswith((".so", ".pyd")) and not f.endswith(".pyc")
    ]
    unmatched = [f for f in files if not any(fnmatch.fnmatch(f"dro_core/{f}", p) for p in patterns)]
    assert files and not unmatched, f"python/dro_core files the dro-core wheel would miss: {unmatched}"


def test_dro_core_sources_import_no_trainer_library():
    heavy = {"torch", "transformers", "trl", "accelerate", "datasets", "peft", "yaml", "ssapo"}
    used = _third_party_imports(os.path.join(REPO, "python", "dro_core")) | {
        m
        for m in re.findall(
            r"^\s*(?:from|import)\s+(\w+)", open(os.path.join(REPO, "python", "dro_core", "__init__.pyi")).read(), re.M
        )
    }
    assert not used & heavy, f"dro_core imports {sorted(used & heavy)}"
    assert used - {"typing", "typing_extensions", "collections", "enum", "os", "__future__"} <= {"numpy"}, used


def test_importing_and_solving_with_dro_core_loads_no_torch(tmp_path):
    code = (
        "import sys, numpy as np, dro_core\n"
        "r = dro_core.solve(np.linspace(0.05, 0.95, 300), 0.01, 100)\n"
        "assert abs(r.dual_gap) < 1e-9, r.dual_gap\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'trl', 'accelerate', 'datasets', 'ssapo', 'scipy'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
