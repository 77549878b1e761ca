"""The local trainer: advantages, one update step, metrics, determinism and resume after SIGKILL."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from ctpo.train.advantages import group_advantages


# ----------------------------------------------------------------------------------------------------------
# Advantages against hand-computed values
# ----------------------------------------------------------------------------------------------------------
def test_group_advantages_hand_computed_with_std():
    # group 1: rewards 1,0,0,1 -> mean 0.5, unbiased std sqrt(1/3) -> +-0.5*sqrt(3)
    # group 2: all zero -> degenerate, advantage exactly 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    adv, n_flat = group_advantages(rewards, group_size=4, normalize_std=True, eps=0.0)
    h = 0.5 * math.sqrt(3.0)
    assert torch.allclose(adv, torch.tensor([h, -h, -h, h, 0, 0, 0, 0]), atol=1e-6)
    assert n_flat == 1


def test_group_advantages_without_std_and_all_ones():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv, n_flat = group_advantages(rewards, group_size=4, normalize_std=False)
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    assert n_flat == 1


def test_group_advantages_eps_and_shapes():
    adv, n_flat = group_advantages(torch.tensor([2.0, 0.0]), group_size=2, normalize_std=True, eps=1e-6)
    # mean 1, unbiased std sqrt(2): (+-1)/sqrt(2)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0]) / (math.sqrt(2.0) + 1e-6))
    assert n_flat == 0
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), group_size=3)


# ----------------------------------------------------------------------------------------------------------
# Diagnostics pooled over a window of steps
# ----------------------------------------------------------------------------------------------------------
def _diag_step_batch(step: int):
    """One step's (old, new, mask) in float64, rows of different lengths, a tool-output span (mask 0)."""
    g = torch.Generator().manual_seed(100 + step)
    b, t = 5 + step % 2, 30 + 4 * step
    old = -torch.rand(b, t, generator=g, dtype=torch.float64)
    new = old + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.bool)
    for i in range(b):
        mask[i, t - 3 * i :] = False
        mask[i, 5 + i : 8 + i] = False
    return old, new, mask


def _float64_reference(batches):
    """Per position t: count, mean and population std of log ρ_{1:t} over all rows of all batches."""
    from collections import defaultdict

    values = defaultdict(list)
    for old, new, mask in batches:
        for i in range(mask.shape[0]):
            logs = (new[i] - old[i])[mask[i]].numpy().cumsum()
            for t, v in enumerate(logs, start=1):
                values[t].append(v)
    return {t: (len(v), np.mean(v), np.std(v)) for t, v in values.items()}


def _run_windows(windows, steps, stop_after=None):
    """Feed steps through the windows as the trainer does (two micro-batches per step); the files."""
    files = {}
    for step in steps:
        collector = windows.collector(step)
        if collector is not None:
            old, new, mask = _diag_step_batch(step)
            collector.update(old[:3], new[:3], mask[:3]).update(old[3:], new[3:], mask[3:])
            windows.add(step, collector)
        pooled = windows.pop(step)
        if pooled is not None:
            files[step] = (pooled[0].to_frame(), pooled[1], pooled[0].n_sequences)
        if step == stop_after:
            break
    return files


