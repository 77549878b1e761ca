"""ctpo.data: every registered dataset in the normalised schema, offline, from fixtures in each hub schema."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ctpo import data

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"  # laid out as $CTPO_DATA_DIR/<owner>/<name>


@pytest.fixture(autouse=True, scope="module")
def datasets_cache(tmp_path_factory):
    """`datasets` prepares every loaded set into its cache: a fresh one here, not the user's."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("datasets_cache")
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
        yield cache


@pytest.fixture
def data_dir(monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(FIXTURES))
    return FIXTURES


def _check_schema(records, source, split):
    assert records
    for r in records:
        assert tuple(r) == data.RECORD_KEYS
        assert r["data_source"] == source and r["split"] == split
        assert isinstance(r["problem"], str) and r["problem"]
        assert isinstance(r["answer"], str) and r["answer"]
        assert isinstance(r["extra"], dict)
        json.dumps(r)  # serialisable as one JSONL line
    assert len({r["id"] for r in records}) == len(records)


@pytest.mark.parametrize(
    ("name", "split", "n_rows"),
    [
        ("aime25", "test", 3),
        ("aime26", "test", 2),
        ("hmmt_nov_2025", "train", 3),
        ("brumo_2025", "train", 2),
    ],
)
def test_benchmarks_load_in_the_normalised_schema(data_dir, name, split, n_rows):
    records = data.load(name)
    _check_schema(records, name, split)
    assert len(records) == n_rows


def test_matharena_answers_stay_bare_latex_and_keep_problem_metadata(data_dir):
    hmmt = data.load("hmmt_nov_2025")
    assert [r["answer"] for r in hmmt] == ["4", "\\frac{1}{2}", "20"]
    assert hmmt[1]["id"] == "hmmt_nov_2025-2"
    assert hmmt[1]["extra"]["problem_type"] == ["Geometry", "Algebra"]
    assert hmmt[1]["extra"]["hub_id"] == "MathArena/hmmt_nov_2025"


def test_deepscaler_drops_rows_without_an_answer_with_a_logged_count(data_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="ctpo.data"):
        records = data.load("deepscaler")
    _check_schema(records, "deepscaler", "train")
    assert len(records) == 4
    assert "dropped 2 of 6 rows" in caplog.text
    assert [r["answer"] for r in records] == ["55", "\\frac{5}{6}", "2", "2"]


def test_names_aliases_and_hub_ids_resolve_to_one_entry():
    assert data.resolve_name("MathArena/brumo_2025").name == "brumo_2025"
    assert data.resolve_name("AIME2025").name == "aime25"
    with pytest.raises(data.DataError, match="registered datasets"):
        data.resolve_name("gsm8k")


def test_local_file_and_subset_are_deterministic(tmp_path):
    f = FIXTURES / "math-ai" / "aime25" / "test.jsonl"
    all_rows = data.load("aime25", path=f)
    a = data.load("aime25", path=f, n=2, seed=3)
    b = data.load("aime25", path=f, n=2, seed=3)
    assert a == b and len(a) == 2 and all(r in all_rows for r in a)
    # a pre-fetched folder (as `hf download ... --local-dir DIR` leaves it) works the same
    assert data.load("hmmt_nov_2025", path=FIXTURES / "MathArena" / "hmmt_nov_2025") == data.load(
        "hmmt_nov_2025",
        path=FIXTURES / "MathArena" / "hmmt_nov_2025" / "data" / "train-00000-of-00001.parquet",
    )


def test_hub_sets_are_loaded_by_datasets_in_their_hub_schema(data_dir):
    import datasets

    hmmt = data.load_hub_dataset(data.resolve_name("hmmt_nov_2025"), "train")
    assert isinstance(hmmt, datasets.Dataset)
    assert hmmt.column_names == ["problem_idx", "problem", "answer", "problem_type"]
    assert hmmt.features["problem_type"].feature.dtype == "string"
    aime = data.load_hub_dataset(data.resolve_name("aime25"), "test")
    assert aime.column_names == ["problem", "answer", "id"] and aime.num_rows == 3


def test_a_hub_id_loads_offline_from_the_datasets_cache(monkeypatch, tmp_path):
    """What `datasets.load_dataset('math-ai/aime26', split='test')` on a networked machine leaves in the
    cache (here: prepared from the fixture, then filed under the hub id) is found with the network off."""
    import datasets

    datasets.load_dataset(str(FIXTURES / "math-ai" / "aime26"), split="test", cache_dir=str(tmp_path / "b"))
    (built,) = [p for p in (tmp_path / "b").iterdir() if p.is_dir()]
    built.rename(tmp_path / "math-ai___aime26")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    records = data.load("aime26")
    assert [r["answer"] for r in records] == ["81", "8"]
    assert records == data.load("aime26", path=FIXTURES / "math-ai" / "aime26")


def test_offline_miss_says_how_to_prefetch(monkeypatch, tmp_path):
    import datasets

    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty"))
    with pytest.raises(data.DataError) as err:
        data.load("aime26")
    msg = str(err.value)
    assert "hf download math-ai/aime26 --repo-type dataset" in msg
    assert "datasets.load_dataset('math-ai/aime26', split='test')" in msg
    assert "offline" in msg and data.DATA_DIR_ENV in msg


def test_a_split_the_set_lacks_is_a_clear_error(data_dir):
    with pytest.raises(data.DataError, match="no split 'train'"):
        data.load("aime25", split="train")


