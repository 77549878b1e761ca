"""Evaluation: avg@k, its standard errors and pass@k against hand-computed values; the evaluation loop
through the real episode loop, sandbox and grader with a scripted generator; and the `ctpo sft` /
`ctpo eval` CLIs end to end on a micro budget."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ctpo.eval import evaluate, pass_at_k, run_eval, run_eval_many, summarize


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(4, 2, 3) == pytest.approx(1.0)  # n - c < k
    assert pass_at_k(8, 3, 4) == pytest.approx(1 - math.comb(5, 4) / math.comb(8, 4))
    assert pass_at_k(32, 5, 7) == pytest.approx(1 - math.comb(27, 7) / math.comb(32, 7))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_summarize_hand_values():
    # 3 problems, k = 4: per-problem accuracies 1/4, 2/4, 4/4
    correct = [[True, False, False, False], [True, True, False, False], [True, True, True, True]]
    s = summarize(correct)
    assert s["k"] == 4 and s["n_problems"] == 3
    assert s["avg_at_k"] == pytest.approx(7 / 12)
    # SE over problems: sd of (0.25, 0.5, 1.0) with ddof=1, divided by sqrt(3)
    m = 7 / 12
    sd = math.sqrt(((0.25 - m) ** 2 + (0.5 - m) ** 2 + (1 - m) ** 2) / 2)
    assert s["avg_at_k_se"] == pytest.approx(sd / math.sqrt(3))
    assert s["avg_at_k_se_samples"] == pytest.approx(math.sqrt(m * (1 - m) / 12))
    assert s["pass_at_k"]["1"] == pytest.approx(7 / 12)  # pass@1 == avg@k
    assert s["pass_at_k"]["2"] == pytest.approx((0.5 + 5 / 6 + 1) / 3)
    assert s["pass_at_k"]["4"] == pytest.approx(1.0)
    assert list(s["pass_at_k"]) == ["1", "2", "3", "4"]
    with pytest.raises(ValueError):
        summarize([[True], [True, False]])


class _Tok:
    """Character-level stand-in tokenizer (enough for the episode loop's text/token work)."""

    eos_token_id = 0
    pad_token_id = 0
    eos_token = "\x00"
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) + 1 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 1) for i in ids if i != 0)


def test_run_eval_with_scripted_generator(pool):
    from ctpo.reward import Grader
    from ctpo.tir.episode import ScriptedGenerator
    from ctpo.tir.protocol import TIRConfig

    records = [
        {"id": "p0", "problem": "What is 12 * 34?", "answer": "408"},
        {"id": "p1", "problem": "What is 7 * 6?", "answer": "42"},
    ]
    # p0: uses the tool and copies its output (right); p1: answers by hand (wrong)
    script = {
        "What is 12 * 34?": ["Compute.\n```python\nprint(12 * 34)\n```\n", "So \\boxed{408}.\x00"],
        "What is 7 * 6?": ["By hand: \\boxed{41}.\x00"],
    }
    gen = ScriptedGenerator(_Tok(), script)
    cfg = TIRConfig(max_response_tokens=400)
    with Grader(workers=1) as grader:
        summary, samples = run_eval(gen, _Tok(), records, 3, cfg, pool, grader)
        again = evaluate(gen, _Tok(), records, 3, cfg, pool, grader)
    assert summary["avg_at_k"] == pytest.approx(0.5) and summary["avg_at_k_se"] == pytest.approx(0.5)
    assert summary["pass_at_k"] == {"1": 0.5, "2": 0.5, "3": 0.5}
    assert again["avg_at_k"] == summary["avg_at_k"]
    assert gen.calls[0] == 6  # all k samples of all problems in one generate call
    assert [s["problem_id"] for s in samples] == ["p0"] * 3 + ["p1"] * 3
    assert [s["sample"] for s in samples] == [0, 1, 2] * 2
    s0, s1 = samples[0], samples[3]
    assert s0["correct"] and s0["extracted"] == "408" and s0["turns"] == 2 and s0["tool_calls"] == 1
    assert "```output\n408\n```" in s0["response"]
    assert not s1["correct"] and s1["extracted"] == "41" and s1["turns"] == 1 and s1["tool_calls"] == 0
    assert s0["length"] > s0["policy_tokens"] > 0
    assert summary["mean_tool_calls"] == pytest.approx(0.5)
    assert summary["finish"] == {"answer": 6}


