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

Hub datasets are loaded with ``datasets.load_dataset`` (`load_hub_dataset`): a local file or a pre-fetched
folder (``path=``), a folder of pre-fetched repositories (``$CTPO_DATA_DIR/<owner>/<name>``), or the hub id
(the ``datasets`` cache), in that order, all through the same call. ``HF_DATASETS_OFFLINE=1`` /
``HF_HUB_OFFLINE=1`` keep it local; a miss fails with the exact commands that pre-fetch the dataset. VERL's
parquet is written from a `datasets.Dataset`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
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
    rows = read_rows(load_hub_dataset(spec, split, path), spec)
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


def _prefetch_help(spec: DatasetSpec, split: str) -> str:
    load_call = f"datasets.load_dataset('{spec.hub_id}', split='{split}')"
    return (
        f"Pre-fetch it on a machine with network access, then copy it here:\n"
        f"    {prefetch_command(spec, f'$CTPO_DATA_DIR/{spec.hub_id}')}   # and set {DATA_DIR_ENV}\n"
        f'or  python -c "import datasets; {load_call}"   # fills ~/.cache/huggingface/datasets\n'
        f"    (copy that folder over; HF_DATASETS_OFFLINE=1 then reads it without the network)\n"
        f"or give the data entry a `path:` to a local parquet/JSON/JSONL file or a pre-fetched folder."
    )


def _source(spec: DatasetSpec, path: str | Path | None) -> str | Path:
    """Where ``load_dataset`` reads from: ``path``, ``$CTPO_DATA_DIR/<hub id>`` when present, else the
    hub id."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(
                f"{spec.name}: local path {str(p)!r} does not exist; point `path:` at a parquet/JSON/JSONL "
                f"file or at a folder made by `{prefetch_command(spec, str(p))}`"
            )
        return p
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir and spec.hub_id and (Path(data_dir) / spec.hub_id).is_dir():
        return Path(data_dir) / spec.hub_id
    assert spec.hub_id is not None
    return spec.hub_id


_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


def _import_datasets(purpose: str):
    """The ``datasets`` module, imported here only: it is heavy (pyarrow, fsspec), and the embedded study
    (``arith``, built in code) runs without it. It comes with the ``verl`` and ``gpu`` extras (VERL depends
    on it); a core-only install gets a clear error naming the fix."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"{purpose} needs the `datasets` package, which this environment lacks: "
            "pip install -c constraints-cpu.txt -e '.[verl]' (or pip install 'datasets>=4')"
        ) from e
    return datasets


def load_hub_dataset(spec: DatasetSpec, split: str, path: str | Path | None = None):
    """Split ``split`` of a hub dataset as a `datasets.Dataset`, through ``datasets.load_dataset``.

    The same call serves the hub id (the ``datasets`` cache; ``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``
    keep it local), a pre-fetched folder (``hf download --local-dir``; ``path:`` or
    ``$CTPO_DATA_DIR/<owner>/<name>``) and a single parquet / JSON / JSONL file. A folder written by
    ``Dataset.save_to_disk`` is read with ``datasets.load_from_disk``. A miss fails with the commands that
    pre-fetch the dataset.
    """
    datasets = _import_datasets(f"loading {spec.hub_id}")
    source = _source(spec, path)
    try:
        if isinstance(source, Path) and source.is_dir() and _saved_to_disk(source):
            ds = datasets.load_from_disk(str(source))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{spec.name}: {source} has splits {list(ds)}, not {split!r}")
                ds = ds[split]
            return ds
        if isinstance(source, Path) and source.is_file():
            builder = _BUILDERS.get(source.suffix.lower())
            if builder is None:
                raise DataError(
                    f"{source}: unsupported file type {source.suffix!r}; use parquet, JSON, JSONL or Arrow"
                )
            return datasets.load_dataset(builder, data_files={split: str(source)}, split=split)
        return datasets.load_dataset(str(source), split=split)
    except DataError:
        raise
    except ValueError as exc:
        if "Unknown split" not in str(exc):
            raise DataError(f"{spec.name}: cannot read {str(source)!r}: {exc}") from exc
        raise DataError(
            f"{spec.name}: {source} has no split {split!r} ({exc}); set the entry's `split:`"
        ) from exc
    except Exception as exc:  # not cached, no network, unreadable files: one actionable message
        if isinstance(source, Path):
            raise DataError(
                f"{spec.name}: cannot read {str(source)!r} with datasets.load_dataset: "
                f"{type(exc).__name__}: {exc}\nRe-fetch it with `{prefetch_command(spec, str(source))}` "
                f"or pass a parquet/JSON/JSONL file as `path:`."
            ) from exc
        where = "the datasets cache (offline mode is on)" if hf_offline() else "the Hugging Face Hub"
        raise DataError(
            f"{spec.name}: could not load {spec.hub_id!r} split {split!r} from {where}: "
            f"{type(exc).__name__}: {exc}\n{_prefetch_help(spec, split)}"
        ) from exc


def _saved_to_disk(folder: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def read_rows(ds, spec: DatasetSpec | None = None) -> list[dict[str, Any]]:
    """The rows of a `datasets.Dataset` as plain Python dicts, checked for the columns every set needs."""
    missing = [k for k in ("problem", "answer") if k not in ds.column_names]
    if missing:
        name = spec.name if spec else "dataset"
        raise DataError(f"{name}: rows have no column(s) {missing}; columns are {sorted(ds.column_names)}")
    return ds.to_list()


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
    datasets = _import_datasets("writing VERL's parquet")
    if not records:
        raise DataError(f"refusing to write an empty VERL parquet file to {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        datasets.Dataset.from_list(to_verl_rows(records, system_prompt, agent_name)).to_parquet(str(tmp))
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
