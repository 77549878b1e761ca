"""``ctpo preflight``: will this study run here? One line per check, before any GPU hour is spent.

``run_checks(config)`` returns :class:`Check` results, in this order:

* ``versions``: the installed packages meet VERL 0.9.1's own requirement metadata: ``verl[vllm,fsdp]``
  for a config that trains with VERL or evaluates with vLLM (the ``gpu`` extra), else VERL's base
  requirements plus the ``verl`` extra;
* ``transfer_queue`` / ``flash_attn`` / ``vllm``: the module imports (flash-attn and vLLM only where the
  config uses them);
* ``gpus``: at least ``resources.train.gpu`` (and ``resources.eval.gpu``) CUDA devices are visible;
* ``data:<name>``: each data entry was prepared by ``ctpo data`` (``results_dir/data/<name>.jsonl``) or
  loads with the Hugging Face hub offline (a ``path:``, ``$CTPO_DATA_DIR`` or the HF cache);
* ``model:<name>``: each model is a tiny preset, a local HF folder, or a hub id whose config and weights
  are in the HF cache;
* ``mlflow``: the tracking store answers and takes a run: one is created, written (a metric, an
  artifact) and deleted;
* ``sandbox``: the sandbox starts at an isolation tier the config accepts and runs code;
* ``disk``: the results folder's file system holds every run's checkpoints (an estimate:
  `checkpoint_bytes`);
* ``verl_step``: one RL step through VERL's own code (``ctpo.backends.verl.step.run_one_step``) on this
  machine's device; its output (VERL's, the vLLM engine process's) goes to
  ``results_dir/preflight/verl_step.log``, which its line names.

Every failing check names the command that fixes it. ``verl_requirements`` reads VERL's pins; the
environment tests use it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from ctpo import data
from ctpo.config import results_dir, run_matrix

VERL_STEP_MODULE = "ctpo.backends.verl.step"
GPU_EXTRAS = ("vllm", "fsdp")  # the `gpu` extra installs verl[vllm,fsdp]
GPU_INSTALL = (
    "conda env create -f environment.yml && conda activate ctpo && "
    "pip install --no-build-isolation flash-attn==2.8.3 && pip install -e '.[dev,gpu]'"
)
CPU_INSTALL = "pip install -c constraints-cpu.txt -e '.[dev,verl]'"


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        text = f"{'✓' if self.ok else '✗'} {self.name}: {self.detail}"
        return f"{text}  → fix: {self.fix}" if not self.ok and self.fix else text


# --------------------------------------------------------------------------------------------------
# VERL's own requirement metadata
# --------------------------------------------------------------------------------------------------


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def verl_requirements(extras: Iterable[str] = (), base: bool = True) -> dict[str, Any]:
    """The installed VERL's requirements (``importlib.metadata.requires("verl")``): its base ones (unless
    ``base=False``) and those of ``extras``, following VERL's references to its own extras
    (``verl[verl-core]``). Returns canonical name -> `packaging.specifiers.SpecifierSet`, the specifiers
    of a name stated more than once intersected."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    reqs = [Requirement(r) for r in metadata.requires("verl") or []]
    todo, seen = list(extras), set()
    out: dict[str, SpecifierSet] = {}

    def add(req: Requirement) -> None:
        key = canonical(req.name)
        out[key] = out.get(key, SpecifierSet()) & req.specifier

    if base:
        for req in reqs:
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                add(req)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in reqs:
            if req.marker is None or not req.marker.evaluate({"extra": extra}):
                continue
            if canonical(req.name) == "verl":
                todo += sorted(req.extras)
            else:
                add(req)
    return out


