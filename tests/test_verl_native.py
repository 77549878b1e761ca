"""The native tool protocol on VERL's side: VERL's own hermes parser reads the tool calls we render, our
``ctpo_hermes`` parser agrees with it, VERL's Continuous Token builder appends the tool turns we build,
and VERL's stock ``ToolAgentLoop`` run with our parser and ``code_interpreter`` tool gives exactly the
episode the local loop gives (ids, mask, log-probs). Needs the `verl` extra; skipped otherwise."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
try:
    import verl.experimental.agent_loop.tool_agent_loop  # noqa: F401
except ImportError as exc:  # verl's agent loop imports its rollout server stack
    pytest.skip(f"verl's agent loop cannot be imported here ({exc})", allow_module_level=True)
pytestmark = pytest.mark.verl

from verl.experimental.agent_loop.tool_parser import ToolParser  # noqa: E402
from verl.tools.tool_registry import initialize_tools_from_config  # noqa: E402
from verl.utils.tokenizer.continuous_token import QwenContinuousTokenBuilder  # noqa: E402

from ctpo import tiny  # noqa: E402
from ctpo.backends.verl import agent_loop, tool  # noqa: E402
from ctpo.tir import native  # noqa: E402
from ctpo.tir.episode import SamplingParams, ScriptedGenerator, run_episodes  # noqa: E402
from ctpo.tir.protocol import TIRConfig  # noqa: E402
from ctpo.tir.protocols import get_protocol  # noqa: E402
from ctpo.train import verl as tv  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROBLEM = "Let x = 12 * 34 + 5. What is the final value of x?"
CFG = TIRConfig(protocol="native", code_fallback=True, enable_thinking=False, max_response_tokens=3000)


@pytest.fixture(scope="module")
def tok():
    texts = [PROBLEM, "Compute x first. The answer is print(12 * 34 + 5) code_interpreter arguments name"]
    return tiny.build_tokenizer(texts, chat_template=tiny.CHAT_TEMPLATE, added_tokens=native.TOKENS)


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def extract(parser, tok, text):
    return asyncio.run(parser.extract_tool_calls(ids(tok, text)))


def test_verls_hermes_parser_reads_the_calls_we_render_and_ours_agrees(tok):
    text = (
        native.tool_call_text('print("a\\tb")\nx = {1: 2}\nprint(x)', "Two calls.")
        + "\n"
        + native.tool_call_text("print(3)")
        + native.END_OF_TURN
    )
    hermes = ToolParser.get_tool_parser("hermes", tok)
    ours = ToolParser.get_tool_parser("ctpo_hermes", tok)
    content_h, calls_h = extract(hermes, tok, text)
    content_o, calls_o = extract(ours, tok, text)
    assert [(c.name, json.loads(c.arguments)) for c in calls_h] == [
        ("code_interpreter", {"code": 'print("a\\tb")\nx = {1: 2}\nprint(x)'}),
        ("code_interpreter", {"code": "print(3)"}),
    ]
    assert [(c.name, c.arguments) for c in calls_o] == [(c.name, c.arguments) for c in calls_h]
    assert content_o == content_h
    plain = "So \\boxed{3}." + native.END_OF_TURN
    assert extract(ours, tok, plain)[1] == extract(hermes, tok, plain)[1] == []


def test_a_malformed_call_is_dropped_by_hermes_and_answered_through_our_parser_and_tool(tok, monkeypatch):
    broken = (
        '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(1)"\n</tool_call><|im_end|>'
    )
    assert extract(ToolParser.get_tool_parser("hermes", tok), tok, broken)[1] == []
    (call,) = extract(ToolParser.get_tool_parser("ctpo_hermes", tok), tok, broken)[1]
    assert call.name == "code_interpreter"
    (t,) = initialize_tools_from_config(str(tv.NATIVE_TOOL_CONFIG))
    monkeypatch.setattr(tool, "shared_pool", lambda workers, weaker: pytest.fail("nothing may run"))
    response, _, metrics = asyncio.run(t.execute("id", json.loads(call.arguments)))
    (local,) = native.parse_tool_calls(broken)
    assert response.text == local.error and metrics["tool_error"] == 1.0


def test_the_fallback_parser_reads_fenced_blocks_as_code_interpreter_calls(tok):
    text = "Compute.\n```python\nprint(12 * 34 + 5)\n```\n" + native.END_OF_TURN
    assert extract(ToolParser.get_tool_parser("ctpo_hermes", tok), tok, text)[1] == []
    (call,) = extract(ToolParser.get_tool_parser("ctpo_hermes_fallback", tok), tok, text)[1]
    assert (call.name, json.loads(call.arguments)) == ("code_interpreter", {"code": "print(12 * 34 + 5)"})


def test_the_native_tool_config_declares_the_protocols_schema():
    (t,) = initialize_tools_from_config(str(tv.NATIVE_TOOL_CONFIG))
    assert isinstance(t, tool.SandboxCodeInterpreterTool) and t.name == native.TOOL_NAME
    assert t.tool_schema.model_dump(exclude_unset=True, exclude_none=True) == native.TOOL_SCHEMA


def test_prompt_and_tool_turns_are_what_verls_qwen_builder_builds(tok):
    """VERL 0.9.1 picks QwenContinuousTokenBuilder for model_type qwen3: its initial prompt and its merge of
    a tool message after a turn that ended with <|im_end|> (mask-0 newline included) are our ids."""
    builder = QwenContinuousTokenBuilder(tok, chat_template_kwargs={"enable_thinking": False})
    messages = [{"role": "system", "content": CFG.system_prompt}, {"role": "user", "content": PROBLEM}]
    prompt = builder.build_initial_tokens(messages, tools=[native.TOOL_SCHEMA])
    assert prompt == get_protocol(CFG).encode_prompt(PROBLEM, tok)
    assistant = native.tool_call_text("print(1)", "Run.") + native.END_OF_TURN
    runtime = prompt + ids(tok, assistant)
    history = [*messages, {"role": "assistant", "content": "Run."}]
    for observation in ("1\n", "", "x" * 40 + "\n" + "Traceback (most recent call last):\n  ..."):
        merged = builder.merge_context_tokens(
            history, [*history, {"role": "tool", "content": observation}], runtime, tools=[native.TOOL_SCHEMA]
        )
        ours = get_protocol(CFG).observation_ids(tok, observation, assistant, ids(tok, assistant))
        assert merged.token_ids == runtime + ours and merged.inserted_token_ids == ids(tok, "\n")


def _verl_config(tmp_path, obs_max_chars=256):
    import verl.trainer
    import yaml
    from hydra import compose, initialize_config_dir

    study = yaml.safe_load((ROOT / "experiments" / "paper.yaml").read_text())  # the native protocol
    study["tir"]["max_response_tokens"] = CFG.max_response_tokens
    study["tir"]["obs_max_chars"] = obs_max_chars
    overrides = tv.build_overrides(study, "qwen3-4b", "ctpo", 0, tmp_path / "run")
    with initialize_config_dir(
        config_dir=str(Path(verl.trainer.__file__).parent / "config"), version_base=None
    ):
        return compose(config_name="ppo_trainer", overrides=overrides), study


def test_verls_tool_agent_loop_and_the_local_loop_build_the_same_episode(tok, tmp_path, monkeypatch, pool):
    """VERL's own ToolAgentLoop.run() (the paper's protocol: our ctpo_hermes_fallback parser and
    code_interpreter tool, Qwen builder) and ctpo.tir.episode.run_episodes, fed the same turns: the same
    prompt ids, response ids, mask and log-probs. The turns exercise a call, a long output cut in the middle,
    a malformed call, the fenced fallback and the answer."""
    from hydra.utils import instantiate
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.workers.rollout.replica import TokenOutput

    cfg, study = _verl_config(tmp_path)
    local_cfg = TIRConfig.from_dict({**study["tir"]})
    turns = [
        native.tool_call_text("print(12 * 34 + 5)", "Compute x first.") + native.END_OF_TURN,
        native.tool_call_text("print('ab' * 200)", "Now a long one.") + native.END_OF_TURN,
        'Oops.\n<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "1"\n</tool_call>'
        + native.END_OF_TURN,
        "Fenced.\n```python\nprint(413)\n```\n" + native.END_OF_TURN,
        "So x is \\boxed{413}." + native.END_OF_TURN,
    ]
    served = []

    class FakeServer:  # VERL's LLM server client: generate(request_id, prompt_ids, sampling_params, ...)
        async def generate(self, request_id, prompt_ids, sampling_params, **kwargs):
            text = turns[len(served)]
            served.append(list(prompt_ids))
            out = ids(tok, text)
            return TokenOutput(token_ids=out, log_probs=[-0.5] * len(out))

    monkeypatch.setattr(tool, "shared_pool", lambda workers, weaker: pool)
    tools = initialize_tools_from_config(str(tv.NATIVE_TOOL_CONFIG))
    loop = instantiate(
        {"_target_": "ctpo.backends.verl.agent_loop.ToolAgentLoop"},
        trainer_config=DictConfigWrap(cfg),
        server_manager=FakeServer(),
        tokenizer=tok,
        processor=None,
        dataset_cls=None,
        data_config=DictConfigWrap(cfg.data),
        hf_model_type="qwen3",
        tools=ToolListWrap(tools),
    )
    assert type(loop) is agent_loop.ToolAgentLoop  # VERL's own class, unchanged
    messages = [{"role": "system", "content": local_cfg.system_prompt}, {"role": "user", "content": PROBLEM}]
    out = loop.loop.run_until_complete(
        loop.run({"temperature": 1.0, "logprobs": True}, raw_prompt=messages, extra_info={}, tools_kwargs={})
    )

    gen = ScriptedGenerator(
        tok, {PROBLEM: turns}, logprob_fn=lambda ctx, t: -0.5, observation_marker="<tool_response>"
    )
    (ep,) = run_episodes(gen, tok, [PROBLEM], local_cfg, pool, SamplingParams(temperature=1.0))
    assert len(served) == 5 and ep.num_turns == 5 and ep.finish == "answer"
    assert out.prompt_ids == ep.prompt_ids
    assert out.response_ids == ep.response_ids
    assert out.response_mask == ep.response_mask
    assert out.response_logprobs == ep.behaviour_logprobs
    text = tok.decode(out.response_ids)
    assert "...(truncated)..." in text and "Malformed tool call" in text and "\n413\n" in text
    assert (ep.num_tool_calls, ep.num_tool_errors) == (4, 1)
