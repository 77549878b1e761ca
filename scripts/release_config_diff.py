"""Diff the VERL config of a paper cell against the authors' released training script, key by key.

    git clone https://github.com/horizon-llm/CTPO /tmp/CTPO   # the release (commit acc4021 was compared)
    python scripts/release_config_diff.py --release /tmp/CTPO [--model qwen3-14b --method ctpo]

Reads the release's ``ctpo.sh`` (its ``VAR="${VAR:-default}"`` defaults and the overrides it passes to
``verl.trainer.main_ppo``), composes them with the release's own Hydra configs (its
``gsm8k_multiturn_grpo.yaml`` on its ``ppo_trainer.yaml``), composes ``ctpo.train.verl.build_overrides``
for the cell with the installed VERL's ``ppo_trainer.yaml``, and prints every key whose value differs
(paths, run names and keys only one VERL version has are left out). Needs the ``verl`` extra.
docs/paper_scale.md explains each difference that remains.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ctpo.config import load_config
from ctpo.train import verl as tv

ROOT = Path(__file__).resolve().parent.parent
# keys that name files, runs or places, and sections with no counterpart to compare
SKIP = (
    "tool_config_path", "project_name", "experiment_name", "default_local_dir", "train_files", "val_files",
    "model.path", "tokenizer_path", "ray_kwargs", "critic.", "actor_rollout_ref.ref.", "profiler",
    "agent_loop_config_path",
)  # fmt: skip


def release_overrides(script: str) -> list[str]:
    """The Hydra overrides ``ctpo.sh`` passes to main_ppo, with its shell defaults substituted."""
    defaults = dict(re.findall(r'^(\w+)="\$\{\w+:-(.*?)\}"', script, re.M))
    for name, value in re.findall(r'^\s*(\w+)="([^"$]*)"$', script, re.M):  # plain assignments: the first
        defaults.setdefault(name, value)  # (CTPO_LOSS_MODE's is the default CTPO_RATIO_MODE's branch)
    block = script.split("python3 -m verl.trainer.main_ppo", 1)[1].split('"$@"', 1)[0]
    extra = {  # the script's bash arrays, in their default branches
        '"${THINKING_ARGS[@]}"': [
            f"+data.apply_chat_template_kwargs.enable_thinking={defaults['ENABLE_THINKING']}"
        ],
        '"${ROLLOUT_CORR_ARGS[@]}"': [
            f"algorithm.rollout_correction.rollout_is={defaults['ROLLOUT_IS_LEVEL']}",
            f"algorithm.rollout_correction.rollout_is_threshold={defaults['ROLLOUT_IS_THRESHOLD']}",
            f"algorithm.rollout_correction.rollout_is_batch_normalize={defaults['ROLLOUT_IS_BATCH_NORM']}",
        ],
    }
    out = []
    for raw in block.split("\\\n"):
        item = raw.strip()
        if not item or item.startswith("--config"):
            continue
        if item in extra:
            out += extra[item]
            continue
        key, _, value = item.partition("=")
        value = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), value.strip('"'))
        if key in ("data.train_files", "data.val_files"):
            value = "[a.parquet]"
        elif "$" in value:  # names and paths built from other variables: not compared
            value = "x"
        out.append(f"{key}={value.strip(chr(39))}" if key != "trainer.logger" else "trainer.logger=[console]")
    return out


def compose(config_dir: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = hydra_compose(config_name=name, overrides=overrides)
    return flat(OmegaConf.to_container(cfg, resolve=True))


def flat(x: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(x, dict):
        return {k: v for key, value in x.items() for k, v in flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: x}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--release", required=True, type=Path, help="a checkout of horizon-llm/CTPO")
    parser.add_argument("--config", default=str(ROOT / "experiments" / "paper.yaml"))
    parser.add_argument("--model", default="qwen3-14b")
    parser.add_argument("--method", default="ctpo")
    args = parser.parse_args()

    import verl.trainer

    with tempfile.TemporaryDirectory() as tmp:
        config_dir = Path(tmp) / "config"
        shutil.copytree(args.release / "verl" / "trainer" / "config", config_dir)
        example = args.release / "examples" / "sglang_multiturn" / "config" / "gsm8k_multiturn_grpo.yaml"
        shutil.copy(example, config_dir / example.name)
        release = compose(config_dir, example.stem, release_overrides((args.release / "ctpo.sh").read_text()))
    ours = compose(
        Path(verl.trainer.__file__).parent / "config",
        "ppo_trainer",
        tv.build_overrides(load_config(args.config), args.model, args.method, 0, Path(tmp) / "run"),
    )
    for key in sorted(set(ours) & set(release)):
        if not any(s in key for s in SKIP) and str(ours[key]) != str(release[key]):
            print(f"{key}: ours={ours[key]!r} release={release[key]!r}")


if __name__ == "__main__":
    main()
