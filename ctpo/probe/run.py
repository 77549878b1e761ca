"""``ctpo probe`` end to end: checkpoints in, table / JSON / figure out (the CLI and the workflow call
`run_probe`).

For each checkpoint θ₀ (the Base, a trained run): a rollout batch of μ = θ₀ drives k AdamW steps of the
study's update (`ctpo.probe.llm.update_path`) and sets the baseline b; a second sample of μ feeds every
estimator; each θ_k gets its own target sample (`ctpo.probe.core.measure`). On the first checkpoint, at one
k, the same episodes are measured again with the whole model's gradients (`FullGradientPolicy`): the check
that the parameter subset does not change the conclusions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from ctpo.config import section, train_section
from ctpo.probe import core
from ctpo.probe.llm import (
    FullGradientPolicy,
    LLMPolicy,
    ScoreSubset,
    TIRWorld,
    policy_path,
    select_units,
    update_path,
)
from ctpo.probe.settings import ProbeSettings

log = logging.getLogger(__name__)

#: Files `run_probe` writes into its output folder (the workflow declares the summary and the figure).
OUTPUT_FILES = (
    "probe_rows.csv",
    "probe_table.md",
    "probe_full_check.csv",
    "probe_summary.json",
    "probe_figure.png",
    "probe_figure.pdf",
)


def _load_checkpoint(path: Path) -> tuple[Any, Any, dict[str, Any] | None, str]:
    """(model, tokenizer, AdamW state or None, description) of a Base folder or a training run folder."""
    from ctpo import tiny
    from ctpo.train.checkpoint import load_latest

    path = Path(path)
    if (path / "DONE.json").is_file():  # a `ctpo train` run: its final weights and its AdamW state
        model, tokenizer = tiny.load_pretrained(path / "final")
        state = load_latest(path / "checkpoints")
        done = json.loads((path / "DONE.json").read_text())
        if state is not None and state.get("step") == done.get("final_step"):
            return model, tokenizer, state["optimizer"], f"{path} (step {state['step']}, its AdamW state)"
        return model, tokenizer, None, f"{path} (final weights, fresh AdamW: no checkpoint of the last step)"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is neither a `ctpo sft` output (config.json) nor a finished `ctpo train` run (DONE.json)"
        )
    model, tokenizer = tiny.load_pretrained(path)
    return model, tokenizer, None, f"{path} (fresh AdamW)"


def run_probe(
    config: dict[str, Any],
    checkpoints: dict[str, Path],
    out: str | Path,
    settings: ProbeSettings,
    progress=log.info,
) -> dict[str, Any]:
    """Probe every checkpoint, write `OUTPUT_FILES` into ``out``; return the summary."""
    from ctpo import data
    from ctpo.probe import report
    from ctpo.reward import Grader
    from ctpo.tir.sandbox import pool_from_config
    from ctpo.train import local

    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    section(config, "models", settings.model)
    train_cfg = local.TrainConfig.from_section(train_section(config, settings.model))
    update_method = settings.update_method or settings.trained_method
    loss_cfg = local.loss_config(config, update_method)
    G = settings.group_size or train_cfg.group_size
    batch_units = settings.batch_units or train_cfg.prompts_per_step / max(1, train_cfg.minibatches)
    msettings = core.MeasureSettings(
        units_behaviour=settings.units_behaviour,
        units_target=settings.units_target,
        batch_units=batch_units,
        n_boot=settings.n_boot,
        baseline=settings.baseline,
        seed=settings.seed,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    problems = data.load_entry(config, "train")
    rows: list[dict[str, Any]] = []
    check_rows: list[dict[str, Any]] = []
    described: dict[str, str] = {}
    timings: dict[str, dict[str, float]] = {}
    try:
        with pool_from_config(config) as pool, Grader(workers=train_cfg.grader_workers) as grader:
            for label, path in checkpoints.items():
                model, tokenizer, opt_state, described[label] = _load_checkpoint(path)
                progress(f"probe: {label}: {described[label]}")
                world = TIRWorld(
                    tokenizer,
                    problems,
                    local.tir_config(config),
                    pool,
                    grader,
                    train_cfg.temperature,
                    G,
                    settings.sample_chunk_units,
                    settings.eval_chunk,
                )
                new_rows, new_check = probe_checkpoint(
                    label, model, world, opt_state, train_cfg, loss_cfg, msettings, settings,
                    full_check=settings.full_check and not check_rows, progress=progress,
                )  # fmt: skip
                rows += new_rows
                check_rows = check_rows or new_check
                timings[label] = dict(world.timings)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t_start
    cpu = _cpu_seconds() - cpu_start  # after the pools closed: their workers are reaped children by now
    summary = report.write_outputs(
        out,
        rows,
        check_rows,
        {
            "settings": _jsonable(dataclasses.asdict(settings)),
            "update_method": update_method,
            "update_loss": _jsonable(dataclasses.asdict(loss_cfg)),
            "lr": train_cfg.lr,
            "group_size": G,
            "batch_units": batch_units,
            "checkpoints": described,
            "timings": timings,
            "gradient_space": (
                f"{rows[0]['subset_params']} parameters ({', '.join(settings.subset)}), projected to "
                f"{rows[0]['grad_dim']} dimensions (sketch_dim {settings.sketch_dim})"
                if rows
                else ""
            ),
            "wall_s": wall,
            "cpu_s": cpu,
            "threads": settings.threads,
            "cpu_count": os.cpu_count(),
        },
    )
    return summary


def probe_checkpoint(
    label: str,
    model: torch.nn.Module,
    world: TIRWorld,
    opt_state: dict[str, Any] | None,
    train_cfg: Any,
    loss_cfg: Any,
    msettings: core.MeasureSettings,
    settings: ProbeSettings,
    full_check: bool = False,
    progress=log.info,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of one θ₀ (and of the full-gradient check when ``full_check``); timings in ``world.timings``."""
    t0 = time.perf_counter()
    subset = ScoreSubset(model, settings.subset, settings.sketch_dim, seed=settings.seed)
    policy = LLMPolicy(model, world, subset)
    driver_units = max(2, round(max(settings.ks) * msettings.batch_units))
    driver = policy.sample(driver_units, seed=core.derive_seed(settings.seed, label, "driver"))
    baseline = float(driver.reward.mean())
    t_update = time.perf_counter()
    seed = core.derive_seed(settings.seed, label)
    snapshots = update_path(model, driver, train_cfg, loss_cfg, settings.ks, seed, opt_state)
    world.timings["update_s"] = time.perf_counter() - t_update
    mu_episodes = policy.sample(settings.units_behaviour, seed=core.derive_seed(settings.seed, label, "mu"))
    targets: dict[Any, core.Episodes] = {}
    columns = {
        "checkpoint": label,
        "subset_params": subset.n_params,
        "driver_accuracy": driver.info.get("accuracy"),
        "behaviour_accuracy": mu_episodes.info.get("accuracy"),
        "policy_tokens": float(mu_episodes.mask.sum(1).mean()),
    }
    path = policy_path(model, snapshots, lambda m: LLMPolicy(m, world, subset))
    rows = core.measure(policy, path, baseline, msettings, None, mu_episodes, columns, progress, targets)
    check: list[dict[str, Any]] = []
    if full_check:
        t_check = time.perf_counter()
        progress(f"probe: {label}: full-gradient check")
        check = full_gradient_check(
            model, world, subset, snapshots, mu_episodes, targets, baseline, msettings, settings, label
        )
        world.timings["full_check_s"] = time.perf_counter() - t_check
    world.timings["total_s"] = time.perf_counter() - t0
    return rows, check