def test_records_with_ids_hold_the_episode_tokens_mask_and_logprobs(pool):
    """``with_ids``: each record carries its exact tokens; the observation is mask 0 with log-prob 0.0."""
    from ctpo.reward import Grader
    from ctpo.tir.episode import ScriptedGenerator
    from ctpo.tir.protocol import TIRConfig, encode_prompt

    records = [{"id": "p0", "problem": "What is 12 * 34?", "answer": "408"}]
    turns = ["Compute.\n```python\nprint(12 * 34)\n```\n", "So \\boxed{408}.\x00"]
    gen = ScriptedGenerator(_Tok(), {"What is 12 * 34?": turns}, logprob_fn=lambda ctx, t: -0.5)
    cfg = TIRConfig(max_response_tokens=400)
    with Grader(workers=0) as grader:
        (_, plain), (_, full) = (
            run_eval_many(gen, _Tok(), {"b": records}, 1, cfg, pool, grader, with_ids=w)["b"]
            for w in (False, True)
        )
    assert "response_ids" not in plain[0]
    r = full[0]
    assert r["prompt_ids"] == encode_prompt(records[0]["problem"], _Tok(), cfg)
    assert _Tok().decode(r["response_ids"]) == r["response"]
    obs = "```output\n408\n```\n"
    n1, n2 = len(_Tok().encode(turns[0])), len(_Tok().encode(turns[1]))
    assert r["response_mask"] == [1] * n1 + [0] * len(obs) + [1] * n2
    assert r["behaviour_logprobs"] == [-0.5] * n1 + [0.0] * len(obs) + [-0.5] * n2
    assert {
        k: v
        for k, v in r.items()
        if k not in ("prompt_ids", "response_ids", "response_mask", "behaviour_logprobs")
    } == plain[0]


def _copies_script(answers: dict[str, list[str]], tool: dict[str, str]):
    """A scripted model whose j-th copy of a problem answers ``answers[problem][j]`` by hand; problems in
    ``tool`` first run its code, then answer its answer. Copies are told apart by counting calls per problem
    (the episode loop keeps copies in order within a turn)."""
    seen: dict[tuple[str, int], int] = {}

    def script(context: str) -> str:
        problem = next(p for p in [*answers, *tool] if p in context)
        turn = context.split(problem, 1)[1].count("```output")  # observations so far
        if problem in tool:
            code, answer = tool[problem]
            return f"So \\boxed{{{answer}}}.\x00" if turn else f"Compute.\n```python\nprint({code})\n```\n"
        j = seen.get((problem, turn), 0)
        seen[(problem, turn)] = j + 1
        return f"By hand: \\boxed{{{answers[problem][j % len(answers[problem])]}}}.\x00"

    return script


EASY = [
    {"id": "e0", "problem": "What is 2 + 2?", "answer": "4"},
    {"id": "e1", "problem": "What is 3 + 3?", "answer": "6"},
]
HARD = [
    {"id": "h0", "problem": "What is 12 * 34?", "answer": "408"},
    {"id": "h1", "problem": "What is 7 * 6?", "answer": "42"},
    {"id": "h2", "problem": "What is 9 * 9?", "answer": "81"},
]
# per copy: e0 2/3 right, e1 1/3, h0 3/3 (through the tool), h1 0/3, h2 2/3
ANSWERS = {
    "What is 2 + 2?": ["4", "4", "5"],
    "What is 3 + 3?": ["6", "0", "0"],
    "What is 7 * 6?": ["41"],
    "What is 9 * 9?": ["81", "80", "81"],
}
TOOL = {"What is 12 * 34?": ("12 * 34", "408")}