def test_an_unsupported_file_is_a_clear_error(tmp_path):
    f = tmp_path / "aime.csv"
    f.write_text("problem,answer\nx,1\n")
    with pytest.raises(data.DataError, match="unsupported file type"):
        data.load("aime25", path=f)


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load("brumo_2025", path=tmp_path / "nope.parquet")


def test_without_datasets_a_hub_load_says_how_to_install_it(data_dir, monkeypatch, tmp_path):
    """A core-only install (no `verl` extra) has no `datasets`: hub sets and VERL's parquet then fail
    naming the package and the install command, while the embedded arith set still loads."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(
        data.DataError, match=r"loading math-ai/aime25 needs the `datasets` package.*\[verl\]"
    ):
        data.load("aime25")
    with pytest.raises(data.DataError, match="writing VERL's parquet needs the `datasets` package"):
        data.to_verl_parquet([{"problem": "1+1", "answer": "2"}], tmp_path / "x.parquet", system_prompt="S")
    assert len(data.load("arith", split="easy", n=3, seed=0)) == 3


def test_verl_parquet_has_verl_schema(data_dir, tmp_path):
    records = data.load("hmmt_nov_2025")
    out = data.to_verl_parquet(records, tmp_path / "hmmt.parquet", system_prompt="SYSTEM")
    frame = pd.read_parquet(out)
    assert list(frame.columns) == [
        "data_source",
        "prompt",
        "ability",
        "reward_model",
        "extra_info",
        "agent_name",
    ]
    row = frame.iloc[1]
    assert row["data_source"] == "hmmt_nov_2025"
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["prompt"][0]["content"] == "SYSTEM" and row["prompt"][1]["content"] == records[1]["problem"]
    assert row["reward_model"]["ground_truth"] == "\\frac{1}{2}"
    assert row["extra_info"]["id"] == "hmmt_nov_2025-2" and row["agent_name"] == "ctpo_tir_agent"


def test_arith_delegates_to_the_task_module():
    pytest.importorskip("ctpo.tasks.arith")
    records = data.load("arith", split="easy", n=5, seed=1)
    _check_schema(records, records[0]["data_source"], "easy")
    assert len(records) == 5
    assert records == data.load("arith", split="easy", n=5, seed=1)


def _config(tmp_path, benchmarks):
    """experiments/tiny.yaml with a 7-problem train set and extra benchmarks."""
    cfg = yaml.safe_load((Path(__file__).parent.parent / "experiments" / "tiny.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "r")
    cfg["data"]["train"]["n"] = 7
    cfg["data"]["benchmarks"].update(benchmarks)
    cfg.get("tir", {}).pop("system_prompt", None)  # the protocol's default TIR prompt (tiny.yaml sets "")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_data_command_writes_normalised_jsonl(tmp_path, data_dir, capsys):
    from ctpo.cli import main

    cfg = _config(tmp_path, {"brumo25": {"source": "brumo_2025"}})
    out = tmp_path / "brumo.jsonl"
    assert main(["data", "--config", str(cfg), "--dataset", "brumo25", "--out", str(out)]) == 0
    records = data.read_jsonl(out)
    _check_schema(records, "brumo_2025", "train")
    assert "2 records" in capsys.readouterr().out


def test_data_command_arith_train_entry(tmp_path):
    pytest.importorskip("ctpo.tasks.arith")
    from ctpo.cli import main

    cfg = _config(tmp_path, {})
    out = tmp_path / "train.jsonl"
    assert main(["data", "--config", str(cfg), "--dataset", "train", "--out", str(out)]) == 0
    assert len(data.read_jsonl(out)) == 7


def test_data_command_reports_unknown_dataset(tmp_path, capsys):
    from ctpo.cli import main

    cfg = _config(tmp_path, {})
    assert main(["data", "--config", str(cfg), "--dataset", "nope", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "neither a data entry" in capsys.readouterr().err


def test_data_command_writes_verl_parquet_with_the_tir_system_prompt(tmp_path, data_dir):
    pytest.importorskip("ctpo.tir.protocol")
    from ctpo.cli import main
    from ctpo.tir.protocol import TIRConfig

    cfg = _config(tmp_path, {"aime26": {"source": "aime26"}})
    out, parquet = tmp_path / "aime26.jsonl", tmp_path / "aime26.parquet"
    assert (
        main(
            [
                "data",
                "--config",
                str(cfg),
                "--dataset",
                "aime26",
                "--out",
                str(out),
                "--parquet",
                str(parquet),
            ]
        )
        == 0
    )
    frame = pd.read_parquet(parquet)
    assert len(frame) == 2 and frame.iloc[0]["prompt"][0]["content"] == TIRConfig().system_prompt
    assert frame.iloc[0]["reward_model"]["ground_truth"] == "81"


def test_a_datasets_save_to_disk_folder_is_read_without_the_hub(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `datasets` library is not installed")
    rows = pd.read_parquet(FIXTURES / "MathArena" / "brumo_2025" / "data" / "train-00000-of-00001.parquet")
    ds = datasets.Dataset.from_pandas(rows, preserve_index=False)
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    expected = data.load("brumo_2025", path=FIXTURES / "MathArena" / "brumo_2025")
    assert data.load("brumo_2025", path=tmp_path / "one") == expected
    assert data.load("brumo_2025", path=tmp_path / "dict") == expected