def full_gradient_check(
    model, world, subset, snapshots, mu_episodes, targets, baseline, msettings, settings, label
) -> list[dict[str, Any]]:
    """The same episodes (the first ``full_check_units`` prompts of μ's and of θ_k's samples) measured with
    the subset's projected gradients and with the whole model's: one table, two gradient spaces."""
    k = settings.full_check_k if settings.full_check_k is not None else max(settings.ks)
    n = settings.full_check_units
    mu_sub, pi_sub = select_units(mu_episodes, n), select_units(targets[k], n)
    check = dataclasses.replace(msettings, units_behaviour=n, units_target=n)
    ests = core.estimators()
    model.load_state_dict(snapshots[0])
    mu_logp, _ = LLMPolicy(model, world).evaluate(mu_sub)
    model.load_state_dict(snapshots[k])
    out = []
    try:
        for name, pi in (
            ("subset", LLMPolicy(model, world, subset)),
            ("full", FullGradientPolicy(LLMPolicy(model, world), settings.full_sketch_dim, settings.seed)),
        ):
            cols = {"checkpoint": label, "k": k, "gradient": name}
            out += core.measure_pair(mu_sub, mu_logp, pi, pi_sub, baseline, ests, check, k, cols)
    finally:
        model.load_state_dict(snapshots[0])
    return out


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (sandbox and grader workers): on a
    busy machine the wall time measures the neighbours, this measures the probe."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))