def test_diagnostic_windows_pool_steps_exactly_and_survive_a_checkpoint(torch_roundtrip):
    from ctpo.diagnostics import DiagnosticWindows, PositionStats

    def make():
        return PositionStats(exact_limit=80, spacing="linear", max_position=80, max_tokens=None)

    # windows of 3 for diagnostic steps 2 (clipped at step 1), 5 and 6 (overlapping: 4 and 5 are in both)
    files = _run_windows(DiagnosticWindows([2, 5, 6], 3, make), range(1, 8))
    assert {d: (steps, n) for d, (_, steps, n) in files.items()} == {
        2: ([1, 2], 6 + 5),
        5: ([3, 4, 5], 6 + 5 + 6),
        6: ([4, 5, 6], 5 + 6 + 5),
    }
    for frame, steps, _ in files.values():
        ref = _float64_reference([_diag_step_batch(s) for s in steps])
        frame = frame.set_index("t_lo")
        assert sorted(frame.index) == sorted(ref)
        for t, (count, mean, std) in ref.items():
            assert frame.loc[t, "count"] == count
            assert frame.loc[t, "mean"] == pytest.approx(mean, rel=1e-10, abs=1e-12)
            assert frame.loc[t, "std"] == pytest.approx(std, rel=1e-10, abs=1e-12)

    # a checkpoint after step 4 (windows 5 and 6 open), restored in a fresh process: the same files, exactly
    first = DiagnosticWindows([2, 5, 6], 3, make)
    _run_windows(first, range(1, 8), stop_after=4)
    state = torch_roundtrip(first.state_dict())
    assert sorted(state) == [5, 6] and state[5]["steps"] == [3, 4] and state[6]["steps"] == [4]
    resumed = DiagnosticWindows([2, 5, 6], 3, make)
    resumed.load_state_dict(state)
    again = _run_windows(resumed, range(5, 8))
    for d in (5, 6):
        assert again[d][1:] == files[d][1:]
        pd.testing.assert_frame_equal(again[d][0], files[d][0], check_exact=True)


def test_diag_window_must_be_positive():
    from ctpo.config import ConfigError
    from ctpo.train.local import TrainConfig

    assert TrainConfig.from_section({"diag_window": 5}).diag_window == 5
    with pytest.raises(ConfigError, match="diag_window"):
        TrainConfig.from_section({"diag_window": 0})