def own_extra(extra: str) -> dict[str, Any]:
    """ctpo's own ``extra`` as installed (canonical name -> SpecifierSet)."""
    from packaging.requirements import Requirement

    out = {}
    for text in metadata.requires("ctpo") or []:
        req = Requirement(text)
        if req.marker is not None and req.marker.evaluate({"extra": extra}) and canonical(req.name) != "ctpo":
            out[canonical(req.name)] = req.specifier
    return out


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def unmet(requirements: dict[str, Any]) -> list[str]:
    """``name version (needs SPEC)`` / ``name missing (SPEC)`` for each requirement the environment fails."""
    bad = []
    for name, spec in sorted(requirements.items()):
        version = installed_version(name)
        if version is None:
            bad.append(f"{name} missing{f' ({spec})' if str(spec) else ''}")
        elif str(spec) and not spec.contains(version, prereleases=True):
            pins = [s for s in spec if s.operator == "=="]  # a pin says it all
            bad.append(f"{name} {version} (needs {pins[0] if pins else spec})")
    return bad


# --------------------------------------------------------------------------------------------------
# What a config needs
# --------------------------------------------------------------------------------------------------


def backends(config: dict[str, Any]) -> tuple[str, str]:
    train = str((config.get("train") or {}).get("backend", "local"))
    evaluation = str((config.get("eval") or {}).get("backend", "hf"))
    return train, evaluation


def needs_gpu_stack(config: dict[str, Any]) -> bool:
    """VERL training or vLLM evaluation: the `gpu` extra's environment."""
    train, evaluation = backends(config)
    return train == "verl" or evaluation == "vllm"


def gpus_needed(config: dict[str, Any]) -> int:
    res = config.get("resources") or {}
    return max(int((res.get(step) or {}).get("gpu", 0) or 0) for step in ("train", "eval"))


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def check_versions(config: dict[str, Any]) -> Check:
    verl = installed_version("verl")
    wanted = own_extra("verl").get("verl")
    if verl is None or (wanted is not None and not wanted.contains(verl)):
        fix = GPU_INSTALL if needs_gpu_stack(config) else CPU_INSTALL
        return Check(
            "versions", False, f"verl {verl or 'missing'} (the plug-in is written for {wanted})", fix
        )
    if needs_gpu_stack(config):
        label, reqs, fix = f"verl[{','.join(GPU_EXTRAS)}]=={verl}", verl_requirements(GPU_EXTRAS), GPU_INSTALL
    else:
        label, reqs, fix = f"verl=={verl} and the verl extra", verl_requirements(), CPU_INSTALL
        reqs.update(own_extra("verl"))
    bad = unmet(reqs)
    if bad:
        return Check("versions", False, f"{len(bad)} of {label}'s requirements unmet: {', '.join(bad)}", fix)
    return Check("versions", True, f"{len(reqs)} requirements of {label} met")


def check_import(module: str, needed: bool, why: str, fix: str) -> Check:
    if not needed:
        return Check(module, True, f"not needed ({why})")
    import importlib

    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # an import error of any kind is the finding
        return Check(module, False, f"import {module} failed: {type(exc).__name__}: {exc}", fix)
    version = getattr(mod, "__version__", None) or ""
    return Check(module, True, f"imports{f' ({version})' if version else ''}")


def check_gpus(config: dict[str, Any]) -> Check:
    needed = gpus_needed(config)
    try:
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = sorted({torch.cuda.get_device_name(i) for i in range(visible)})
    except Exception as exc:  # a broken CUDA install is the finding
        return Check("gpus", needed == 0, f"CUDA unusable: {type(exc).__name__}: {exc}", "check the driver")
    seen = f"{visible} visible" + (f" ({', '.join(names)})" if names else "")
    if visible >= needed:
        return Check("gpus", True, f"{seen}, resources need {needed} per node")
    return Check(
        "gpus",
        False,
        f"{seen}, resources.train/eval.gpu need {needed} per node",
        f"run on a node with {needed} GPUs (srun --gpus-per-node={needed} ctpo preflight --config ...) "
        "or lower resources.train.gpu",
    )


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_datasets(config: dict[str, Any]) -> list[Check]:
    names = ["train", *((config.get("data") or {}).get("benchmarks") or {})]
    out = []
    for name in names:
        entry = data.dataset_entry(config, name)
        source = entry["source"]
        prepared = results_dir(config) / "data" / f"{name}.jsonl"
        if prepared.is_file():  # the workflow's `ctpo data` job ran: jobs read this copy
            count = sum(1 for line in prepared.open() if line.strip())
            out.append(Check(f"data:{name}", count > 0, f"{source}: {count:,} problems in {prepared}", ""))
            continue
        try:
            with environ(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"):  # compute nodes have no network
                records = data.load_entry(config, name)
        except Exception as exc:
            spec = _spec(source)
            fix = ""
            if spec is not None and spec.hub_id:
                target = f"$CTPO_DATA_DIR/{spec.hub_id}"
                fix = (
                    f"{data.prefetch_command(spec, target)} (on a machine with network; export CTPO_DATA_DIR)"
                )
            first = str(exc).splitlines()[0].removeprefix(f"{source}: ")
            out.append(Check(f"data:{name}", False, f"{source}: {_clip(first)}", fix))
            continue
        spec = _spec(source)
        where = "read offline" if spec is not None and spec.hub_id else "built in code"
        out.append(Check(f"data:{name}", True, f"{source}: {len(records):,} problems, {where}"))
    return out


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _spec(source: str):
    try:
        return data.resolve_name(source)
    except data.DataError:
        return None


def _weights(folder: Path) -> list[Path]:
    return [p for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern)]


