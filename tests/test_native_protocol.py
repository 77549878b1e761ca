"""The native tool protocol (Qwen3 function calling, tool-role turns) in the local episode loop: prompts
and turns in the tiny tokenizer's Qwen3-format chat template, which tokens are the policy's, malformed
calls, the release's fenced-block fallback, and the SFT demonstrations. VERL's side: test_verl_native.py."""

from __future__ import annotations

import json

import pytest

from ctpo import data, tiny
from ctpo.tasks import arith
from ctpo.tir import native
from ctpo.tir.episode import SamplingParams, ScriptedGenerator, run_episodes
from ctpo.tir.protocol import TIRConfig
from ctpo.tir.protocols import get_protocol
from ctpo.tir.sandbox import ExecResult
from ctpo.train.sft import corpus, tokenize_demonstration

PROBLEM = "Let x = 12 * 34 + 5. What is the final value of x?"
CFG = TIRConfig(
    protocol="native", enable_thinking=False, system_prompt="", max_turns=4, max_response_tokens=2000
)


@pytest.fixture(scope="module")
def tok():
    texts = [PROBLEM, "Compute x first. The answer is print(12 * 34 + 5) code_interpreter arguments name"]
    return tiny.build_tokenizer(texts, chat_template=tiny.CHAT_TEMPLATE, added_tokens=native.TOKENS)


def turn(code: str, content: str) -> str:
    return native.tool_call_text(code, content) + native.END_OF_TURN


def assistant_call(content: str, code: str) -> dict:
    """An assistant message calling ``code_interpreter``, as chat templates take it."""
    call = {"type": "function", "function": {"name": "code_interpreter", "arguments": {"code": code}}}
    return {"role": "assistant", "content": content, "tool_calls": [call]}


def scripted(tok, turns):
    return ScriptedGenerator(
        tok, {PROBLEM: turns}, logprob_fn=lambda ctx, t: -0.25, observation_marker="<tool_response>"
    )


def test_the_native_tokenizer_is_qwen3_shaped_and_the_fenced_one_is_unchanged(tok):
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == tiny.CHAT_TEMPLATE
    for t in native.TOKENS:  # single tokens that decoding keeps (Qwen3 marks them not special)
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.decode(ids, skip_special_tokens=True) == t
    assert len(tok.encode("\n", add_special_tokens=False)) == 1  # VERL's Qwen builder needs this
    plain = tiny.build_tokenizer([PROBLEM])
    assert plain.chat_template is None and plain.eos_token == tiny.EOS_TOKEN
    assert len(plain) == len(tiny.build_tokenizer([PROBLEM], added_tokens=())) < len(tok)


def test_a_tool_call_is_rendered_as_the_template_renders_an_assistant_call(tok):
    messages = [
        {"role": "user", "content": PROBLEM},
        assistant_call("Compute x first.", "print(1)"),
    ]
    chat = tok.apply_chat_template(
        messages, tokenize=False, tools=[native.TOOL_SCHEMA], enable_thinking=False
    )
    assert chat.endswith("<think>\n\n</think>\n\n" + turn("print(1)", "Compute x first.") + "\n")
    assert (
        '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(1)"}}\n</tool_call>' in chat
    )
    assert json.dumps(native.TOOL_SCHEMA) in chat  # the tool list in the system turn


def test_parse_reads_tool_call_blocks_and_turns_malformed_ones_into_errors():
    good = native.tool_call_text("print(2)\nprint(3)")
    (call,) = native.parse_tool_calls("Let me run.\n" + good)
    assert call.name == "code_interpreter" and json.loads(call.arguments) == {"code": "print(2)\nprint(3)"}
    assert native.code_of(call) == ("print(2)\nprint(3)", None)
    (bad,) = native.parse_tool_calls(
        '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "x"\n</tool_call>'
    )
    assert bad.error is not None and "Malformed tool call" in bad.error
    (other,) = native.parse_tool_calls(
        '<tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call>'
    )
    assert native.code_of(other) == (None, "Unknown function 'python'. Available tools: ['code_interpreter']")
    (empty,) = native.parse_tool_calls('<tool_call>{"name": "code_interpreter", "arguments": {}}</tool_call>')
    assert native.code_of(empty)[1].startswith("Error: no code to run")
    assert native.parse_tool_calls("No call here. \\boxed{3}") == []


def test_the_release_fallback_reads_bare_json_and_fenced_blocks_only_when_asked():
    fenced = "I compute.\n```python\nprint(7)\n```\nThen more.\n```\nprint(8)\n```\n"
    assert native.parse_tool_calls(fenced) == []
    calls = native.parse_tool_calls(fenced, code_fallback=True)
    assert [json.loads(c.arguments)["code"] for c in calls] == ["print(7)", "print(8)"]
    bare = 'Call: {"name": "code_interpreter", "arguments": {"code": "print(9)"}} done'
    (call,) = native.parse_tool_calls(bare, code_fallback=True)
    assert json.loads(call.arguments) == {"code": "print(9)"}
    both = native.tool_call_text("print(1)") + "\n```python\nprint(2)\n```\n"
    assert [json.loads(c.arguments) for c in native.parse_tool_calls(both, True)] == [{"code": "print(1)"}]
    assert "```output" not in json.dumps(
        [c.arguments for c in native.parse_tool_calls("```output\n3\n```", True)]
    )


