"""Dataset registry: every problem set of the study in one normalised schema, and VERL's parquet.

A normalised record (docs/interfaces.md) is
``{"id", "data_source", "problem", "answer", "split", "extra"}``; ``answer`` is the gold answer as text
(bare LaTeX allowed). ``load(name, ...)`` returns a list of them for any registered name:

| name | source | split | notes |
|---|---|---|---|
| ``arith`` | ``ctpo.tasks.arith`` (built in code) | train/easy/medium/hard/... | the embedded default |
| ``deepscaler`` | ``agentica-org/DeepScaleR-Preview-Dataset`` | train | rows without an answer dropped |
| ``aime25``, ``aime26`` | ``math-ai/aime25``, ``math-ai/aime26`` | test | problem / answer / id |
| ``hmmt_nov_2025``, ``brumo_2025`` | ``MathArena/...`` | train | problem_idx / problem / answer (LaTeX) |

Hub datasets are read as raw files (parquet / JSON / JSONL) with pandas, so the core path needs neither
network nor the ``datasets`` library: a local file or a pre-fetched folder (``path=``), a folder of
pre-fetched repositories (``$CTPO_DATA_DIR/<owner>/<name>``), or the Hugging Face cache, in that order.
``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` keep the cache look-up local; a miss fails with the exact
command that pre-fetches the dataset.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctpo.atomic import atomic_path
from ctpo.tasks import arith
from ctpo.tir import protocol
from ctpo.tir.protocols import get_protocol

log = logging.getLogger(__name__)

RECORD_KEYS = ("id", "data_source", "problem", "answer", "split", "extra")
DATA_DIR_ENV = "CTPO_DATA_DIR"


class DataError(ValueError):
    """A dataset cannot be found, read or normalised; the message says what to do."""


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """One registered problem set."""

    name: str
    """Registry key; also the records' ``data_source``."""
    hub_id: str | None
    """Hugging Face dataset repository, or None for sets built in code."""
    default_split: str
    """The split the paper uses."""
    normalise: Callable[[list[dict[str, Any]], DatasetSpec, str], list[dict[str, Any]]] | None = None
    """Raw rows (as the hub files hold them) -> normalised records."""
    files: tuple[str, ...] = ()
    """Glob patterns (``{split}`` substituted) locating the split's files inside a repository snapshot."""
    aliases: tuple[str, ...] = field(default=())
    description: str = ""


REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    REGISTRY[spec.name] = spec
    return spec


def resolve_name(name: str) -> DatasetSpec:
    """Registry entry for a name, an alias or a hub id (case-insensitive)."""
    key = name.strip().lower()
    for spec in REGISTRY.values():
        names = {spec.name.lower(), *(a.lower() for a in spec.aliases)}
        if spec.hub_id:
            names.add(spec.hub_id.lower())
        if key in names:
            return spec
    known = ", ".join(sorted(REGISTRY))
    raise DataError(f"unknown dataset {name!r}; registered datasets: {known}")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _record(
    spec: DatasetSpec, split: str, id_: str, problem: Any, answer: Any, **extra: Any
) -> dict[str, Any]:
    extra = {k: v for k, v in extra.items() if v is not None}
    if spec.hub_id:
        extra.setdefault("hub_id", spec.hub_id)
    return {
        "id": id_,
        "data_source": spec.name,
        "problem": _text(problem),
        "answer": _text(answer),
        "split": split,
        "extra": extra,
    }


def _normalise_deepscaler(rows: list[dict[str, Any]], spec: DatasetSpec, split: str) -> list[dict[str, Any]]:
    out, dropped = [], []
    for i, row in enumerate(rows):
        if not _text(row.get("answer")) or not _text(row.get("problem")):
            dropped.append(i)
            continue
        out.append(_record(spec, split, f"{spec.name}-{i:05d}", row["problem"], row["answer"], index=i))
    if dropped:
        shown = ", ".join(str(i) for i in dropped[:10]) + (" ..." if len(dropped) > 10 else "")
        log.warning(
            "%s: dropped %d of %d rows without a problem or an answer (rows %s)",
            spec.name,
            len(dropped),
            len(rows),
            shown,
        )
    return out


