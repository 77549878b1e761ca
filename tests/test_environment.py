"""The environments match VERL 0.9.1's own requirement metadata (``importlib.metadata.requires("verl")``):
the ``verl`` extra states VERL's specifiers for what it adds, the ``gpu`` extra is ``verl[vllm,fsdp]``, and
environment.yml pins the torch that VERL's vLLM/FSDP extras pin. A slow test resolves the ``gpu`` extra
with pip in a throw-away venv, as a cluster user's install would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from ctpo.preflight import GPU_EXTRAS, canonical, verl_requirements

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
pytestmark = pytest.mark.verl

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def extra(name: str) -> dict[str, Requirement]:
    return {canonical(r.name): r for r in map(Requirement, PYPROJECT["optional-dependencies"][name])}


def environment_pins() -> dict[str, Requirement]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {canonical(r.name): r for r in map(Requirement, (x for x in pip if not x.startswith("-")))}


def test_verl_requirements_follow_verls_own_extras():
    """The pins of verl[vllm,fsdp]==0.9.1 as its wheel's METADATA states them (read by hand)."""
    gpu = verl_requirements(GPU_EXTRAS)
    assert str(gpu["torch"]) == "==2.11.0" and str(gpu["vllm"]) == "==0.24.0"
    assert str(gpu["flash-attn"]) == "==2.8.3"  # fsdp -> verl[flash-attn-cu130torch211]
    assert str(gpu["cupy-cuda13x"]) == "==14.0.1"  # fsdp -> verl[cupy-cu130]
    assert str(gpu["transferqueue"]) == ">=0.1.10"  # vllm -> verl[verl-core]
    assert gpu["transformers"] == SpecifierSet("==5.9.0,>=5.5.3,<5.11,!=5.6.0")  # vllm's pin & the base range
    base = verl_requirements()
    assert base["transformers"] == SpecifierSet(">=5.5.3,<5.11,!=5.6.0") and "transferqueue" not in base


def test_verl_extra_states_verls_own_specifiers():
    import importlib.metadata

    ours = extra("verl")
    assert str(ours["verl"].specifier) == f"=={importlib.metadata.version('verl')}" == "==0.9.1"
    verl_core = verl_requirements(["verl-core"])
    for name, req in ours.items():
        if name != "verl":
            assert name in verl_core, f"{name}: not a requirement of verl[verl-core]; why in the verl extra?"
            assert req.specifier == verl_core[name], f"{name}: ours {req.specifier}, VERL's {verl_core[name]}"
    # TransferQueue: VERL's v1 trainer (the default, our choice) imports it in TaskRunnerV1.run
    assert "transferqueue" in ours


def test_gpu_extra_is_verls_vllm_fsdp_set_and_core_deps_admit_its_pins():
    gpu = extra("gpu")
    assert gpu["verl"].extras == set(GPU_EXTRAS) and str(gpu["verl"].specifier) == "==0.9.1"
    assert canonical(gpu["ctpo"].name) == "ctpo" and gpu["ctpo"].extras == {"verl"}
    pins = verl_requirements(GPU_EXTRAS)
    core = {canonical(r.name): r for r in map(Requirement, PYPROJECT["dependencies"])}
    for name, spec in pins.items():
        exact = [s.version for s in spec if s.operator == "=="]
        if name in core and exact:
            assert core[name].specifier.contains(exact[0]), (
                f"core {core[name]} excludes VERL's {name}=={exact[0]}"
            )
    # one environment serves both trainers: the core states VERL's own transformers range
    assert core["transformers"].specifier == verl_requirements()["transformers"]


def test_environment_yml_pins_what_verl_pins():
    env = environment_pins()
    pins = verl_requirements(GPU_EXTRAS)
    for name in ("torch", "torchvision", "torchaudio"):  # flash-attn is built against them: installed first
        assert name in env, f"environment.yml must pin {name} (VERL pins {name}{pins[name]})"
    for name, req in env.items():
        if name in pins:
            assert req.specifier == pins[name], f"environment.yml {req}, VERL's {name}{pins[name]}"


@pytest.mark.slow
def test_gpu_extra_resolves_with_pip(tmp_path):
    """``pip install --dry-run '.[gpu]'`` in a fresh venv resolves, to VERL's pinned versions.

    Only metadata is fetched: pip reads each wheel's METADATA with HTTP range requests (fast-deps), as the
    package index here serves no separate metadata files (PEP 658) and would otherwise download GBs of CUDA
    wheels. flash-attn 2.8.3 is published as source only and its setup.py imports torch to produce even its
    metadata, so the venv sees this venv's packages (torch, packaging, psutil) through a .pth file, pip runs
    without build isolation, and FLASH_ATTENTION_SKIP_CUDA_BUILD keeps its setup.py from looking for nvcc.
    """
    target = tmp_path / "venv"
    venv.create(target, with_pip=True)
    python = target / "bin" / "python"
    up = subprocess.run(
        [python, "-m", "pip", "install", "-q", "-U", "pip", "setuptools", "wheel"],
        capture_output=True,
        text=True,
    )
    assert up.returncode == 0, (
        f"could not update pip/setuptools/wheel in the throw-away venv:\n{up.stderr[-2000:]}"
    )
    site = next((target / "lib").glob("python3*/site-packages"))
    (site / "zz_borrow_build_deps.pth").write_text(
        next(p for p in sys.path if p.endswith("site-packages")) + "\n"
    )
    report = tmp_path / "report.json"
    cmd = [
        python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-build-isolation",
        "--use-feature=fast-deps", "--report", str(report), f"{ROOT}[gpu]",
    ]  # fmt: skip
    env = {**os.environ, "FLASH_ATTENTION_SKIP_CUDA_BUILD": "TRUE", "PIP_NO_INPUT": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, (
        "pip could not resolve the gpu extra; what the index lacks or what conflicts is in pip's words:\n"
        + "\n".join(line for line in proc.stderr.splitlines() if "Location 'file:" not in line)[-4000:]
    )
    resolved = {
        canonical(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    pins = verl_requirements(GPU_EXTRAS)
    for name, spec in pins.items():
        assert name in resolved, f"{name}{spec} (VERL's) is not in the resolution"
        assert spec.contains(resolved[name], prereleases=True), (
            f"{name} resolved {resolved[name]}, VERL: {spec}"
        )
    assert resolved["verl"] == "0.9.1" and resolved["vllm"] == "0.24.0" and resolved["torch"] == "2.11.0"
    assert resolved["transformers"] == "5.9.0" and resolved["flash-attn"] == "2.8.3"
