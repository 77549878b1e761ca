"""ctpo.backends.vllm: sampling-parameter translation and output mapping without vLLM; a real engine
only under the `vllm` marker (GPU nodes)."""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field

import pytest

from ctpo.backends import vllm as backend
from ctpo.tir.episode import Continuation, SamplingParams


def test_sampling_params_translate_to_vllm_kwargs():
    params = SamplingParams(
        temperature=0.7, top_p=0.95, top_k=-1, max_new_tokens=512, stop=["\n```\n"], seed=3
    )
    kw = backend.vllm_sampling_kwargs(params, seed=11)
    assert kw == {
        "n": 1,
        "temperature": 0.7,
        "top_p": 0.95,
        "top_k": 0,
        "max_tokens": 512,
        "stop": ["\n```\n"],
        "include_stop_str_in_output": True,
        "logprobs": 0,
        "skip_special_tokens": False,
        "seed": 11,
    }
    assert backend.vllm_sampling_kwargs(SamplingParams(top_k=20))["top_k"] == 20


def test_generator_defaults_fill_what_the_call_leaves_unset():
    params = SamplingParams(max_new_tokens=None)
    kw = backend.vllm_sampling_kwargs(params, {"max_new_tokens": 8000, "repetition_penalty": 1.05})
    assert kw["max_tokens"] == 8000 and kw["repetition_penalty"] == 1.05
    assert "seed" not in kw
    with pytest.raises(ValueError, match="repeat prompts"):
        backend.vllm_sampling_kwargs(SamplingParams(n=4))


def test_request_seeds_differ_per_copy_and_repeat_across_calls():
    a = [backend.request_seed(0, [1, 2, 3], i) for i in range(32)]
    assert len(set(a)) == 32
    assert a == [backend.request_seed(0, [1, 2, 3], i) for i in range(32)]
    assert backend.request_seed(1, [1, 2, 3], 0) != a[0]


@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Completion:
    token_ids: list[int]
    finish_reason: str
    stop_reason: object = None
    logprobs: list | None = field(default=None)


def test_outputs_map_to_continuations_with_finish_reasons_and_logprobs():
    lp = [{5: _Logprob(-0.1)}, {6: _Logprob(-0.2), 9: _Logprob(-3.0)}]
    stop = backend.continuation_from_output(_Completion([5, 6], "stop", "\n```\n", lp), eos_ids=[2])
    assert stop == Continuation(token_ids=[5, 6], logprobs=[-0.1, -0.2], finish_reason="stop")
    assert backend.continuation_from_output(_Completion([5, 2], "stop"), [2]).finish_reason == "eos"
    assert backend.continuation_from_output(_Completion([5, 6], "length"), [2]).finish_reason == "length"
    assert backend.continuation_from_output(_Completion([5, 6], "length"), [2]).logprobs is None


class _FakeLLM:
    """Stands in for vllm.LLM: records requests, returns one scripted completion per request."""

    def __init__(self):
        self.calls = []

    def get_tokenizer(self):
        return types.SimpleNamespace(eos_token_id=2)

    def generate(self, requests, sampling, use_tqdm=False):
        self.calls.append((requests, sampling))
        return [
            types.SimpleNamespace(
                outputs=[_Completion([7, 2], "stop", None, [{7: _Logprob(-1.0)}, {2: _Logprob(-0.5)}])]
            )
            for _ in requests
        ]


def test_generate_batches_one_turn_and_seeds_each_copy(monkeypatch):
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    llm = _FakeLLM()
    gen = backend.VLLMGenerator("some/model", llm=llm, temperature=0.7, max_new_tokens=100)
    out = gen.generate([[1, 2], [1, 2], [3]], SamplingParams(temperature=0.7, max_new_tokens=None, seed=5))
    assert [c.finish_reason for c in out] == ["eos"] * 3 and out[0].logprobs == [-1.0, -0.5]
    ((requests, sampling),) = llm.calls
    assert [r["prompt_token_ids"] for r in requests] == [[1, 2], [1, 2], [3]]
    assert sampling[0]["seed"] != sampling[1]["seed"] and sampling[0]["max_tokens"] == 100
    assert gen.stats == {"calls": 1, "rows": 3, "new_tokens": 6}


def test_unknown_options_are_an_error_naming_them():
    with pytest.raises(TypeError, match="tensor_parallel"):
        backend.VLLMGenerator("m", llm=_FakeLLM(), tensor_parallel=2)