def resolve_model(spec: dict[str, Any]) -> tuple[Path | None, str]:
    """(local folder, how it was found) for a model entry's ``path``, offline; (None, why not) if absent."""
    path = str(spec["path"])
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file() or not _weights(local):
            return None, f"{local} holds no HF model (config.json and *.safetensors / *.bin)"
        return local, "local folder"
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id=path, local_files_only=True))
    except Exception as exc:
        return (
            None,
            f"{path!r} is neither a local folder nor in the Hugging Face cache ({type(exc).__name__})",
        )
    if not (folder / "config.json").is_file() or not _weights(folder):
        return (
            None,
            f"{path!r} is only partly in the Hugging Face cache ({folder}): no config.json or weights",
        )
    return folder, "Hugging Face cache"


def check_models(config: dict[str, Any]) -> list[Check]:
    out = []
    for name, spec in (config.get("models") or {}).items():
        spec = spec or {}
        if "preset" in spec and not spec.get("path"):
            out.append(Check(f"model:{name}", True, f"tiny preset {spec['preset']!r}, built in code"))
            continue
        folder, how = resolve_model(spec)
        if folder is None:
            fix = (
                f"hf download {spec['path']} (on a machine with network, into the HF_HOME the nodes see) "
                f"or set models.{name}.path to a local HF folder"
            )
            out.append(Check(f"model:{name}", False, how, fix))
        else:
            out.append(Check(f"model:{name}", True, f"{spec['path']}: {how} ({folder})"))
    return out


def check_mlflow(config: dict[str, Any]) -> Check:
    from ctpo import tracking

    if not tracking.enabled(config):
        return Check("mlflow", True, "mlflow.enabled is false: nothing to check")
    uri = tracking.tracking_uri(config)
    fix = (
        "start a tracking server every node reaches (mlflow server --host 0.0.0.0 --port 5000 ...) and "
        "export MLFLOW_TRACKING_URI=http://<host>:5000"
    )
    try:
        # an unreachable server fails in seconds instead of MLflow's minutes of retries
        with environ(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="20"):
            from mlflow.tracking import MlflowClient

            info = tracking.store_info(config)
            client = MlflowClient(tracking_uri=uri)
            run = client.create_run(
                info["experiment_id"], run_name="ctpo-preflight", tags={"ctpo.kind": "preflight"}
            )
            try:
                client.log_metric(run.info.run_id, "preflight/ok", 1.0)
                client.log_text(run.info.run_id, "written by ctpo preflight\n", "preflight.txt")
            finally:
                client.delete_run(run.info.run_id)
    except Exception as exc:
        return Check("mlflow", False, f"{uri}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", fix)
    return Check("mlflow", True, f"{uri}: created, wrote (metric, artifact) and deleted a run")