def test_run_eval_many_batches_every_benchmark_and_splits_back(pool):
    from ctpo.reward import Grader
    from ctpo.tir.episode import ScriptedGenerator
    from ctpo.tir.protocol import TIRConfig

    cfg = TIRConfig(max_response_tokens=400)
    gen = ScriptedGenerator(_Tok(), _copies_script(ANSWERS, TOOL))
    with Grader(workers=1) as grader:
        results = run_eval_many(gen, _Tok(), {"easy": EASY, "hard": HARD}, 3, cfg, pool, grader)
        alone = run_eval(
            ScriptedGenerator(_Tok(), _copies_script(ANSWERS, TOOL)), _Tok(), HARD, 3, cfg, pool, grader
        )
        gen_apart = ScriptedGenerator(_Tok(), _copies_script(ANSWERS, TOOL))
        apart = run_eval_many(
            gen_apart, _Tok(), {"easy": EASY, "hard": HARD}, 3, cfg, pool, grader, batched=False
        )
        with pytest.raises(ValueError, match="'hard'"):
            run_eval_many(gen, _Tok(), {"easy": EASY, "hard": []}, 3, cfg, pool, grader)
    # one generate call per turn for both benchmarks: 5 problems x 3 copies, then h0's 3 tool follow-ups
    assert gen.calls[:2] == [15, 3]
    assert list(results) == ["easy", "hard"]

    for name, records in (("easy", EASY), ("hard", HARD)):
        summary, samples = results[name]
        # each sample sits under its own benchmark, problem by problem, copy by copy
        answers = {r["id"]: r["answer"] for r in records}
        assert [s["problem_id"] for s in samples] == [r["id"] for r in records for _ in range(3)]
        assert [s["sample"] for s in samples] == [0, 1, 2] * len(records)
        assert all(s["answer"] == answers[s["problem_id"]] for s in samples)
        # the summary is the samples' own statistics
        correct = [s["correct"] for s in samples]
        assert summary["n_problems"] == len(records) and summary["k"] == 3
        assert summary["avg_at_k"] == pytest.approx(sum(correct) / len(correct))
        assert summary["mean_tool_calls"] == pytest.approx(
            sum(s["tool_calls"] for s in samples) / len(samples)
        )
        assert summary["mean_length"] == pytest.approx(sum(s["length"] for s in samples) / len(samples))
        assert summary["batched_with"] == [b for b in ("easy", "hard") if b != name]

    easy, hard = results["easy"][0], results["hard"][0]
    # hand values: easy per-problem 2/3, 1/3; hard 3/3, 0/3, 2/3
    assert easy["avg_at_k"] == pytest.approx(0.5)
    assert easy["avg_at_k_se"] == pytest.approx(math.sqrt(2 * (1 / 6) ** 2) / math.sqrt(2))
    assert easy["pass_at_k"]["2"] == pytest.approx((1 + 2 / 3) / 2) and easy["pass_at_k"]["3"] == 1.0
    assert hard["avg_at_k"] == pytest.approx(5 / 9)
    assert hard["pass_at_k"]["3"] == pytest.approx(2 / 3) and hard["mean_tool_calls"] == pytest.approx(1 / 3)
    assert [s["correct"] for s in results["hard"][1]] == [True] * 3 + [False] * 3 + [True, False, True]
    # the shared call's timings, the same in every summary
    assert easy["rollout_s"] == hard["rollout_s"] and easy["eval_s"] == hard["eval_s"]
    # evaluated alone, the same benchmark gives the same samples and statistics
    timing = {"rollout_s", "eval_s", "batched_with"}
    assert {k: v for k, v in alone[0].items() if k not in timing} == {
        k: v for k, v in hard.items() if k not in timing
    }
    assert alone[1] == results["hard"][1] and alone[0]["batched_with"] == []
    # batched=False: one batch per benchmark, in order (easy's one turn, then hard's two)
    assert gen_apart.calls == [6, 9, 3]
    assert apart["hard"][1] == results["hard"][1] and apart["easy"][1] == results["easy"][1]
    assert apart["easy"][0]["batched_with"] == [] and apart["easy"][0]["eval_s"] != apart["hard"][0]["eval_s"]