def test_cpu_engine_defaults_fill_only_what_is_unset(monkeypatch):
    monkeypatch.setattr(backend, "on_cpu_only", lambda: True)
    for key in backend.CPU_ENGINE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")  # an exported value wins
    args = backend.cpu_engine_setup({"dtype": "bfloat16", "enforce_eager": None, "seed": 3})
    assert args == {**backend.CPU_ENGINE_ARGS, "dtype": "bfloat16", "seed": 3}
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "4" and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert os.environ["TORCH_COMPILE_DISABLE"] == "1"
    monkeypatch.setattr(backend, "on_cpu_only", lambda: False)  # GPUs: nothing added
    assert backend.cpu_engine_setup({"dtype": None}) == {"dtype": None}


def test_max_tokens_are_capped_to_the_engine_context(monkeypatch):
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    llm = _FakeLLM()
    llm.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=10))
    gen = backend.VLLMGenerator("m", llm=llm)
    assert gen.max_model_len == 10
    gen.generate([[1] * 7, [1] * 2], SamplingParams(max_new_tokens=5, seed=0))
    assert [s["max_tokens"] for s in llm.calls[0][1]] == [3, 5]
    with pytest.raises(ValueError, match="max_model_len=10"):
        gen.generate([[1] * 10], SamplingParams(max_new_tokens=5))


@pytest.mark.vllm
@pytest.mark.gpu
def test_real_engine_generates_with_logprobs():
    pytest.importorskip("vllm", reason="vllm is not installed (GPU nodes: pip install -e '.[gpu]')")
    model = os.environ.get("CTPO_VLLM_TEST_MODEL")
    if not model:
        pytest.skip("set CTPO_VLLM_TEST_MODEL to a small HF model to run the real-engine check")
    gen = backend.VLLMGenerator(model, gpu_memory_utilization=0.3, max_model_len=1024)
    prompt = gen.tokenizer.encode("1 + 1 =")
    (c,) = gen.generate([prompt], SamplingParams(temperature=1.0, max_new_tokens=8, seed=0))
    assert 0 < len(c.token_ids) <= 8 and len(c.logprobs) == len(c.token_ids)


class _ScriptedLLM:
    """A vllm.LLM stand-in that answers every prompt with a code turn, then (after the observation) a boxed
    answer; text goes through a real tokenizer, so the TIR loop sees real token ids."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def get_tokenizer(self):
        return self.tok

    def generate(self, requests, sampling, use_tqdm=False):
        outs = []
        for req, sp in zip(requests, sampling):
            text = self.tok.decode(req["prompt_token_ids"])
            if "Compute it." in text:  # our first turn is in the prompt: this is the second turn
                reply, stop = "So the answer is \\boxed{42}.", None
            else:
                reply, stop = "Compute it.\n```python\nprint(6 * 7)\n```\n", "\n```\n"
            ids = self.tok.encode(reply, add_special_tokens=False)
            assert stop is None or stop in sp["stop"]
            lp = [{t: _Logprob(-0.25)} for t in ids]
            outs.append(types.SimpleNamespace(outputs=[_Completion(ids, "stop", stop, lp)]))
        return outs


def test_eval_runs_the_same_tir_loop_and_records_through_vllm(monkeypatch):
    """ctpo.eval.run_eval with VLLMGenerator: code turn -> sandbox -> observation -> answer, graded."""
    from ctpo import tiny
    from ctpo.eval import run_eval
    from ctpo.reward import Grader
    from ctpo.tir.protocol import TIRConfig
    from ctpo.tir.sandbox import SandboxPool

    fake_vllm = types.ModuleType("vllm")
    fake_vllm.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    tok = tiny.build_tokenizer(
        ["Compute it. print(6 * 7) So the answer is boxed 42 output What is six times seven"]
    )
    gen = backend.VLLMGenerator("fake", llm=_ScriptedLLM(tok))
    records = [
        {"id": "p0", "problem": "What is six times seven?", "answer": "42"},
        {"id": "p1", "problem": "What is 6*7, really?", "answer": "41"},
    ]
    with SandboxPool(workers=1, allow_weaker_isolation=True) as pool, Grader(workers=0) as grader:
        summary, samples = run_eval(
            gen,
            tok,
            records,
            2,
            TIRConfig(max_turns=3, max_response_tokens=400),
            pool,
            grader,
            params=SamplingParams(temperature=0.7, max_new_tokens=64, seed=1),
        )
    assert [s["correct"] for s in samples] == [True, True, False, False]
    assert all(s["tool_calls"] == 1 and s["tool_errors"] == 0 and s["turns"] == 2 for s in samples)
    assert "```output\n42\n```" in samples[0]["response"]
    assert summary["avg_at_k"] == 0.5