def check_sandbox(config: dict[str, Any]) -> Check:
    from ctpo.tir.sandbox import SandboxIsolationError, SandboxPool

    allow = bool((config.get("sandbox") or {}).get("allow_weaker_isolation", False))
    fix = (
        "run where unprivileged user namespaces and Landlock are allowed (e.g. sysctl "
        "kernel.unprivileged_userns_clone=1, kernel.apparmor_restrict_unprivileged_userns=0) or accept less "
        "with `sandbox: {allow_weaker_isolation: true}`"
    )
    try:
        with SandboxPool(workers=1, allow_weaker_isolation=allow) as pool:
            result = pool.run("print(6 * 7)")
            iso = pool.isolation
    except SandboxIsolationError as exc:
        return Check("sandbox", False, str(exc).splitlines()[0], fix)
    except Exception as exc:
        return Check("sandbox", False, f"{type(exc).__name__}: {exc}", fix)
    if not result.ok or result.stdout.strip() != "42":
        return Check("sandbox", False, f"print(6 * 7) gave {result.status}: {result.stderr[-200:]!r}", fix)
    detail = f"isolation tier {iso.tier}"
    if iso.missing:
        detail += f" (missing: {iso.describe_missing()}; allowed by sandbox.allow_weaker_isolation)"
    return Check("sandbox", True, detail + ", ran code")


GIB = 1 << 30


def size(n: float) -> str:
    return f"{n / GIB:,.1f} GiB" if n >= GIB else f"{n / (1 << 20):,.0f} MiB"


def weight_bytes(config: dict[str, Any], name: str) -> tuple[int, str]:
    """Bytes of a model's weights as stored (bf16 on the hub) and where the number comes from."""
    spec = (config.get("models") or {}).get(name) or {}
    if "preset" in spec and not spec.get("path"):
        return 16 << 20, "tiny preset"
    folder, _ = resolve_model(spec)
    if folder is not None:
        return sum(p.stat().st_size for p in _weights(folder)), "its weights"
    match = re.search(r"(\d+(?:\.\d+)?)[bB](?![A-Za-z])", str(spec.get("path", "")))
    if match:  # not available offline: bf16 at the size the name states
        return int(float(match.group(1)) * 2e9), "its name"
    return 0, "unknown"


def checkpoint_bytes(config: dict[str, Any]) -> tuple[int, list[str]]:
    """Disk the study's trainings need: per run, ``max_actor_ckpt_to_keep`` (2) FSDP checkpoints of ~6x the
    bf16 weights each (fp32 parameters and Adam's two fp32 moments) plus the merged bf16 ``final``."""
    keep = int((config.get("verl") or {}).get("max_actor_ckpt_to_keep", 2))
    total, notes = 0, []
    for model in dict.fromkeys(m for m, _, _ in run_matrix(config)):
        runs = sum(1 for m, _, _ in run_matrix(config) if m == model)
        weights, source = weight_bytes(config, model)
        total += runs * (keep * 6 + 1) * weights
        notes.append(f"{model}: {runs} run(s), {size(weights)} of weights (from {source})")
    return total, notes


def check_disk(config: dict[str, Any]) -> Check:
    root = results_dir(config).resolve()
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need, notes = checkpoint_bytes(config)
    detail = f"{size(free)} free under {probe}, checkpoints need ~{size(need)} ({'; '.join(notes)})"
    if free >= need:
        return Check("disk", True, detail)
    return Check("disk", False, detail, f"point results_dir at a file system with {size(need)} free")


def step_cell(config: dict[str, Any]) -> tuple[str, str]:
    """The (model, method) the one-step run trains: the first cell of the matrix, a CTPO method if any."""
    cells = run_matrix(config)
    methods = config.get("methods") or {}
    for model, method, _ in cells:
        if (methods.get(method) or {}).get("method", method) == "ctpo":
            return model, method
    return cells[0][0], cells[0][1]


