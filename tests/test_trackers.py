"""fst.py's live curves (log.report_to): metrics rows reach TensorBoard (read back from its event
file) and W&B (offline run folder read back) under metrics.jsonl's names, with the accepted prompts
as text and the config; a missing tracker stops the run before its folder exists; a tracker that fails
mid-run warns once and the run finishes."""
import json
import math
import struct

import pytest
import yaml

import fst
from plumbing import config, trackers as tracking

TRAIN_ROW = {"kind": "train", "step": 3, "mode": "fst", "task": "gsm8k", "reward_mean": 0.25, "entropy": None,
             "completion_len_max": 17, "reward_by_prompt": {"0": 0.5, "3": 0.0}, "rollouts_rl": 64}
FAST_ROW = {"kind": "fast", "step": 3, "proposals": 4, "accepted": 2, "rejected": {"empty": 1, "not_better": 1},
            "accepted_prompts": ["Think step by step.\nAnswer: <n>", "Check the units."], "rollouts_fast": 30}
EVAL_ROW = {"kind": "eval", "step": 4, "task": "gsm8k", "prompt": "best", "mean_at_k": 0.5, "pass_at_k": 0.75,
            "n": 2, "k": 4, "rollouts_rl": 64, "rollouts_fast": 30, "reflector_calls": 3}  # counters: train/, fast/
WANT = {  # what each row becomes: name -> value (all at the row's step)
    3: {"train/reward_mean": 0.25, "train/completion_len_max": 17, "train/reward_by_prompt/0": 0.5,
        "train/reward_by_prompt/3": 0.0, "train/rollouts_rl": 64, "fast/proposals": 4, "fast/accepted": 2,
        "fast/rejected/empty": 1, "fast/rejected/not_better": 1, "fast/rollouts_fast": 30},
    4: {"eval/gsm8k/best/mean_at_k": 0.5, "eval/gsm8k/best/pass_at_k": 0.75, "eval/gsm8k/best/n": 2,
        "eval/gsm8k/best/k": 4},
}
CONFIG = {"mode": "fst", "train": {"lr": 1e-5, "steps": 5}}


def test_rows_become_names_under_their_kind_and_numbers_only():
    assert tracking.tracker_scalars(TRAIN_ROW) | tracking.tracker_scalars(FAST_ROW) == WANT[3]
    assert tracking.tracker_scalars(EVAL_ROW) == WANT[4]  # under its task and prompt; strings, None, lists out


def _tensorboard_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    texts = {(tag, e.step): b"".join(e.tensor_proto.string_val).decode()
             for tag in acc.Tags()["tensors"] for e in acc.Tensors(tag)}
    return scalars, texts


def test_tensorboard_event_file_holds_rows_prompts_and_config(tmp_path):
    pytest.importorskip("tensorboard")
    trackers = tracking.Trackers(tracking.LogConfig(report_to=["tensorboard"]), tmp_path, CONFIG)
    for row in (TRAIN_ROW, FAST_ROW, EVAL_ROW):
        trackers.log(row)
    trackers.close()
    scalars, texts = _tensorboard_events(tmp_path)
    want = {(name, step): value for step, rows in WANT.items() for name, value in rows.items()}
    assert scalars.keys() == want.keys()
    assert all(scalars[key] == pytest.approx(value) for key, value in want.items())
    prompts = texts[("fast/accepted_prompts/text_summary", 3)]
    assert "    Think step by step.\n    Answer: <n>" in prompts and "    Check the units." in prompts
    assert yaml.safe_load(texts[("config/text_summary", 0)].replace("\n    ", "\n").strip()) == CONFIG


def test_tensorboard_after_resume_shows_the_replayed_steps_once(tmp_path):
    """An interrupted run logged steps 0-3 but saved after step 1; the resumed run replays 2-3. A row
    that metrics.jsonl kept at the resume step (validation after the checkpoint's update) stays."""
    pytest.importorskip("tensorboard")
    kept_eval = {"kind": "eval", "step": 2, "task": "gsm8k", "prompt": "seed", "pass_at_k": 0.5}
    first = tracking.Trackers(tracking.LogConfig(report_to=["tensorboard"]), tmp_path, CONFIG)
    for row in [{"kind": "train", "step": step, "loss": float(step)} for step in range(4)] + [kept_eval]:
        first.log(row)
    first.close()
    (tmp_path / "metrics.jsonl").write_text(json.dumps(kept_eval) + "\n")  # as the resume left it
    resumed = tracking.Trackers(tracking.LogConfig(report_to=["tensorboard"]), tmp_path, CONFIG, first_step=2)
    for step in (2, 3):
        resumed.log({"kind": "train", "step": step, "loss": 10.0 + step})
    resumed.close()
    scalars, _ = _tensorboard_events(tmp_path)
    assert scalars == {("train/loss", 0): 0.0, ("train/loss", 1): 1.0, ("train/loss", 2): 12.0, ("train/loss", 3): 13.0,
                       ("eval/gsm8k/seed/pass_at_k", 2): 0.5}
    # What tells every TensorBoard reader to drop the old steps 2-3: a session start at step 2.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog
    second = sorted(tmp_path.glob("events.out.tfevents.*"))[-1]
    starts = [e.step for e in EventFileLoader(str(second)).Load() if e.session_log.status == SessionLog.START]
    assert starts == [2]


# --- W&B, offline: the run folder's .wandb file read back -----------------------------------------