def _normalise_math_ai(rows: list[dict[str, Any]], spec: DatasetSpec, split: str) -> list[dict[str, Any]]:
    # math-ai/aime25 and aime26: test.jsonl with string columns problem, answer, id.
    return [
        _record(spec, split, f"{spec.name}-{_text(row.get('id', i))}", row["problem"], row["answer"], index=i)
        for i, row in enumerate(rows)
    ]


def _normalise_matharena(rows: list[dict[str, Any]], spec: DatasetSpec, split: str) -> list[dict[str, Any]]:
    # MathArena/*: data/train-*.parquet with problem_idx (int), problem, answer (bare LaTeX) and,
    # in most competitions, problem_type (list of strings).
    out = []
    for i, row in enumerate(rows):
        idx = row.get("problem_idx", i + 1)
        types = row.get("problem_type")
        out.append(
            _record(
                spec,
                split,
                f"{spec.name}-{_text(idx)}",
                row["problem"],
                row["answer"],
                problem_idx=int(idx),
                problem_type=list(types) if types is not None else None,
            )
        )
    return out


register(
    DatasetSpec(
        "arith",
        None,
        "train",
        aliases=("ctpo-arith",),
        description="synthetic tool-integrated arithmetic task (ctpo.tasks.arith), built in code",
    )
)
register(
    DatasetSpec(
        "deepscaler",
        "agentica-org/DeepScaleR-Preview-Dataset",
        "train",
        _normalise_deepscaler,
        files=("deepscaler.json", "**/{split}-*.parquet", "**/*.json"),
        aliases=("deepscaler-preview",),
        description="~40K competition problems; the paper's RL training set",
    )
)
register(
    DatasetSpec(
        "aime25",
        "math-ai/aime25",
        "test",
        _normalise_math_ai,
        files=("{split}.jsonl", "**/{split}-*.parquet", "**/{split}.jsonl"),
        aliases=("aime2025", "aime_2025"),
        description="AIME 2025 I+II, 30 problems",
    )
)
register(
    DatasetSpec(
        "aime26",
        "math-ai/aime26",
        "test",
        _normalise_math_ai,
        files=("{split}.jsonl", "**/{split}-*.parquet", "**/{split}.jsonl"),
        aliases=("aime2026", "aime_2026"),
        description="AIME 2026 I+II, 30 problems",
    )
)
register(
    DatasetSpec(
        "hmmt_nov_2025",
        "MathArena/hmmt_nov_2025",
        "train",
        _normalise_matharena,
        files=("data/{split}-*.parquet", "**/{split}-*.parquet"),
        aliases=("hmmt25", "hmmt-nov-2025", "hmmt_nov25"),
        description="HMMT November 2025",
    )
)
register(
    DatasetSpec(
        "brumo_2025",
        "MathArena/brumo_2025",
        "train",
        _normalise_matharena,
        files=("data/{split}-*.parquet", "**/{split}-*.parquet"),
        aliases=("brumo25", "brumo-2025"),
        description="BRUMO 2025, 30 problems",
    )
)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load(
    name: str,
    split: str | None = None,
    n: int | None = None,
    seed: int = 0,
    path: str | Path | None = None,
    **kw: Any,
) -> list[dict[str, Any]]:
    """Normalised records of dataset ``name`` (registry name, alias or hub id).

    ``n`` keeps a seeded random subset of that size (all rows when None); ``path`` points at a local
    parquet / JSON / JSONL file or a pre-fetched folder instead of the hub; further keywords go to the
    synthetic task's builder.
    """
    spec = resolve_name(name)
    split = split or spec.default_split
    if spec.name == "arith":
        return _load_arith(split, n=n, seed=seed, **kw)
    if kw:
        raise DataError(
            f"dataset {spec.name!r} takes no options {sorted(kw)}; "
            "only split, n, seed and path apply to hub datasets"
        )
    rows = read_rows(_locate(spec, split, path), spec, split)
    assert spec.normalise is not None
    records = spec.normalise(rows, spec, split)
    if n is not None and n < len(records):
        records = random.Random(seed).sample(records, n)
    log.info("%s/%s: %d records", spec.name, split, len(records))
    return records