# ----------------------------------------------------------------------------------------------------------
# Packing and log-probs on a micro model
# ----------------------------------------------------------------------------------------------------------
def micro_model(vocab: int = 40, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(cfg).eval()


def test_packed_log_probs_equal_unpadded_forward():
    from ctpo.train.batch import pack, response_log_probs

    model = micro_model()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [[14, 15, 16, 17], [18], [19, 20, 21]]
    masks = [[1, 0, 0, 1], [1], [1, 1, 0]]
    batch = pack(prompts, responses, masks, pad_id=0)
    assert batch.input_ids.shape == (3, 4 + 4)
    assert batch.response_mask.tolist() == [[1, 0, 0, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    with torch.no_grad():
        logp, entropy = response_log_probs(model, batch, temperature=0.7, with_entropy=True)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            ref = torch.log_softmax(model(ids).logits[0, len(p) - 1 : -1] / 0.7, -1)
            ref_lp = ref.gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            assert torch.allclose(logp[i, : len(r)], ref_lp, atol=1e-5)
            assert torch.allclose(entropy[i, : len(r)], -(ref.exp() * ref).sum(-1), atol=1e-5)
        # a sub-batch with shared padding trimmed gives the same values
        sub = batch.select(torch.tensor([1, 2]))
        assert sub.input_ids.shape == (2, 4 + 3)
        sub_lp, _ = response_log_probs(model, sub, temperature=0.7)
        assert torch.allclose(
            sub_lp * sub.response_mask, logp[1:, :3] * batch.response_mask[1:, :3], atol=1e-5
        )


def test_batch_indices_cover_each_epoch_once():
    from ctpo.train.local import batch_indices

    seen = [i for step in range(5) for i in batch_indices(10, 4, step, seed=3)]
    assert sorted(seen[:10]) == list(range(10))  # steps 0..2 cover epoch 0 (step 2 spills into epoch 1)
    assert batch_indices(10, 4, 3, seed=3) == batch_indices(10, 4, 3, seed=3)
    assert batch_indices(10, 4, 0, seed=3) != batch_indices(10, 4, 0, seed=4)


# ----------------------------------------------------------------------------------------------------------
# One update on a micro model moves log-probs the way the advantages say
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["grpo", "seq", "gspo", "ctpo", "ctpo_fixed"])
def test_update_moves_log_probs_with_advantage_sign(method):
    from ctpo.losses import PolicyLossConfig
    from ctpo.train.batch import pack, response_log_probs
    from ctpo.train.local import TrainConfig, old_log_probs, update_policy

    model = micro_model(seed=1)
    prompts = [[3, 4, 5], [3, 4, 5], [6, 7], [6, 7]]
    responses = [[10, 11, 12, 13, 14], [20, 21, 22], [15, 16, 17, 18], [25, 26, 27, 28, 29, 30]]
    masks = [[1, 1, 0, 1, 1], [1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1, 1, 1]]
    batch = pack(prompts, responses, masks, pad_id=0)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    cfg = TrainConfig(ppo_epochs=3, minibatches=2, lr=3e-3, max_grad_norm=0.0)
    loss_cfg = PolicyLossConfig.from_dict({"method": method}).resolved()
    old = old_log_probs(model, batch, 1.0, chunk=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    metrics = update_policy(
        model, optimizer, batch, old, advantages, loss_cfg, cfg, torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        new, _ = response_log_probs(model.eval(), batch)
    seq_change = ((new - old) * batch.response_mask).sum(1)
    assert (seq_change[advantages > 0] > 0).all(), seq_change
    assert (seq_change[advantages < 0] < 0).all(), seq_change
    for key in (
        "train/loss",
        "train/entropy",
        "train/grad_norm",
        "clip/frac",
        "ratio/mean",
        "ratio/approx_kl",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["train/grad_norm"] > 0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_accumulate_to_the_minibatch_gradient(agg):
    """Length-grouped micro-batches (gradient accumulation) give the same step as one forward pass."""
    import copy

    from ctpo.losses import PolicyLossConfig
    from ctpo.train.batch import pack
    from ctpo.train.local import TrainConfig, old_log_probs, update_policy

    prompts = [[3, 4, 5], [6, 7], [8], [9, 10, 11, 12], [3, 5], [7, 7, 7]]
    responses = [[13, 14], [15, 16, 17, 18, 19], [20], [21, 22, 23], [24, 25, 26, 27, 28, 29], [30, 31]]
    masks = [[1, 1], [1, 0, 0, 1, 1], [1], [1, 1, 1], [1, 1, 0, 1, 1, 1], [1, 1]]
    batch = pack(prompts, responses, masks, pad_id=0)
    advantages = torch.tensor([1.0, -0.5, 0.3, -1.0, 0.7, -0.2])
    loss_cfg = PolicyLossConfig.from_dict({"method": "ctpo", "loss_agg_mode": agg}).resolved()
    models = []
    for micro in (64, 2):
        model = micro_model(seed=3)
        cfg = TrainConfig(minibatches=2, lr=1e-2, logprob_batch_size=micro, max_grad_norm=0.0)
        old = old_log_probs(model, batch, 1.0, chunk=micro)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        update_policy(
            model, optimizer, batch, old, advantages, loss_cfg, cfg, torch.Generator().manual_seed(0)
        )
        models.append(copy.deepcopy(model.state_dict()))
    for key in models[0]:
        assert torch.allclose(models[0][key], models[1][key], atol=1e-6), key


def test_on_policy_first_step_is_vanilla_policy_gradient():
    """On-policy (old == current) every method's gradient is the vanilla policy gradient (Prop. 1)."""
    from ctpo.losses import PolicyLossConfig, compute_policy_loss
    from ctpo.train.batch import pack, response_log_probs
    from ctpo.train.local import old_log_probs

    batch = pack([[3, 4], [5, 6, 7]], [[8, 9, 10], [11, 12]], [[1, 0, 1], [1, 1]], pad_id=0)
    adv = torch.tensor([0.5, -1.5])
    grads = {}
    for method in ["grpo", "gspo", "ctpo"]:
        model = micro_model(seed=2)
        old = old_log_probs(model, batch, 1.0, chunk=4)
        logp, _ = response_log_probs(model, batch)
        cfg = PolicyLossConfig.from_dict({"method": method}).resolved()
        loss, _ = compute_policy_loss(old, logp, adv, batch.response_mask, cfg)
        loss.backward()
        grads[method] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model = micro_model(seed=2)
    logp, _ = response_log_probs(model, batch)
    m = batch.response_mask
    (-(adv[:, None] * logp * m).sum() / m.sum()).backward()
    ref = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    for method, g in grads.items():
        assert torch.allclose(g, ref, atol=1e-6), method


# ----------------------------------------------------------------------------------------------------------
# The real program on a micro study: outputs, metrics, determinism, resume after SIGKILL
# ----------------------------------------------------------------------------------------------------------
MICRO_STUDY = {
    "study": "micro",
    "seeds": [0],
    "data": {
        "train": {"source": "arith", "split": "easy", "n": 64, "seed": 0},
        "benchmarks": {"arith-easy": {"source": "arith", "split": "easy", "n": 4, "seed": 101}},
    },
    "models": {
        "micro": {
            "preset": "xs",
            "sft": {"n_demos": 32, "steps": 25, "batch_size": 8, "lr": 0.01, "warmup_steps": 5},
        }
    },
    "methods": {"grpo": {"method": "grpo"}, "ctpo": {"method": "ctpo"}},
    "runs": [{"models": ["micro"], "methods": ["grpo", "ctpo"]}],
    "train": {
        "steps": 4,
        "prompts_per_step": 3,
        "group_size": 4,
        "minibatches": 2,
        "lr": 0.003,
        "eval_every": 2,
        "eval_k": 2,
        "eval_problems": 2,
        "diag_steps": [2, 4],
        "diag_window": 3,  # step 4 pools steps 2-4, across the step-2 checkpoint the resume test uses
        "checkpoint_every": 2,
        "threads": 1,
    },
    "tir": {"max_turns": 3, "max_response_tokens": 64},
    "sandbox": {"workers": 1},
    "mlflow": {"enabled": False},
}

# A micro model cannot solve arith, so every reward would be 0 and no parameter would ever move. The
# runs swap the grader for a deterministic stand-in (reward 1 when the final turn has an even number of
# characters): advantages are then non-zero, the optimizer state matters, and resume has something to
# get wrong. Everything else is the real `ctpo train`.
PARITY_GRADER = """
import ctpo.reward as reward

class ParityGrader(reward.Grader):
    def __init__(self, *args, **kwargs):
        pass

    def close(self):
        pass

    def grade_batch(self, solutions, golds):
        return [reward.GradeResult(len(s) % 2 == 0, None, "ok") for s in solutions]
"""
RUNNER = (
    PARITY_GRADER
    + """
import sys
reward.Grader = ParityGrader
from ctpo.cli import main
sys.exit(main(sys.argv[1:]))
"""
)


@pytest.fixture
def parity_grader(monkeypatch):
    import ctpo.reward
    import ctpo.train.local

    namespace: dict = {}
    exec(PARITY_GRADER, namespace)
    for module in (ctpo.reward, ctpo.train.local):  # the trainer holds its own reference to the class
        monkeypatch.setattr(module, "Grader", namespace["ParityGrader"])


def _train_in_process(study, out, method="grpo", seed=0, config=None, **train_overrides):
    from ctpo.train.local import train

    config = dict(config or study["dict"])
    config["train"] = {**config["train"], **train_overrides}
    threads = torch.get_num_threads()
    try:
        return train(config, "micro", method, seed, study["base"], out, progress=False, log=lambda msg: None)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def micro_study(tmp_path_factory):
    import yaml

    from ctpo.train.sft import run_sft

    root = tmp_path_factory.mktemp("micro_study")
    config = {**MICRO_STUDY, "results_dir": str(root / "results")}
    path = root / "micro.yaml"
    path.write_text(yaml.safe_dump(config))
    threads = torch.get_num_threads()
    # The base is a shrunken xs (the schema has no architecture overrides, so they go in-process only).
    micro = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 2}
    models = {"micro": {**config["models"]["micro"], **micro, "num_key_value_heads": 1}}
    run_sft({**config, "models": models}, "micro", root / "base", threads=1, progress=False)
    torch.set_num_threads(threads)
    runner = root / "runner.py"
    runner.write_text(RUNNER)
    return {"root": root, "config": path, "base": root / "base", "runner": runner, "dict": config}


def _train_cmd(study, out, method="grpo", seed=0, config=None):
    import sys

    return [
        sys.executable, str(study["runner"]), "train", "--config", str(config or study["config"]),
        "--model", "micro", "--method", method, "--seed", str(seed), "--base", str(study["base"]),
        "--out", str(out), "--no-progress",
    ]  # fmt: skip


def _metrics(run_dir):
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def test_cli_outputs_metrics_and_mlflow(micro_study, tmp_path):
    import json
    import subprocess

    import yaml

    config = {**micro_study["dict"], "mlflow": {"enabled": True}, "results_dir": str(tmp_path / "results")}
    cfg_path = tmp_path / "with_mlflow.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    cmd = [*_train_cmd(micro_study, out, "ctpo", config=cfg_path), "--max-steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = _metrics(out)
    assert [r["train/step"] for r in rows] == [0, 1, 2]  # step 0: eval of the starting policy
    raw = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for key in (
        "train/reward_mean", "train/accuracy", "train/response_length", "train/tool_calls",
        "train/tool_errors", "train/degenerate_groups_frac", "train/entropy", "train/grad_norm",
        "train/kl_behaviour_old", "ratio/mean", "ratio/approx_kl", "clip/frac", "clip/frac_low",
        "time/generate", "time/tool", "time/old_logprob", "time/update", "time/step",
        "eval/avg_at_k", "eval/avg_at_k_se",
    ):  # fmt: skip
        assert key in raw, key
    assert set(rows[0]) == {"train/step", *(k for k in rows[0] if k.startswith("eval/"))}
    assert "diag/sqrt_fit_r2" in rows[2] and "eval/avg_at_k" in rows[2] and "eval/avg_at_k" not in rows[1]
    assert (out / "diagnostics" / "step_00002.csv").is_file()
    assert (out / "final" / "config.json").is_file() and (out / "final" / "tokenizer.json").is_file()
    done = json.loads((out / "DONE.json").read_text())
    assert done["final_step"] == 2 and done["mlflow_run_id"] and done["wall_s"] > 0

    from mlflow.tracking import MlflowClient

    store = json.loads((tmp_path / "results" / "mlflow.json").read_text())
    run = MlflowClient(store["tracking_uri"]).get_run(done["mlflow_run_id"])
    assert run.data.tags["model"] == "micro" and run.data.tags["method"] == "ctpo"
    assert run.data.tags["seed"] == "0" and run.data.tags["study"] == "micro"
    assert any(k.startswith("sandbox_isolation") for k in run.data.params)
    assert run.data.metrics["train/step"] == 2

    # a finished run is not retrained
    from ctpo.train.local import train

    messages = []
    again = train(config, "micro", "ctpo", 0, micro_study["base"], out, log=messages.append)
    assert again == done and "already finished" in messages[0]


def test_same_seed_same_metrics_other_seed_differs(micro_study, tmp_path, parity_grader):
    _train_in_process(micro_study, tmp_path / "a", steps=2, eval_every=0, diag_steps=[])
    _train_in_process(micro_study, tmp_path / "b", steps=2, eval_every=0, diag_steps=[])
    _train_in_process(micro_study, tmp_path / "c", seed=1, steps=2, eval_every=0, diag_steps=[])
    a, b, c = (_metrics(tmp_path / name) for name in "abc")
    assert a == b
    assert a != c


def test_resume_after_sigkill_equals_uninterrupted_run(micro_study, tmp_path, parity_grader):
    import signal
    import subprocess
    import time

    full = tmp_path / "full"
    _train_in_process(micro_study, full)

    # Kill the real CLI twice: once mid-step 3 (the newest checkpoint is step 2) and once right after
    # step 3 was logged (metrics.jsonl is then ahead of the checkpoint and must be rolled back on resume).
    # metrics.jsonl has a row for step 0 (the eval before training), so step s is row s + 1.
    # the killed and resumed runs log to MLflow (SQLite), which must end with each step once
    import json

    import yaml

    tracked = {**micro_study["dict"], "mlflow": {"enabled": True}, "results_dir": str(tmp_path / "results")}
    tracked_path = tmp_path / "tracked.yaml"
    tracked_path.write_text(yaml.safe_dump(tracked))
    cut = tmp_path / "cut"
    for kill_after_rows, delay in ((3, 0.3), (4, 0.0)):
        proc = subprocess.Popen(
            _train_cmd(micro_study, cut, config=tracked_path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        metrics = cut / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and metrics.read_text().count("\n") >= kill_after_rows:
                break
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed"
        assert metrics.read_text().count("\n") >= kill_after_rows - 1
        assert not (cut / "DONE.json").exists(), "the run finished before it could be killed; slow it down"
    # the restart (in-process: it knows only what the killed runs left on disk)
    _train_in_process(micro_study, cut, config=tracked)

    expected, got = _metrics(full), _metrics(cut)
    assert len(got) == 5
    for step, (e, g) in enumerate(zip(expected, got)):
        diff = {k: (e.get(k), g.get(k)) for k in e.keys() | g.keys() if e.get(k) != g.get(k)}
        assert not diff, f"step {step} differs after resume: {diff}"
    assert any(r.get("train/grad_norm", 0) > 0 for r in expected), (
        "no update happened; the test proves nothing"
    )
    a = torch.load(sorted((full / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)["model"]
    b = torch.load(sorted((cut / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # MLflow got every step exactly once although step 3 ran three times and step 4 twice
    from mlflow.tracking import MlflowClient

    store = json.loads((tmp_path / "results" / "mlflow.json").read_text())
    run_id = (cut / "mlflow_run_id").read_text().strip()
    history = MlflowClient(store["tracking_uri"]).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    # the diagnostics of step 4 pool steps 2-4; step 2's part came through the checkpoint
    for name in ("step_00002.csv", "step_00004.csv"):
        assert (cut / "diagnostics" / name).read_bytes() == (full / "diagnostics" / name).read_bytes(), name
    pooled = pd.read_csv(full / "diagnostics" / "step_00004.csv")
    assert (pooled["window_first_step"] == 2).all() and (pooled["window_steps"] == 3).all()
    assert pooled["n_sequences"].iloc[0] == pooled["count"].iloc[0] == 3 * 3 * 4  # steps x prompts x G
    assert expected[4]["diag/n_sequences"] == 36 and expected[4]["diag/window_first_step"] == 2


def _eval_files(folder):
    """samples.jsonl and summary.json of every benchmark under ``folder``, without timings and run ids."""
    import json

    timing = {"eval_s", "rollout_s", "mlflow_run_id", "generator_stats"}
    files = {}
    for path in sorted(folder.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        files[path.parent.name] = (
            {k: v for k, v in summary.items() if k not in timing},
            (path.parent / "samples.jsonl").read_text(),
        )
    return files


def test_eval_out_equals_ctpo_eval_and_a_rerun_only_evaluates(micro_study, tmp_path):
    """`ctpo train --eval-out` (the workflow's local jobs) writes what a separate `ctpo eval` of RUN/final
    writes, sample for sample; rerun without DONE.json (as Snakemake does on a changed eval setting) it
    trains nothing and evaluates again."""
    import subprocess

    out, together, apart = tmp_path / "run", tmp_path / "eval_in_train", tmp_path / "eval_apart"
    train = [*_train_cmd(micro_study, out, "ctpo"), "--max-steps", "2", "--eval-out", str(together)]
    proc = subprocess.run(train, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluate = [
        *_train_cmd(micro_study, out)[:2], "eval", "--config", str(micro_study["config"]),
        "--model-path", str(out / "final"), "--benchmark", "arith-easy", "--out", str(apart),
        "--out-per-benchmark", "--run", str(out), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(evaluate, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = _eval_files(together)
    assert list(first) == ["arith-easy"] and first == _eval_files(apart)
    summary, samples = first["arith-easy"]
    assert (summary["model"], summary["method"], summary["seed"]) == ("micro", "ctpo", 0)
    assert summary["model_path"] == str(out / "final") and samples.count("\n") == 4 * summary["k"]

    metrics = (out / "metrics.jsonl").read_bytes()
    checkpoints = {p.name: p.read_bytes() for p in (out / "checkpoints").glob("step_*.pt")}
    (out / "DONE.json").unlink()
    shutil.rmtree(together)
    proc = subprocess.run(train, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to train" in proc.stderr and "resuming" not in proc.stderr
    assert (out / "metrics.jsonl").read_bytes() == metrics
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").glob("step_*.pt")} == checkpoints
    assert _eval_files(together) == first


def test_eval_out_is_for_the_local_backend_only(micro_study, tmp_path, capsys):
    from ctpo.cli import main

    args = ["train", "--config", str(micro_study["config"]), "--model", "micro", "--method", "ctpo"]
    args += ["--base", str(micro_study["base"]), "--out", str(tmp_path / "run")]
    assert main([*args, "--eval-benchmark", "arith-easy"]) == 2
    assert "--eval-benchmark needs --eval-out" in capsys.readouterr().err
    assert main([*args, "--backend", "verl", "--eval-out", str(tmp_path / "e")]) == 2
    assert "only the local backend" in capsys.readouterr().err


def test_verl_backend_missing_gives_a_clear_error(monkeypatch, tmp_path, capsys):
    import sys

    import yaml

    from ctpo.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**MICRO_STUDY, "results_dir": str(tmp_path)}))
    import ctpo.train

    monkeypatch.setitem(sys.modules, "ctpo.train.verl", None)  # import fails as if verl were not installed
    monkeypatch.delattr(ctpo.train, "verl", raising=False)  # (an earlier test may have imported it)
    argv = [
        "train",
        "--config",
        str(cfg),
        "--model",
        "micro",
        "--method",
        "grpo",
        "--base",
        "b",
        "--out",
        "o",
    ]
    assert main([*argv, "--backend", "verl"]) == 2
    assert "verl backend is not available" in capsys.readouterr().err


def test_checkpoints_of_another_config_are_not_resumed(tmp_path):
    """A run rerun under a changed config starts fresh; the same config (or only more steps) resumes."""
    from ctpo.train.checkpoint import discard_stale_checkpoints
    from ctpo.train.local import run_fingerprint

    config = {
        "models": {"m": {"preset": "xs"}},
        "methods": {"ctpo": {"method": "ctpo"}},
        "train": {"steps": 4, "lr": 1e-3},
        "data": {"train": {"source": "arith"}},
    }
    fp = run_fingerprint(config, "m", "ctpo", 0, "base")
    longer = {**config, "train": {"steps": 8, "lr": 1e-3}}
    assert run_fingerprint(longer, "m", "ctpo", 0, "base") == fp
    changed = {**config, "methods": {"ctpo": {"method": "ctpo", "gamma": 0.3}}}
    assert run_fingerprint(changed, "m", "ctpo", 0, "base") != fp
    assert run_fingerprint(config, "m", "ctpo", 1, "base") != fp
    # Figure 1's reference ranges are part of every run's identity, whatever its method
    assert run_fingerprint({**config, "diagnostics": {"gamma": 0.6}}, "m", "ctpo", 0, "base") != fp
    assert (
        run_fingerprint({**config, "diagnostics": {"gamma": 0.5}}, "m", "ctpo", 0, "base") == fp
    )  # the default

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_00002.pt").write_bytes(b"x")
    (out / "mlflow_run_id").write_text("abc")
    messages = []
    discard_stale_checkpoints(out, fp, messages.append)  # first attempt: nothing recorded yet, keep
    discard_stale_checkpoints(out, fp, messages.append)  # same config: keep
    assert (out / "checkpoints" / "step_00002.pt").exists() and (out / "mlflow_run_id").exists()
    assert messages == []
    discard_stale_checkpoints(out, run_fingerprint(changed, "m", "ctpo", 0, "base"), messages.append)
    assert not (out / "checkpoints").exists() and not (out / "mlflow_run_id").exists()
    assert len(messages) == 1 and "config changed" in messages[0]


def test_dry_run_prints_the_verl_command_and_the_local_settings(capsys):
    """`--dry-run` runs nothing: the paper config prints VERL's launch command, the tiny one its settings."""
    import json
    from pathlib import Path

    from ctpo.cli import main

    root = Path(__file__).resolve().parent.parent
    argv = ["train", "--method", "ctpo", "--base", "b", "--out", "o", "--dry-run"]
    assert main([*argv, "--config", str(root / "experiments/paper.yaml"), "--model", "qwen3-4b"]) == 0
    cmd = capsys.readouterr().out
    assert "-m verl.trainer.main_ppo" in cmd and "actor_rollout_ref.actor.policy_loss.loss_mode=ctpo" in cmd
    assert "data.train_batch_size=512" in cmd and "+actor_rollout_ref.actor.policy_loss.gamma=0.5" in cmd
    assert (
        main(
            [
                *argv,
                "--config",
                str(root / "experiments/tiny.yaml"),
                "--model",
                "tiny-s",
                "--backend",
                "local",
            ]
        )
        == 0
    )
    settings = json.loads(capsys.readouterr().out)
    assert settings["loss"]["method"] == "ctpo" and settings["loss"]["clip_mode"] == "adaptive"
    assert not Path("o").exists()


def test_a_models_train_keys_reach_the_local_trainer_and_its_fingerprint(tmp_path, capsys):
    """`models.<name>.train.lr` is the lr that model trains with (dry run), and changing it starts the run
    afresh (fingerprint), while the other model is untouched."""
    import json
    from pathlib import Path

    import yaml

    from ctpo.cli import main
    from ctpo.train.local import run_fingerprint

    root = Path(__file__).resolve().parent.parent
    config = yaml.safe_load((root / "experiments/tiny.yaml").read_text())
    for spec in config["models"].values():
        spec.pop("train", None)  # start from the study's train section for both models
    study_lr = config["train"]["lr"]
    fp = {m: run_fingerprint(config, m, "ctpo", 0, "base") for m in ("tiny-s", "tiny-m")}
    config["models"]["tiny-m"]["train"] = {"lr": study_lr / 7}
    assert run_fingerprint(config, "tiny-m", "ctpo", 0, "base") != fp["tiny-m"]
    assert run_fingerprint(config, "tiny-s", "ctpo", 0, "base") == fp["tiny-s"]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [
        "train",
        "--config",
        str(path),
        "--method",
        "ctpo",
        "--base",
        "b",
        "--out",
        str(tmp_path / "o"),
        "--dry-run",
        "--backend",
        "local",
    ]
    assert main([*argv, "--model", "tiny-m"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["lr"] == study_lr / 7
    assert main([*argv, "--model", "tiny-s"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["lr"] == study_lr
    assert not (tmp_path / "o").exists()