def test_batch_benchmarks_default_follows_the_backend():
    from ctpo.commands.eval import batch_together, benchmark_names

    assert not batch_together("hf", None) and batch_together("vllm", None)
    assert batch_together("hf", "together") and not batch_together("vllm", "apart")
    assert benchmark_names(["a,b", "c", "a"]) == ["a", "b", "c"]
    with pytest.raises(SystemExit, match="empty benchmark"):
        benchmark_names(["a,,b"])


def _ctpo(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "ctpo", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def micro_config(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("study")
    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "experiments" / "tiny.yaml").read_text())
    cfg["results_dir"] = str(root / "results")
    cfg["mlflow"] = {"enabled": False}
    cfg["models"] = {
        "micro": {"preset": "xs", "sft": {"n_demos": 64, "steps": 4, "batch_size": 4, "copy_steps": 2}}
    }
    cfg["eval"] = {**cfg.get("eval", {}), "max_new_tokens": 24}
    cfg["tir"] = {**cfg.get("tir", {}), "max_response_tokens": 96}
    path = root / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def micro_base(micro_config, tmp_path_factory):
    """A micro Base checkpoint from `ctpo sft` (shared by the CLI smokes)."""
    base = tmp_path_factory.mktemp("micro") / "base"
    r = _ctpo("sft", "--config", str(micro_config), "--model", "micro", "--out", str(base), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    return base


def test_sft_and_eval_cli_smoke(micro_config, micro_base, tmp_path):
    base = micro_base
    summary = json.loads((base / "sft_summary.json").read_text())
    assert summary["steps"] == 4 and summary["n_demos"] == 64 and summary["threads"] == 1
    assert (base / "config.json").is_file() and (base / "tokenizer.json").is_file()

    out = tmp_path / "eval"
    r = _ctpo(
        "eval",
        "--config",
        str(micro_config),
        "--model-path",
        str(base),
        "--benchmark",
        "arith-easy",
        "--out",
        str(out),
        "--k",
        "2",
        "--n",
        "3",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["k"] == 2 and s["n_problems"] == 3 and s["model"] == "micro" and s["method"] == "base"
    assert {"avg_at_k", "avg_at_k_se", "pass_at_k", "mean_length", "benchmark", "seed"} <= set(s)
    assert s["batched_with"] == []
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert {"problem_id", "sample", "response", "extracted", "correct", "turns", "length"} <= set(rows[0])


def test_run_eval_many_with_a_model_is_deterministic(micro_config, micro_base, pool):
    """A real (micro) model: batched twice -> the same samples; apart -> each benchmark as if alone."""
    from ctpo import data as datasets
    from ctpo.config import load_config
    from ctpo.eval import sampling_from_config
    from ctpo.generation import HFGenerator
    from ctpo.reward import Grader
    from ctpo.tir.protocol import TIRConfig

    config = load_config(micro_config)
    gen = HFGenerator.from_pretrained(micro_base)
    tir, params = TIRConfig.from_dict(config["tir"]), sampling_from_config(config["eval"])
    benchmarks = {b: datasets.load_entry(config, b)[:3] for b in ("arith-easy", "arith-hard")}
    with Grader(workers=0) as grader:

        def many(batched):
            return run_eval_many(
                gen, gen.tokenizer, benchmarks, 2, tir, pool, grader, params=params, batched=batched
            )

        first, second, apart = many(True), many(True), many(False)
        alone = run_eval(gen, gen.tokenizer, benchmarks["arith-hard"], 2, tir, pool, grader, params=params)
    for b in benchmarks:
        assert first[b][1] == second[b][1]
    assert apart["arith-hard"][1] == alone[1]


def test_eval_cli_several_benchmarks_in_one_call(micro_config, micro_base, tmp_path):
    from ctpo import data as datasets
    from ctpo.config import load_config

    names = ["arith-easy", "arith-medium", "arith-hard"]
    out = tmp_path / "many"
    r = _ctpo(
        "eval",
        "--config",
        str(micro_config),
        "--model-path",
        str(micro_base),
        "--benchmark",
        "arith-easy,arith-medium",
        "--benchmark",
        "arith-hard",
        "--batch-benchmarks",
        "together",
        "--out",
        str(out),
        "--k",
        "2",
        "--n",
        "3",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 benchmarks in one batched run" in r.stdout
    assert not (out / "summary.json").exists()  # several benchmarks: one folder each
    config = load_config(micro_config)
    for name in names:
        s = json.loads((out / name / "summary.json").read_text())
        assert s["benchmark"] == name and s["k"] == 2 and s["n_problems"] == 3
        assert s["batched_with"] == [b for b in names if b != name]
        rows = [json.loads(line) for line in (out / name / "samples.jsonl").read_text().splitlines()]
        ids = [r["id"] for r in datasets.load_entry(config, name)[:3]]
        assert [r["problem_id"] for r in rows] == [i for i in ids for _ in range(2)]
        assert s["avg_at_k"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))

    # the hf backend's default: one batch per benchmark, in one process
    out = tmp_path / "apart"
    r = _ctpo(
        "eval",
        "--config",
        str(micro_config),
        "--model-path",
        str(micro_base),
        "--benchmark",
        "arith-easy,arith-hard",
        "--out",
        str(out),
        "--k",
        "1",
        "--n",
        "2",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 benchmarks, one batch each, one process" in r.stdout
    for name in ("arith-easy", "arith-hard"):
        s = json.loads((out / name / "summary.json").read_text())
        assert s["n_problems"] == 2 and s["batched_with"] == []


def test_sft_is_deterministic_and_masks_tool_output(pool, tmp_path):
    import torch

    from ctpo.train.sft import run_sft

    config = {
        "study": "t",
        "results_dir": str(tmp_path),
        "mlflow": {"enabled": False},
        "tir": {"system_prompt": ""},
        "data": {"train": {"source": "arith", "split": "train", "n": 16, "seed": 0}},
        "models": {
            "x": {"preset": "xs", "sft": {"n_demos": 16, "steps": 3, "batch_size": 4, "copy_steps": 2}}
        },
    }
    a = run_sft(config, "x", tmp_path / "a", threads=1, progress=False, pool=pool)
    b = run_sft(config, "x", tmp_path / "b", threads=1, progress=False, pool=pool)
    assert a["final_loss"] == b["final_loss"] and a["policy_tokens"] == b["policy_tokens"]
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    # the loss covers policy tokens only: fewer than all response tokens when observations are present
    assert 0 < a["policy_tokens"] < a["tokens"]


def test_eval_labels_from_run_and_base(tmp_path):
    from ctpo.commands.eval import labels_for

    base = tmp_path / "base"
    base.mkdir()
    (base / "sft_summary.json").write_text(json.dumps({"model": "tiny-s", "sft": {"seed": 3}}))
    assert labels_for(base) == {"model": "tiny-s", "method": "base", "seed": 3, "train_run_id": None}
    run = tmp_path / "run"
    run.mkdir()
    (run / "DONE.json").write_text(
        json.dumps({"model": "tiny-m", "method": "ctpo", "seed": 1, "mlflow_run_id": "abc"})
    )
    expected = {"model": "tiny-m", "method": "ctpo", "seed": 1, "train_run_id": "abc"}
    assert labels_for(run / "final", run) == expected
    assert labels_for(run / "final", run, method="x", seed=7) == {**expected, "method": "x", "seed": 7}
    assert labels_for(tmp_path / "elsewhere")["model"] == "elsewhere"  # no summary, no run: the folder name
    with pytest.raises(SystemExit, match="has not finished"):
        labels_for(base, tmp_path / "nope")
