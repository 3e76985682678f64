"""rewards.py's hub loading (gsm8k without JSONL paths), run offline: the real `datasets.load_dataset`
call the GPU recipe makes, against a local folder laid out like the hub repository openai/gsm8k
(README.md declaring config "main", parquet files for train/test, columns question/answer)."""
import json

import pytest
from conftest import GSM8K_TEST, GSM8K_TRAIN

import rewards

datasets = pytest.importorskip("datasets")  # in requirements.txt; skipped only on a partial install

# The hub repository's dataset card declares its configs like this; load_dataset reads it to map
# ("main", split) to files, exactly as it does for the downloaded repository.
HUB_CARD = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
---
"""


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """No hub access and an empty datasets cache: anything that tried the network would fail."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # datasets and huggingface_hub read these at import time; the test process has imported them.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def _hub_layout_copy(root, n_train=5, n_test=3):
    """A local folder in openai/gsm8k's layout holding the first rows of the shared JSONL files."""
    for split, source, n in (("train", GSM8K_TRAIN, n_train), ("test", GSM8K_TEST, n_test)):
        rows = [json.loads(line) for line in source.read_text().splitlines()[:n]]
        (root / "main").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(root / "main" / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text(HUB_CARD)
    return root


def test_gsm8k_from_a_hub_layout_equals_the_jsonl_path(tmp_path, offline):
    """Same rows through load_dataset(<folder>, "main", split=...) and through the JSONL reader give
    the same problems (ids, questions, golds, solutions)."""
    root = _hub_layout_copy(tmp_path / "gsm8k")
    hub = rewards.get_task("gsm8k", dataset=str(root))
    for split, source, n in (("train", GSM8K_TRAIN, 5), ("test", GSM8K_TEST, 3)):
        jsonl = tmp_path / f"{split}.jsonl"
        jsonl.write_text("".join(source.read_text().splitlines(keepends=True)[:n]))
        local = rewards.get_task("gsm8k", **{f"{split}_path": str(jsonl)})
        problems = hub.load(split)
        assert len(problems) == n
        assert problems == local.load(split)
    assert hub.load("train")[0]["answer"] == "72"  # Natalia's clips: the gold after '####'


def test_gsm8k_default_is_the_hub_dataset_with_the_call_the_replica_exercises(monkeypatch):
    """With no paths, gsm8k asks datasets for openai/gsm8k, config main, the split by name."""
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"question": "1+1?", "answer": "1+1=2\n#### 2"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems = rewards.get_task("gsm8k").load("test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert problems[0]["answer"] == "2"


def test_gsm8k_hub_failure_names_the_dataset_and_the_offline_way_out(tmp_path, offline):
    with pytest.raises(RuntimeError, match=r"'openai/gsm8k'.*split 'train'.*task\.train_path"):
        rewards.get_task("gsm8k").load("train")  # offline, nothing cached: cannot reach the hub


def test_gsm8k_hub_copy_without_the_expected_columns_is_refused(tmp_path, offline):
    root = tmp_path / "gsm8k"
    (root / "main").mkdir(parents=True)
    for split in ("train", "test"):
        datasets.Dataset.from_list([{"problem": "1+1?", "solution": "2"}]).to_parquet(
            str(root / "main" / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text(HUB_CARD)
    with pytest.raises(ValueError, match="missing column.*question"):
        rewards.get_task("gsm8k", dataset=str(root)).load("train")