def check_verl_step(config: dict[str, Any], models: list[Check]) -> Check:
    model, method = step_cell(config)
    name = "verl_step"
    failed = [c for c in models if c.name == f"model:{model}" and not c.ok]
    if failed:
        return Check(
            name, False, f"not run: model {model} is not available here (see model:{model})", failed[0].fix
        )
    try:
        from ctpo.backends.verl.step import run_one_step
    except ModuleNotFoundError as exc:
        if exc.name == VERL_STEP_MODULE:
            return Check(
                name,
                False,
                "VERL one-step run not available in this checkout",
                "git pull (ctpo.backends.verl.step)",
            )
        return Check(name, False, f"cannot import {VERL_STEP_MODULE}: {exc}", CPU_INSTALL)
    log = results_dir(config).resolve() / "preflight" / "verl_step.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ctpo-preflight-") as workdir:
        try:
            with output_to(log):
                metrics = run_one_step(
                    config, model=model, method=method, workdir=Path(workdir), server="auto"
                )
        except Exception as exc:
            return Check(
                name,
                False,
                f"{model}/{method}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} (log: {log})",
            )
    shown = ", ".join(
        fmt.format(metrics[key]) for key, fmt in STEP_SUMMARY if isinstance(metrics.get(key), int | float)
    )
    return Check(name, True, f"{model}/{method} on {metrics.get('server')}: {shown} (log: {log})")


STEP_SUMMARY = (
    ("train/responses", "{:.0f} responses"),
    ("train/reward_mean", "reward {:.3f}"),
    ("train/loss", "loss {:.4g}"),
    ("train/grad_norm", "grad norm {:.4g}"),
    ("time/step_s", "{:.0f} s"),
)
"""The one-step run's metrics its ✓ line shows (metric key, format); the log holds VERL's output."""


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Everything written to this process's stdout and stderr, and by the processes it starts (vLLM's
    engine core), goes to ``log`` instead of the console: file descriptors 1 and 2 are redirected, so
    VERL's config print, its loggers and warnings from compiled code land there too, and so are
    ``sys.stdout`` / ``sys.stderr`` where something (pytest) replaced them."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with log.open("w", buffering=1) as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                    yield
            finally:
                f.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


CHECK_NAMES = (
    "versions",
    "transfer_queue",
    "flash_attn",
    "vllm",
    "gpus",
    "data",
    "model",
    "mlflow",
    "sandbox",
    "disk",
    "verl_step",
)


def run_checks(
    config: dict[str, Any], skip: Iterable[str] = (), report: Callable[[Check], None] | None = None
) -> list[Check]:
    """Every check of the module docstring (``skip`` leaves some out by name); ``report`` sees each one as
    it ends."""
    skip = set(skip)
    unknown = skip - set(CHECK_NAMES)
    if unknown:
        raise ValueError(f"unknown check(s) {sorted(unknown)}; checks: {', '.join(CHECK_NAMES)}")
    gpu_stack = needs_gpu_stack(config)
    train, evaluation = backends(config)
    why = f"train.backend {train}, eval.backend {evaluation}"
    results: list[Check] = []
    models: list[Check] = []

    def run(name: str, fn: Callable[[], Check | list[Check]]) -> None:
        if name in skip:
            return
        t0 = time.perf_counter()
        try:
            found = fn()
        except Exception as exc:  # a check that crashes is a failed check, not a crashed preflight
            found = Check(name, False, f"check crashed: {type(exc).__name__}: {exc}")
        found = found if isinstance(found, list) else [found]
        for check in found:
            check.seconds = round((time.perf_counter() - t0) / len(found), 2)
            results.append(check)
            if report:
                report(check)

    run("versions", lambda: check_versions(config))
    run(
        "transfer_queue",
        lambda: check_import(
            "transfer_queue", True, why, "pip install -e '.[verl]' (VERL's v1 trainer imports it)"
        ),
    )
    run(
        "flash_attn",
        lambda: check_import(
            "flash_attn", train == "verl", why, "pip install --no-build-isolation flash-attn==2.8.3"
        ),
    )
    run("vllm", lambda: check_import("vllm", gpu_stack, why, "pip install -e '.[gpu]' (environment.yml)"))
    run("gpus", lambda: check_gpus(config))
    run("data", lambda: check_datasets(config))

    def model_checks() -> list[Check]:
        models.extend(check_models(config))
        return models

    run("model", model_checks)
    run("mlflow", lambda: check_mlflow(config))
    run("sandbox", lambda: check_sandbox(config))
    run("disk", lambda: check_disk(config))
    run("verl_step", lambda: check_verl_step(config, models))
    return results


def python_line() -> str:
    return f"python {sys.version.split()[0]} ({sys.executable})"
