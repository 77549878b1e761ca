"""The VERL tool path: fenced-code parser, sandbox tool, in-turn observations, reward routing.

Needs the `verl` extra (and, for VERL's agent-loop module, its server deps cachetools/uvicorn/fastapi);
skipped otherwise.
"""

from __future__ import annotations

import asyncio
import json
import types
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
try:
    import verl.experimental.agent_loop.tool_agent_loop  # noqa: F401
except ImportError as exc:  # verl's agent loop imports its rollout server stack
    pytest.skip(f"verl's agent loop cannot be imported here ({exc})", allow_module_level=True)
pytestmark = pytest.mark.verl

from verl.experimental.agent_loop.tool_agent_loop import AgentData, AgentState, ToolAgentLoop  # noqa: E402
from verl.experimental.agent_loop.tool_parser import ToolParser  # noqa: E402
from verl.tools.tool_registry import initialize_tools_from_config  # noqa: E402

from ctpo.backends.verl import agent_loop, tool  # noqa: E402
from ctpo.backends.verl.reward import compute_score  # noqa: E402
from ctpo.tir.protocol import OBS_CLOSE, OBS_OPEN, TIRConfig  # noqa: E402
from ctpo.tir.sandbox import ExecResult  # noqa: E402
from ctpo.train.verl import TOOL_CONFIG  # noqa: E402


