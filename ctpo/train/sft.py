"""Supervised warm-up: the "Base" checkpoint of the tiny study.

    records (ctpo.data) ─► demonstrations (arith + protocol + sandbox) ─► tokenizer (BPE on that corpus)
        ─► token ids + policy mask, exactly as the RL episode loop lays them out ─► a tiny Qwen3 model
        trained on policy tokens only ─► HF folder + sft_summary.json

The loss covers exactly the tokens RL trains on: each policy turn tokenised on its own (as the model
emits it), the final turn followed by EOS; the prompt and every tool observation (tokenised on its own,
as `ctpo.tir.episode` appends it) have mask 0. Training is deterministic given the seed (data order,
init, dropout-free model), with a fixed number of steps rather than a time limit.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctpo import atomic, tiny, tracking
from ctpo import data as datasets
from ctpo.config import section
from ctpo.progress import Progress
from ctpo.tasks import arith
from ctpo.tir import native
from ctpo.tir.protocol import TIRConfig
from ctpo.tir.protocols import get_protocol
from ctpo.tir.sandbox import pool_from_config

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    """Warm-up settings (the ``sft:`` block of a model in the experiment config)."""

    n_demos: int = 2000
    """Train problems turned into demonstrations (the first ``n_demos`` of the config's train set)."""
    mix: dict[str, float] = field(default_factory=lambda: {"tool": 0.75, "error": 0.12, "direct": 0.13})
    """Demonstration styles: clean tool use, a tool error then recovery, answered by hand (no tool)."""
    steps: int = 400
    """Optimizer steps (fixed, so runs are reproducible)."""
    batch_size: int = 16
    """Demonstrations per step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW); linear warm-up then cosine decay to ``min_lr_ratio``."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    seed: int = 0
    """Seed of the model init, the demonstration styles and the data order."""
    vocab_size: int = 2048
    """BPE vocabulary size of the tokenizer trained on the demonstrations."""
    log_every: int = 20
    """Steps between logged metrics."""
    copy_steps: int = 200
    """Steps of the copy pre-phase (`copy_warmup`) before the demonstrations; 0 skips it."""
    copy_lr: float = 3e-3
    """Learning rate of the copy pre-phase."""
    precision: str = "fp32"
    """Matmul precision of the warm-up: ``"fp32"``, ``"bf16"`` (autocast; fp32 master weights, optimizer
    state and loss) or ``"auto"`` (bf16 where the CPU has native bf16, AVX512-BF16 / AMX, or on a bf16 GPU).
    fp32 by default: bf16 is faster but cost the tiny Bases most of their accuracy, as exact copying of
    number tokens suffers (docs/findings/2026-11-27-tiny-warmup.md); bf16 is for bigger models, where it
    is the norm. RL never uses it: its importance ratios need fp32."""

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"sft.precision must be auto, bf16 or fp32, got {self.precision!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SFTConfig:
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown sft option(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


@dataclass
class Example:
    """One tokenised demonstration: ids and the policy mask (1 = trained on)."""

    ids: list[int]
    mask: list[int]
    style: str


def tokenize_demonstration(demo: dict[str, Any], tokenizer, cfg) -> Example:
    """Token ids + policy mask of a demonstration, laid out exactly like an RL episode: the prompt by
    the tool protocol's ``encode_prompt``, each segment encoded on its own, EOS after the final policy
    turn (unless the turn already ends with it, as every turn of the native protocol does)."""
    ids = list(get_protocol(cfg).encode_prompt(demo["problem"], tokenizer))
    mask = [0] * len(ids)
    for i, seg in enumerate(demo["segments"]):
        seg_ids = list(tokenizer.encode(seg["text"], add_special_tokens=False))
        last = seg_ids[-1] if seg_ids else None
        if seg["policy"] and i == len(demo["segments"]) - 1 and last != tokenizer.eos_token_id:
            seg_ids.append(tokenizer.eos_token_id)
        ids += seg_ids
        mask += [1 if seg["policy"] else 0] * len(seg_ids)
    return Example(ids, mask, demo["style"])


def corpus(demos: list[dict[str, Any]]) -> list[str]:
    """The texts the tokenizer is trained on: every prompt and every segment."""
    texts = []
    for d in demos:
        texts.append(d["prompt"])
        texts.extend(s["text"] for s in d["segments"])
    return texts


def _batches(examples: list[Example], batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Indices of each step's batch: epochs of a seeded shuffle, grouped by similar length within a
    window of 32 batches (less padding), the batch order shuffled again."""
    rng = random.Random(f"ctpo.sft/{seed}")
    out: list[list[int]] = []
    while len(out) < steps:
        order = list(range(len(examples)))
        rng.shuffle(order)
        window = batch_size * 32
        epoch = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: len(examples[i].ids))
            epoch += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(epoch)
        out += epoch
    return out[:steps]