def _wandb_records(path):
    """The records of a .wandb file: a 7-byte header, then LevelDB-log blocks of 32 KiB holding
    chunks with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def test_wandb_offline_run_holds_rows_prompts_and_config(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "cfg",
                       "WANDB_CACHE_DIR": tmp_path / "cache", "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(var, str(value))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trackers = tracking.Trackers(tracking.LogConfig(report_to=["wandb"], project="fst-test"), run_dir, CONFIG)
    for row in (TRAIN_ROW, FAST_ROW, EVAL_ROW):
        trackers.log(row)
    trackers.close()
    wandb.teardown()  # run.finish() can return before W&B's service has written the whole file
    [offline_run] = (run_dir / "wandb").glob("offline-run-*")
    records = _wandb_records(next(offline_run.glob("run-*.wandb")))
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history.setdefault(items["_step"], {}).update(items)
    for step, rows in WANT.items():
        assert {k: history[step][k] for k in rows} == pytest.approx(rows)
    assert history[3]["fast/accepted_prompts/_type"] == "table-file"
    table = json.loads((offline_run / "files" / history[3]["fast/accepted_prompts/path"]).read_text())
    assert table["data"] == [[3, "Think step by step.\nAnswer: <n>\n\n----\n\nCheck the units."]]
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert run.display_name == "run" and run.project == "fst-test"
    assert config["mode"] == "fst" and config["train"] == {"lr": 1e-5, "steps": 5}
    assert (run_dir / "wandb" / "fst_run_id").read_text() == run.run_id  # what --resume continues


# --- start-up and failure behaviour, in real runs of the tiny random model ------------------------

def _run(tmp_path, name, model_dir, extra=()):
    fst.main(["--config", "tiny.yaml", "--set", f"model.name={model_dir}", "--set", f"out_dir={tmp_path}",
              "--set", f"run_name={name}", "--set", "train.steps=2", "--set", "sampling.max_new_tokens=8",
              "--set", "train.batch_size=2", "--set", "sampling.group_size=4", "--set", "mode=rl",
              "--set", "eval.every=0", *extra])
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(config.ConfigError, match=r"'log.report_to\[1\]'.*tensorboard"):
        fst.load_config("tiny.yaml", ["log.report_to=[tensorboard, mlflow]"])


def test_missing_tracker_stops_before_the_run_folder_exists(tmp_path, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit, match=r"log.report_to lists wandb, which is not installed: pip install wandb"):
        _run(tmp_path, "nope", "unused", ["--set", "log.report_to=[wandb]"])
    assert not (tmp_path / "nope").exists()


def test_tracker_that_cannot_start_stops_with_one_line_and_closes_the_others(tmp_path, monkeypatch):
    closed = []

    class Started:
        package = "json"

        def __init__(self, *args):
            pass

        def close(self):
            closed.append(True)

    class NoLogin:
        package = "json"

        def __init__(self, *args):
            raise PermissionError("No API key configured.\nRun `wandb login`.")

    monkeypatch.setitem(tracking.TRACKERS, "tensorboard", Started)
    monkeypatch.setitem(tracking.TRACKERS, "wandb", NoLogin)
    with pytest.raises(SystemExit, match=r"^log.report_to: wandb could not start: PermissionError: No API key "
                                         r"configured.$"):
        tracking.Trackers(tracking.LogConfig(report_to=["tensorboard", "wandb"]), tmp_path, CONFIG)
    assert closed == [True]


class _FailingTracker:
    """Starts, then raises on every call: stands in for a tracker whose server went away."""
    package = "json"  # always importable
    calls = 0

    def __init__(self, *args):
        pass

    def log(self, *args):
        _FailingTracker.calls += 1
        raise ConnectionError("tracker server went away")

    text = close = log


def test_every_row_reaches_tensorboard_and_a_failing_tracker_warns_once(tmp_path, tiny_model_dir, capsys,
                                                                         monkeypatch):
    """fst mode with validation: train, fast and eval rows all go through the one hook; the failing
    tracker costs one warning, TensorBoard and metrics.jsonl still get every row."""
    pytest.importorskip("tensorboard")
    monkeypatch.setitem(tracking.TRACKERS, "wandb", _FailingTracker)
    monkeypatch.setattr(_FailingTracker, "calls", 0)
    rows = _run(tmp_path, "live", tiny_model_dir, [
        "--set", "log.report_to=[wandb, tensorboard]", "--set", "mode=fst", "--set", "fast.every=2",
        "--set", "fast.budget=1", "--set", "fast.reflector_max_new_tokens=8", "--set", "eval.every=2",
        "--set", "eval.n=2", "--set", "eval.k=2"])
    assert [r["step"] for r in rows if r["kind"] == "train"] == [0, 1]
    assert {r["kind"] for r in rows} == {"train", "fast", "eval"}
    assert _FailingTracker.calls == 1
    assert capsys.readouterr().err.count("wandb failed (ConnectionError: tracker server went away)") == 1
    scalars, texts = _tensorboard_events(tmp_path / "live")
    want = {(name, r["step"]): value for r in rows for name, value in tracking.tracker_scalars(r).items()}
    assert scalars.keys() == want.keys()
    for key, value in want.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6) or (math.isnan(value) and math.isnan(scalars[key]))
    assert yaml.safe_load(texts[("config/text_summary", 0)].replace("\n    ", "\n").strip())["mode"] == "fst"