def test_observation_is_stdout_then_stderr_cut_in_the_middle():
    r = ExecResult(
        status="error",
        stdout="partial\n",
        stderr="Traceback...\nZeroDivisionError: x\n",
        exit_code=1,
        truncated=False,
        duration_s=0.1,
    )
    assert native.observation_text(r) == "partial\nTraceback...\nZeroDivisionError: x\n"
    silent = ExecResult(status="timeout", stdout="", stderr="", exit_code=None, truncated=False, duration_s=5)
    assert native.observation_text(silent) == "TimeoutError: execution exceeded the time limit"
    text = "".join(str(i % 10) for i in range(300))
    cut = native.truncate_middle(text, 256)
    assert cut == text[:128] + "...(truncated)..." + text[-128:]  # VERL's tool_response_truncate_side=middle
    assert native.truncate_middle(text[:256], 256) == text[:256]


def test_episode_masks_policy_turns_1_and_tool_turns_0(tok, pool):
    turns = [
        turn("print(12 * 34 + 5)", "Compute x first."),
        "The answer is \\boxed{413}." + native.END_OF_TURN,
    ]
    (ep,) = run_episodes(scripted(tok, turns), tok, [PROBLEM], CFG, pool, SamplingParams(temperature=1.0))
    assert ep.finish == "answer" and ep.num_tool_calls == 1 and ep.num_tool_errors == 0 and ep.num_turns == 2
    policy = [t for t, m in zip(ep.response_ids, ep.response_mask) if m]
    tool = [t for t, m in zip(ep.response_ids, ep.response_mask) if not m]
    assert tok.decode(policy) == "".join(
        turns
    )  # exactly the model's tokens, each turn ending with <|im_end|>
    tool_turn = (
        "\n<|im_start|>user\n<tool_response>\n413\n\n</tool_response><|im_end|>"
        "\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert tok.decode(tool) == tool_turn
    assert ep.response_mask == [1] * len(tok.encode(turns[0])) + [0] * len(tool) + [1] * len(
        tok.encode(turns[1])
    )
    assert ep.behaviour_logprobs == [-0.25 if m else 0.0 for m in ep.response_mask]
    # the whole token stream is the chat template's rendering of the whole conversation
    messages = [
        {"role": "user", "content": PROBLEM},
        assistant_call("Compute x first.", "print(12 * 34 + 5)"),
        {"role": "tool", "content": "413\n"},
        {"role": "assistant", "content": "The answer is \\boxed{413}."},
    ]
    chat = tok.apply_chat_template(
        messages, tokenize=False, tools=[native.TOOL_SCHEMA], enable_thinking=False
    )
    assert tok.decode(ep.prompt_ids + ep.response_ids) + "\n" == chat
    assert ep.final_text == "The answer is \\boxed{413}."


def test_a_malformed_call_is_an_error_observation_and_the_episode_goes_on(tok, pool):
    broken = (
        'Try.\n<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(1)"\n</tool_call>'
        + native.END_OF_TURN
    )
    unknown = (
        '<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}\n</tool_call>'
        + native.END_OF_TURN
    )
    turns = [broken, unknown, turn("print(12 * 34 + 5)", "Fixed."), "\\boxed{413}" + native.END_OF_TURN]
    (ep,) = run_episodes(scripted(tok, turns), tok, [PROBLEM], CFG, pool, SamplingParams())
    assert ep.finish == "answer" and ep.num_turns == 4
    assert (ep.num_tool_calls, ep.num_tool_errors) == (3, 2)
    tool_text = tok.decode([t for t, m in zip(ep.response_ids, ep.response_mask) if not m])
    assert tool_text.count("<tool_response>") == 3 and "Malformed tool call (JSONDecodeError" in tool_text
    assert (
        "Unknown function 'python'. Available tools: ['code_interpreter']" in tool_text and "413" in tool_text
    )


def test_budgets_end_native_episodes_like_fenced_ones(tok, pool):
    calls = [turn(f"print({i})", "Again.") for i in range(5)]
    (ep,) = run_episodes(scripted(tok, calls), tok, [PROBLEM], CFG, pool, SamplingParams())
    assert (
        ep.finish == "max_turns" and ep.num_turns == 4 and ep.num_tool_calls == 3
    )  # the last call is not run
    short = TIRConfig(**{**CFG.__dict__, "max_response_tokens": 30})
    (ep,) = run_episodes(scripted(tok, calls), tok, [PROBLEM], short, pool, SamplingParams())
    assert ep.finish == "max_tokens" and len(ep.response_ids) <= 30
    (ep,) = run_episodes(
        scripted(tok, ["No idea." + native.END_OF_TURN]), tok, [PROBLEM], CFG, pool, SamplingParams()
    )
    assert ep.finish == "no_code" and ep.num_void_turns == 1


def test_protocol_choice_and_errors():
    assert get_protocol(TIRConfig()).name == "fenced" and get_protocol(CFG).name == "native"
    assert TIRConfig().stop == ("\n```\n",) and CFG.stop == ()
    assert TIRConfig(protocol="native").system_prompt.startswith(
        "Solve the problem step by step. When a computation"
    )
    with pytest.raises(ValueError, match=r"tir\.protocol must be one of"):
        TIRConfig(protocol="json")
    with pytest.raises(ValueError, match="native protocol only"):
        TIRConfig(code_fallback=True)
    with pytest.raises(ValueError, match="chat template"):
        get_protocol(CFG).encode_prompt(PROBLEM, tiny.build_tokenizer([PROBLEM]))


def test_native_demonstrations_are_laid_out_like_native_episodes(pool):
    records = data.load("arith", split="train", n=12, seed=0)
    demos = arith.demonstrations(
        records, CFG, pool, mix={"tool": 0.5, "error": 0.5}, seed=0, render=tiny.render_chat
    )
    tok = tiny.build_tokenizer(corpus(demos), chat_template=tiny.CHAT_TEMPLATE, added_tokens=native.TOKENS)
    for demo in demos:
        ex = tokenize_demonstration(demo, tok, CFG)
        prompt = get_protocol(CFG).encode_prompt(demo["problem"], tok)
        assert ex.ids[: len(prompt)] == prompt and not any(ex.mask[: len(prompt)])
        policy = [s["text"] for s in demo["segments"] if s["policy"]]
        assert all(t.endswith(native.END_OF_TURN) for t in policy)  # every turn ends with the EOS
        assert ex.ids[-1] == tok.eos_token_id and ex.ids.count(tok.eos_token_id) == len(policy) + len(
            [s for s in demo["segments"] if not s["policy"]]
        ) + prompt.count(tok.eos_token_id)
        # a tool turn's tokens are what the episode loop appends for the same observation
        for seg, nxt in zip(demo["segments"], demo["segments"][1:]):
            if seg["policy"] and not nxt["policy"]:
                body = nxt["text"].split("<tool_response>\n", 1)[1].rsplit("\n</tool_response>", 1)[0]
                assert tok.encode(nxt["text"], add_special_tokens=False) == get_protocol(CFG).observation_ids(
                    tok, body, seg["text"], tok.encode(seg["text"], add_special_tokens=False)
                )
    assert {d["style"] for d in demos} == {"tool", "error"}
    errors = [s["text"] for d in demos if d["style"] == "error" for s in d["segments"] if not s["policy"]]
    assert any("Error" in t for t in errors)


def test_sft_train_and_eval_run_the_native_protocol_through_the_cli(tmp_path):
    """The real `ctpo sft`, `ctpo train --backend local` and `ctpo eval --backend hf` on a micro study with
    tir.protocol: native: the warm-up builds a Qwen3-format tokenizer, the RL steps and the evaluation run
    native episodes (chat-template prompts, tool turns)."""
    import subprocess
    import sys

    import yaml
    from test_train_local import MICRO_STUDY, RUNNER

    from ctpo.tiny import load_pretrained

    config = {
        **MICRO_STUDY,
        "results_dir": str(tmp_path / "results"),
        "tir": {"protocol": "native", "enable_thinking": False, "system_prompt": "", "max_turns": 3,
                "max_response_tokens": 160},
        "eval": {"backend": "hf", "k": 2, "max_new_tokens": 60},
    }  # fmt: skip
    cfg_path = tmp_path / "native.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)  # the real CLI with a parity grader, so the micro model's updates move

    def ctpo(*args):
        proc = subprocess.run([sys.executable, str(runner), *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]

    base, run, ev = tmp_path / "base", tmp_path / "run", tmp_path / "eval"
    ctpo(
        "sft",
        "--config",
        str(cfg_path),
        "--model",
        "micro",
        "--out",
        str(base),
        "--threads",
        "1",
        "--no-progress",
    )
    _, tok = load_pretrained(base)
    assert tok.chat_template == tiny.CHAT_TEMPLATE and tok.eos_token == "<|im_end|>"
    demo = json.loads((base / "sft_demos_sample.jsonl").read_text().splitlines()[0])
    assert "<tool_call>" in demo["text"] and "<tool_response>" in demo["text"]
    ctpo(
        "train", "--config", str(cfg_path), "--model", "micro", "--method", "ctpo", "--seed", "0",
        "--base", str(base), "--out", str(run), "--max-steps", "2", "--no-progress",
    )  # fmt: skip
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/step"] == 2 and "clip/frac" in rows[-1]
    ctpo(
        "eval", "--config", str(cfg_path), "--model-path", str(run / "final"), "--benchmark", "arith-easy",
        "--out", str(ev), "--k", "2",
    )  # fmt: skip
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["k"] == 2 and summary["n_problems"] == 4
    samples = [json.loads(line) for line in (ev / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(s["policy_tokens"] > 0 for s in samples)