def _load_arith(split: str, n: int | None, seed: int, **kw: Any) -> list[dict[str, Any]]:
    args = dict(kw)
    if n is not None:
        args["n"] = n
    rows = arith.load_split(split, seed=seed, **args)
    spec = REGISTRY["arith"]
    out = []
    for i, row in enumerate(rows):
        row = dict(row) if isinstance(row, dict) else dict(vars(row))
        if all(k in row for k in RECORD_KEYS):
            out.append({k: row[k] for k in RECORD_KEYS})
            continue
        extra = dict(row.get("extra") or {})
        extra.update({k: v for k, v in row.items() if k not in {*RECORD_KEYS, "extra"}})
        out.append(
            {
                "id": str(row.get("id", f"arith-{split}-{i:05d}")),
                "data_source": spec.name,
                "problem": str(row["problem"]),
                "answer": str(row["answer"]),
                "split": split,
                "extra": extra,
            }
        )
    return out


def hf_offline() -> bool:
    """True when the user asked Hugging Face libraries not to touch the network."""
    return any(
        os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def prefetch_command(spec: DatasetSpec, local_dir: str | None = None) -> str:
    cmd = f"hf download {spec.hub_id} --repo-type dataset"
    return f"{cmd} --local-dir {local_dir}" if local_dir else cmd


def _locate(spec: DatasetSpec, split: str, path: str | Path | None) -> list[Path]:
    """The files that hold ``split`` of ``spec``: from ``path``, ``$CTPO_DATA_DIR`` or the HF cache."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(
                f"{spec.name}: local path {str(p)!r} does not exist; point `path:` at a parquet/JSON/JSONL "
                f"file or at a folder made by `{prefetch_command(spec, str(p))}`"
            )
        return [p] if p.is_file() else _files_in(p, spec, split)
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir and spec.hub_id and (Path(data_dir) / spec.hub_id).is_dir():
        return _files_in(Path(data_dir) / spec.hub_id, spec, split)
    return _files_in(_hub_snapshot(spec), spec, split)


def _hub_snapshot(spec: DatasetSpec) -> Path:
    offline = hf_offline()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=spec.hub_id, repo_type="dataset", local_files_only=offline))
    except Exception as exc:  # no network, not cached, no huggingface_hub: one actionable message
        where = "the Hugging Face cache (offline mode is on)" if offline else "the Hugging Face Hub"
        raise DataError(
            f"{spec.name}: could not read {spec.hub_id!r} from {where}: {type(exc).__name__}: {exc}\n"
            f"Pre-fetch it on a machine with network access:\n"
            f"    {prefetch_command(spec)}            # fills ~/.cache/huggingface; copy it over\n"
            f"or  {prefetch_command(spec, f'$CTPO_DATA_DIR/{spec.hub_id}')}\n"
            f"and set {DATA_DIR_ENV}, or give the data entry a `path:` to a local parquet/JSON/JSONL file."
        ) from exc


def _files_in(folder: Path, spec: DatasetSpec, split: str) -> list[Path]:
    if (folder / "state.json").is_file() or (folder / split / "state.json").is_file():
        base = folder / split if (folder / split / "state.json").is_file() else folder
        files = sorted(base.glob("*.arrow"))  # a `datasets.save_to_disk` folder
        if files:
            return files
    patterns = [p.format(split=split) for p in spec.files] + [
        f"**/{split}-*.parquet",
        f"**/{split}.parquet",
        f"**/{split}.jsonl",
        f"**/{split}.json",
    ]
    for pattern in patterns:
        files = sorted(f for f in folder.glob(pattern) if f.is_file())
        if files:
            return files
    raise DataError(
        f"{spec.name}: no files for split {split!r} in {str(folder)!r} (looked for {patterns}); "
        f"re-fetch with `{prefetch_command(spec, str(folder))}` or pass a file as `path:`"
    )


def read_rows(
    files: Iterable[Path], spec: DatasetSpec | None = None, split: str | None = None
) -> list[dict[str, Any]]:
    """Rows of parquet / JSON (a list of objects) / JSONL / Arrow files, as plain Python dicts."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".parquet":
            frame = pd.read_parquet(f)
        elif suffix == ".arrow":
            import pyarrow as pa

            with pa.memory_map(str(f)) as source:
                frame = pa.ipc.open_stream(source).read_all().to_pandas()
        elif suffix == ".jsonl":
            with f.open() as fh:
                rows.extend(json.loads(line) for line in fh if line.strip())
            continue
        elif suffix == ".json":
            with f.open() as fh:
                data = json.load(fh)
            if isinstance(data, dict) and split and isinstance(data.get(split), list):
                data = data[split]
            if not isinstance(data, list):
                raise DataError(f"{f}: expected a JSON list of objects, got {type(data).__name__}")
            rows.extend(data)
            continue
        else:
            raise DataError(f"{f}: unsupported file type {suffix!r}; use parquet, JSON, JSONL or Arrow")
        rows.extend(_plain(r) for r in frame.to_dict(orient="records"))
    missing = [k for k in ("problem", "answer") if rows and k not in rows[0]]
    if missing:
        name = spec.name if spec else "dataset"
        raise DataError(f"{name}: rows have no column(s) {missing}; columns are {sorted(rows[0])}")
    return rows


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars / arrays from pandas -> Python values (so records serialise as JSON)."""
    out = {}
    for k, v in row.items():
        if hasattr(v, "tolist"):
            v = v.tolist()
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------------
# Files: normalised JSONL and VERL parquet
# --------------------------------------------------------------------------------------------------


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write records atomically (temp name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def to_verl_rows(
    records: list[dict[str, Any]],
    system_prompt: str,
    agent_name: str | None = "ctpo_tir_agent",
    ability: str = "math",
) -> list[dict[str, Any]]:
    """Records -> rows of VERL's RL dataset schema (``verl.utils.dataset.rl_dataset.RLHFDataset``).

    ``prompt`` is the chat (system = the TIR system prompt, omitted when empty; user = the problem);
    ``reward_model.ground_truth`` is what VERL hands to ``compute_score``; ``agent_name`` picks VERL's
    multi-turn tool agent loop per row.
    """
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []  # "" = no system turn
    rows = []
    for i, r in enumerate(records):
        row = {
            "data_source": r["data_source"],
            "prompt": [*system, {"role": "user", "content": r["problem"]}],
            "ability": ability,
            "reward_model": {"style": "rule", "ground_truth": r["answer"]},
            "extra_info": {
                "id": r["id"],
                "split": r["split"],
                "index": i,
                "problem": r["problem"],
                "extra": json.dumps(r.get("extra") or {}, ensure_ascii=False),
            },
        }
        if agent_name:
            row["agent_name"] = agent_name
        rows.append(row)
    return rows


def to_verl_parquet(
    records: list[dict[str, Any]],
    path: str | Path,
    system_prompt: str,
    agent_name: str | None = "ctpo_tir_agent",
) -> Path:
    """Write records as a VERL training / validation parquet file (atomically)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not records:
        raise DataError(f"refusing to write an empty VERL parquet file to {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(to_verl_rows(records, system_prompt, agent_name)), tmp)
    return path


def _tir_config(config: dict[str, Any] | None) -> protocol.TIRConfig:
    tir = dict((config or {}).get("tir") or {})
    return protocol.TIRConfig(
        **{k: v for k, v in tir.items() if k in protocol.TIRConfig.__dataclass_fields__}
    )


def tir_system_prompt(config: dict[str, Any] | None = None) -> str:
    """The TIR system prompt for a study config's ``tir`` section (``tir.system_prompt``, or the tool
    protocol's default)."""
    return _tir_config(config).system_prompt


def tir_agent_name(config: dict[str, Any] | None = None) -> str:
    """VERL's agent loop for a study config's tool protocol (the parquet's ``agent_name``)."""
    return get_protocol(_tir_config(config)).verl.agent


# --------------------------------------------------------------------------------------------------
# Study configs: which dataset a name in `data:` means
# --------------------------------------------------------------------------------------------------


def dataset_entry(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The data entry ``name`` of a study config: ``train``, a benchmark name, or a registry name.

    Returns a dict with ``source`` (registry name) and the loader's keywords (split, n, seed, path, ...).
    """
    data = config.get("data") or {}
    if name == "train" and data.get("train"):
        entry = dict(data["train"])
    elif name in (data.get("benchmarks") or {}):
        entry = dict(data["benchmarks"][name] or {})
    else:
        try:
            resolve_name(name)
        except DataError:
            known = ["train", *sorted(data.get("benchmarks") or {})]
            raise DataError(
                f"dataset {name!r} is neither a data entry of the config ({', '.join(known)}) "
                f"nor a registered dataset ({', '.join(sorted(REGISTRY))})"
            ) from None
        entry = {"source": name}
    entry.setdefault("source", name)
    return entry


def load_entry(config: dict[str, Any], name: str) -> list[dict[str, Any]]:
    entry = dataset_entry(config, name)
    source = entry.pop("source")
    return load(source, **entry)