class CharTokenizer:
    """One token per character: enough to check token bookkeeping."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


class FakePool:
    def __init__(self):
        self.codes = []

    def run(self, code, timeout_s=None):
        self.codes.append(code)
        return ExecResult(
            status="ok", stdout="42\n", stderr="", exit_code=0, truncated=False, duration_s=0.01
        )


def test_parser_turns_the_first_python_block_into_one_call():
    turn = "Let me compute.\n```python\nprint(6*7)\n```\n"
    content, calls = agent_loop.parse_turn(turn)
    assert [c.name for c in calls] == ["python"]
    assert json.loads(calls[0].arguments) == {"code": "print(6*7)\n"}
    assert content == turn
    assert agent_loop.parse_turn("So the answer is \\boxed{42}.")[1] == []
    parser = ToolParser.get_tool_parser("ctpo_code", CharTokenizer())
    _, calls = asyncio.run(parser.extract_tool_calls(CharTokenizer().encode(turn)))
    assert len(calls) == 1


def test_tool_yaml_builds_the_sandbox_tool_and_returns_the_protocol_observation(monkeypatch):
    (t,) = initialize_tools_from_config(str(TOOL_CONFIG))
    assert isinstance(t, tool.SandboxPythonTool) and t.name == "python"
    pool = FakePool()
    monkeypatch.setattr(tool, "shared_pool", lambda workers, weaker: pool)
    response, reward, metrics = asyncio.run(t.execute("id", {"code": "print(6*7)"}))
    assert response.text == OBS_OPEN + "42" + OBS_CLOSE
    assert pool.codes == ["print(6*7)"] and reward == 0.0 and metrics["tool_error"] == 0.0


def test_tool_settings_come_from_the_workers_env(monkeypatch):
    monkeypatch.setenv("CTPO_SANDBOX_WORKERS", "7")
    monkeypatch.setenv("CTPO_OBS_MAX_CHARS", "64")
    (t,) = initialize_tools_from_config(str(TOOL_CONFIG))
    assert t.workers == 7 and t.tir.obs_max_chars == 64


def _loop(response_length=100):
    loop = object.__new__(agent_loop.TIRAgentLoop)  # no LLM server: only the state handlers are exercised
    loop.tokenizer = CharTokenizer()
    loop.response_length = response_length
    loop.tir = TIRConfig()
    return loop


def _agent_data(prompt, response):
    data = AgentData(
        messages=[],
        image_data=None,
        video_data=None,
        audio_data=None,
        mm_processor_kwargs=None,
        metrics={},
        request_id="r",
        tools_kwargs={},
    )
    data.prompt_ids = CharTokenizer().encode(prompt + response)
    data.response_mask = [1] * len(response)
    data.response_logprobs = [-0.5] * len(response)
    return data


def test_observation_is_appended_in_turn_with_mask_zero():
    loop = _loop()
    data = _agent_data("P:", "```python\nprint(1)\n```\n")
    data.tool_calls = agent_loop.parse_turn("```python\nprint(1)\n```\n")[1]
    obs = OBS_OPEN + "1" + OBS_CLOSE

    async def call_tool(call, tools_kwargs, agent_data):
        return types.SimpleNamespace(text=obs), 0.0, {}

    loop._call_tool = call_tool
    state = asyncio.run(loop._handle_processing_tools_state(data))
    assert state == AgentState.GENERATING
    assert CharTokenizer().decode(data.prompt_ids).endswith("```\n" + obs)
    n = len(obs)
    assert data.response_mask[-n:] == [0] * n and data.response_mask[:-n] == [1] * (
        len(data.response_mask) - n
    )
    assert data.response_logprobs[-n:] == [0.0] * n and len(data.response_logprobs) == len(data.response_mask)
    assert data.user_turns == 1


def test_observation_past_the_token_budget_ends_the_episode():
    loop = _loop(response_length=30)
    data = _agent_data("P:", "```python\nprint(1)\n```\n")
    data.tool_calls = agent_loop.parse_turn("```python\nprint(1)\n```\n")[1]

    async def call_tool(call, tools_kwargs, agent_data):
        return types.SimpleNamespace(text=OBS_OPEN + "x" * 50 + OBS_CLOSE), 0.0, {}

    loop._call_tool = call_tool
    assert asyncio.run(loop._handle_processing_tools_state(data)) == AgentState.TERMINATED


def test_generation_stops_at_the_end_of_a_code_block(monkeypatch):
    seen = {}

    async def fake_super(self, agent_data, sampling_params, ignore_termination=False):
        seen.update(sampling_params)
        return AgentState.TERMINATED

    monkeypatch.setattr(ToolAgentLoop, "_handle_generating_state", fake_super)
    loop = _loop()
    asyncio.run(loop._handle_generating_state(None, {"temperature": 1.0, "stop": ["<x>"]}))
    assert set(seen["stop"]) == {"<x>", *TIRConfig().stop}
    assert seen["include_stop_str_in_output"] is True and seen["temperature"] == 1.0


def test_reward_routes_every_data_source_to_the_grader():
    for source in ("deepscaler", "aime25", "some_unknown_source"):
        assert compute_score(data_source=source, solution_str="so \\boxed{42}", ground_truth="42") == 1.0
        assert compute_score(data_source=source, solution_str="so \\boxed{41}", ground_truth="42") == 0.0
    assert compute_score("hmmt_nov_2025", "\\boxed{\\frac{1}{2}}", "\\frac12", {}) == 1.0


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_full_agent_loop_run_with_the_sandbox(monkeypatch, tmp_path):
    """VERL's own ToolAgentLoop.run() state machine with our subclass, parser and tool: a code turn stops at
    the end of the block, the sandbox's observation is appended in the same turn with mask 0 and log-prob
    0, the model continues and answers."""
    import verl.trainer
    import yaml
    from hydra import compose, initialize_config_dir
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.workers.rollout.replica import TokenOutput

    from ctpo import tiny
    from ctpo.tir.sandbox import SandboxPool
    from ctpo.train import verl as tv

    root = Path(__file__).resolve().parent.parent
    study = yaml.safe_load((root / "experiments" / "paper.yaml").read_text())
    study["tir"] = {"protocol": "fenced", "max_turns": 5, "max_response_tokens": 600}  # the tiny study's
    overrides = tv.build_overrides(study, "qwen3-4b", "ctpo", 0, tmp_path / "run")
    with initialize_config_dir(
        config_dir=str(Path(verl.trainer.__file__).parent / "config"), version_base=None
    ):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)

    tok = tiny.build_tokenizer(
        ["<|im_start|> system user assistant Compute it. print(6 * 7) the answer is 42"]
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    turns = ["Compute it.\n```python\nprint(6 * 7)\n```\n", "So the answer is \\boxed{42}.<|im_end|>"]
    seen_params = []

    class FakeServer:
        async def generate(self, request_id, prompt_ids, sampling_params, **kwargs):
            seen_params.append(dict(sampling_params))
            text = turns[len(seen_params) - 1]
            ids = tok.encode(text, add_special_tokens=False)
            return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids))

    with SandboxPool(workers=1, allow_weaker_isolation=True) as pool:
        monkeypatch.setattr(tool, "shared_pool", lambda workers, weaker: pool)
        tools = initialize_tools_from_config(str(TOOL_CONFIG))
        loop = agent_loop.TIRAgentLoop(
            trainer_config=DictConfigWrap(cfg),
            server_manager=FakeServer(),
            tokenizer=tok,
            processor=None,
            dataset_cls=None,
            data_config=DictConfigWrap(cfg.data),
            tools=ToolListWrap(tools),
        )
        messages = [{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": "What is 6*7?"}]
        # the agent loop binds the event loop it was built in (VERL runs it inside its worker's loop)
        out = loop.loop.run_until_complete(
            loop.run(
                {"temperature": 1.0, "logprobs": True}, raw_prompt=messages, extra_info={}, tools_kwargs={}
            )
        )

    assert len(seen_params) == 2 and all(p["include_stop_str_in_output"] for p in seen_params)
    assert "\n```\n" in seen_params[0]["stop"]
    response = tok.decode(out.response_ids)
    obs = OBS_OPEN + "42" + OBS_CLOSE
    assert response == turns[0] + obs + turns[1]
    assert "SYSTEM" in tok.decode(out.prompt_ids) and "tool" not in tok.decode(out.prompt_ids)
    n1, n_obs = (
        len(tok.encode(turns[0], add_special_tokens=False)),
        len(tok.encode(obs, add_special_tokens=False)),
    )
    assert out.response_mask[:n1] == [1] * n1 and out.response_mask[n1 : n1 + n_obs] == [0] * n_obs
    assert out.response_mask[n1 + n_obs :] == [1] * (len(out.response_mask) - n1 - n_obs)
    assert out.response_logprobs[n1 : n1 + n_obs] == [0.0] * n_obs and out.response_logprobs[0] == -0.5
    assert compute_score("aime25", response, "42") == 1.0


def test_verl_dataset_reads_our_parquet(tmp_path, monkeypatch):
    """VERL's RLHFDataset, configured by our overrides, yields the chat prompt, agent loop, index and
    ground truth of a `ctpo data --parquet` file."""
    import verl.trainer
    from hydra import compose, initialize_config_dir
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from ctpo import data, tiny
    from ctpo.config import load_config
    from ctpo.train import verl as tv

    root = Path(__file__).resolve().parent.parent
    monkeypatch.setenv(data.DATA_DIR_ENV, str(root / "tests" / "fixtures" / "datasets"))
    study = load_config(root / "experiments" / "paper.yaml")
    parquet = data.to_verl_parquet(
        data.load("hmmt_nov_2025"), tmp_path / "h.parquet", data.tir_system_prompt(study)
    )
    with initialize_config_dir(
        config_dir=str(Path(verl.trainer.__file__).parent / "config"), version_base=None
    ):
        cfg = compose(
            config_name="ppo_trainer", overrides=tv.build_overrides(study, "qwen3-4b", "ctpo", 0, tmp_path)
        )
    tok = tiny.build_tokenizer(["hello world"])
    tok.chat_template = CHATML
    ds = RLHFDataset(data_files=[str(parquet)], tokenizer=tok, config=cfg.data)
    item = ds[1]
    assert len(ds) == 3 and item["agent_name"] == "ctpo_tir_agent" and item["index"] == 1
    assert [m["role"] for m in item["raw_prompt"]] == ["system", "user"]
    assert item["raw_prompt"][0]["content"] == study["tir"]["system_prompt"]
    assert item["reward_model"]["ground_truth"] == "\\frac{1}{2}" and item["data_source"] == "hmmt_nov_2025"