def _collate(
    examples: list[Example], idx: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(examples[i].ids) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(idx), width), dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    for r, i in enumerate(idx):
        e = examples[i]
        n = len(e.ids)
        ids[r, :n] = torch.tensor(e.ids)
        attn[r, :n] = 1
        lab = torch.tensor(e.ids)
        lab[torch.tensor(e.mask) == 0] = -100
        labels[r, :n] = lab
    return ids, attn, labels


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``"bf16"`` or ``"fp32"``: ``auto`` picks bf16 only where the hardware computes it natively (on a CPU
    without AVX512-BF16/AMX, bf16 autocast is emulated and slower than fp32)."""
    if precision != "auto":
        return precision
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if dev.type == "cpu":
        native = (
            getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
            or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        )
        return "bf16" if native else "fp32"
    return "fp32"


def _autocast(precision: str, device: torch.device | str = "cpu"):
    dev = torch.device(device)
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def policy_token_loss(
    model, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over policy tokens (label != -100) of the batch.

    The output layer and the softmax run on the positions that predict a policy token only: the decoder's
    hidden states are gathered there first. Prompts, tool output and padding are a large share of a
    demonstration's positions, and the vocabulary-sized projection and its log-softmax a large share of a
    warm-up step (docs/findings/2026-12-05-cpu-study.md). The loss is the one of the full logits
    (tests/test_sft.py compares value and gradient).

    Rows must be right-padded (`_collate`'s layout; ``attn`` says where): under causal attention a row's
    tokens never see the padding after them, so no mask is passed and the attention kernel applies its own
    causal mask instead of a materialised (batch, 1, width, width) one (1.03x tokens/s,
    docs/findings/2026-12-05-cpu-study.md)."""
    if not (bool(attn[:, 0].all()) and bool((attn[:, 1:] <= attn[:, :-1]).all())):
        raise ValueError(
            "policy_token_loss needs right-padded rows (every row's attention mask 1...1 0...0, "
            "as ctpo.train.sft._collate builds them)"
        )
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    n = int(keep.sum())
    logits = model.get_output_embeddings()(hidden[keep])
    if logits.dtype in (torch.float16, torch.bfloat16):  # bf16 autocast: the softmax in fp32
        logits = logits.float()
    loss = torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum") / max(n, 1)
    return loss, n


def copy_warmup(
    model, vocab: list[int], cfg: SFTConfig, progress: bool = True, label: str = "copy pre-phase"
) -> dict[str, Any]:
    """A short pre-phase that teaches the random-init model to copy: sequences ``prefix, span, SEP, span``
    of random tokens, loss on the second span only.

    Why: the task is mostly copying numbers (problem -> code, tool output -> next step), which needs
    induction heads. On the demonstrations alone a 1M-parameter model had not formed them after 500-800
    steps (10% teacher-forced accuracy on number tokens, 0% avg@k), because copy targets are a minority
    of the loss and the template is learned first. On this pure copy task the same model forms them in
    ~150-200 steps of ~30-token sequences (a few seconds), after which the warm-up learns to *use* them.
    """
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    pool = torch.tensor(vocab, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.copy_lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    b, span, prefix = 16, 12, 8
    precision = resolve_precision(cfg.precision)
    sep = pool[0]
    acc = float("nan")
    bar = Progress(label, cfg.copy_steps, enabled=progress)
    for step in range(cfg.copy_steps):
        seq = pool[torch.randint(1, len(pool), (b, span), generator=g)]
        pre = pool[torch.randint(1, len(pool), (b, prefix), generator=g)]
        x = torch.cat([pre, seq, sep.repeat(b, 1), seq], 1)
        labels = x.clone()
        labels[:, : prefix + span + 1] = -100
        for group in opt.param_groups:
            group["lr"] = cfg.copy_lr * min(1.0, (step + 1) / 30)
        with _autocast(precision):
            out = model(input_ids=x, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.update(tokens=x.numel(), loss=out.loss.item())
        if step + 1 == cfg.copy_steps:
            acc = (
                (out.logits[:, prefix + span : -1].argmax(-1) == x[:, prefix + span + 1 :])
                .float()
                .mean()
                .item()
            )
    bar.close()
    return {"copy_steps": cfg.copy_steps, "copy_accuracy": acc, "copy_s": time.perf_counter() - t0}


def train(
    model,
    examples: list[Example],
    cfg: SFTConfig,
    pad_id: int,
    progress: bool = True,
    log_fn=None,
    label: str = "warm-up",
) -> dict[str, Any]:
    """The warm-up loop; returns summary statistics. ``log_fn(metrics, step)`` receives metrics."""
    torch.manual_seed(cfg.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    batches = _batches(examples, cfg.batch_size, cfg.steps, cfg.seed)
    precision = resolve_precision(cfg.precision)
    t0 = time.perf_counter()
    tokens = policy_tokens = 0
    window: list[float] = []
    first_loss = last_loss = float("nan")
    bar = Progress(label, len(batches), enabled=progress)
    for step, idx in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, attn, labels = _collate(examples, idx, pad_id)
        with _autocast(precision):
            loss, n = policy_token_loss(model, ids, attn, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        tokens += int(attn.sum())
        policy_tokens += n
        window.append(loss.item())
        bar.update(tokens=int(attn.sum()))
        if step == 0:
            first_loss = loss.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == len(batches):
            last_loss = sum(window) / len(window)
            elapsed = time.perf_counter() - t0
            bar.set(loss=last_loss)
            if log_fn is not None:
                log_fn(
                    {
                        "sft/loss": last_loss,
                        "sft/lr": lr_at(step),
                        "sft/grad_norm": float(gnorm),
                        "time/sft_tokens_per_s": tokens / elapsed,
                    },
                    step + 1,
                )
            window = []
    bar.close()
    model.eval()
    wall = time.perf_counter() - t0
    return {
        "steps": len(batches),
        "precision": precision,
        "first_loss": first_loss,
        "final_loss": last_loss,
        "train_s": wall,
        "tokens": tokens,
        "policy_tokens": policy_tokens,
        "tokens_per_s": tokens / max(wall, 1e-9),
    }


def protocol_options(tir_cfg: TIRConfig) -> dict[str, dict[str, Any]]:
    """What the tool protocol asks of the demonstrations and the tokenizer: for ``native``, Qwen3's chat
    format (the demonstrations rendered with `tiny.render_chat`; the tokenizer given `tiny.CHAT_TEMPLATE`,
    Qwen3's tag tokens and ``<|im_end|>`` as EOS); nothing for ``fenced``."""
    if tir_cfg.protocol != "native":
        return {"demos": {}, "tokenizer": {}}
    return {
        "demos": {"render": tiny.render_chat},
        "tokenizer": {"chat_template": tiny.CHAT_TEMPLATE, "added_tokens": native.TOKENS},
    }


def build_examples(
    config: dict[str, Any], sft: SFTConfig, tir_cfg, pool
) -> tuple[list[dict], Any, list[Example]]:
    """Demonstrations, the tokenizer trained on them, and the tokenised examples."""
    train_spec = dict((config.get("data") or {}).get("train") or {})
    source = train_spec.pop("source", "arith")
    if datasets.resolve_name(source).name != "arith":
        raise ValueError(
            f"ctpo sft builds demonstrations for the arith task only; data.train.source is {source!r}"
        )
    n = min(sft.n_demos, int(train_spec.get("n", sft.n_demos)))
    records = datasets.load(
        source, split=train_spec.get("split", "train"), n=n, seed=int(train_spec.get("seed", 0))
    )
    demos = arith.demonstrations(
        records, tir_cfg, pool, mix=sft.mix, seed=sft.seed, **protocol_options(tir_cfg)["demos"]
    )
    tokenizer = tiny.build_tokenizer(
        corpus(demos), vocab_size=sft.vocab_size, **protocol_options(tir_cfg)["tokenizer"]
    )
    examples = [tokenize_demonstration(d, tokenizer, tir_cfg) for d in demos]
    return demos, tokenizer, examples


def _atomic_json(path: Path, obj: Any) -> None:
    atomic.write_json(path, obj, sort_keys=True)


def run_sft(
    config: dict[str, Any],
    model_name: str,
    out_dir: str | Path,
    threads: int | None = None,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    pool=None,
) -> dict[str, Any]:
    """The whole ``ctpo sft`` step; returns the summary also written to ``out_dir/sft_summary.json``."""
    if threads:
        torch.set_num_threads(int(threads))
    t_start = time.perf_counter()
    spec = section(config, "models", model_name)
    if "preset" not in spec:
        raise ValueError(
            f"models.{model_name} has no tiny `preset`; `ctpo sft` builds tiny models only "
            f"(presets: {', '.join(tiny.PRESETS)})"
        )
    sft = SFTConfig.from_dict({**(spec.get("sft") or {}), **(overrides or {})})
    tir_cfg = TIRConfig.from_dict(config.get("tir"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    if pool is None:
        with pool_from_config(config) as p:
            demos, tokenizer, examples = build_examples(config, sft, tir_cfg, p)
    else:
        demos, tokenizer, examples = build_examples(config, sft, tir_cfg, pool)
    demo_s = time.perf_counter() - t0

    model = tiny.build_model(
        spec["preset"],
        tokenizer,
        seed=sft.seed,
        **{k: v for k, v in spec.items() if k not in ("preset", "sft")},
    )
    n_params = tiny.count_parameters(model)
    styles: dict[str, int] = {}
    for e in examples:
        styles[e.style] = styles.get(e.style, 0) + 1
    policy_lens = [sum(e.mask) for e in examples if e.style != "direct"]
    log.info(
        "sft %s: %d demonstrations %s, %d params, %.0f policy tokens per tool demo",
        model_name,
        len(examples),
        styles,
        n_params,
        sum(policy_lens) / max(1, len(policy_lens)),
    )

    params = {
        "model": model_name,
        "preset": spec["preset"],
        "n_params": n_params,
        **{f"sft.{k}": v for k, v in asdict(sft).items()},
    }
    with tracking.start_run(
        config,
        f"sft__{model_name}",
        tags={"model": model_name, "method": "sft"},
        params=params,
        kind="sft",
        id_file=out / ".mlflow_run_id",
    ) as run:
        copy_stats = {}
        if sft.copy_steps > 0:
            vocab = sorted(
                {t for e in examples for t, m in zip(e.ids, e.mask) if m} - {tokenizer.eos_token_id}
            )
            copy_stats = copy_warmup(
                model, vocab, sft, progress=progress, label=f"copy pre-phase {model_name}"
            )
            if copy_stats["copy_accuracy"] < 0.9:
                log.warning(
                    "sft %s: the copy pre-phase ended at %.0f%% copy accuracy, "
                    "so the model has not learned to "
                    "copy and the warm-up will mostly fail to copy numbers; lower sft.copy_lr (wider models "
                    "need less: m copies at 1e-3, not 3e-3) or raise sft.copy_steps",
                    model_name,
                    100 * copy_stats["copy_accuracy"],
                )
            run.log_metrics({"sft/copy_accuracy": copy_stats["copy_accuracy"]}, step=0)
        stats = train(
            model,
            examples,
            sft,
            tokenizer.pad_token_id,
            progress=progress,
            log_fn=lambda m, s: run.log_metrics(m, step=s),
            label=f"warm-up {model_name}",
        )
        stats.update(copy_stats)
        tiny.save_pretrained(model, tokenizer, out)
        summary = {
            "model": model_name,
            "preset": spec["preset"],
            "n_params": n_params,
            "vocab_size": len(tokenizer),
            "n_demos": len(examples),
            "styles": styles,
            "demo_build_s": demo_s,
            "mean_tokens": sum(len(e.ids) for e in examples) / len(examples),
            "mean_policy_tokens_tool_demos": sum(policy_lens) / max(1, len(policy_lens)),
            "threads": torch.get_num_threads(),
            "sft": asdict(sft),
            **stats,
            "wall_s": time.perf_counter() - t_start,
            "mlflow_run_id": run.run_id if hasattr(run, "run_id") else None,
        }
        run.log_metrics(
            {"sft/final_loss": stats["final_loss"], "time/sft_s": stats["train_s"]}, step=stats["steps"]
        )
        with (out / "sft_demos_sample.jsonl").open("w") as f:  # a look at what the model was taught
            for d in demos[:20]:
                f.write(
                    json.dumps({**d, "text": d["prompt"] + "".join(s["text"] for s in d["segments"])}) + "\n"
                )
        _atomic_json(out / "sft_summary.json", summary)
        run.log_artifact(out / "sft_summary.json")
    print(
        f"sft {model_name}: {stats['steps']} steps, "
        f"loss {stats['first_loss']:.3f} -> {stats['final_loss']:.3f}, {summary['wall_s']:.1f}s "
        f"({stats['tokens_per_s']:.0f} tok/s, {torch.get_num_threads()} threads) -> {out}"
    )
    return summary
