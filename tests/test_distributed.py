"""torchrun on CPU (gloo): the data-parallel loop computes what one process computes."""
import json
import os
import subprocess
import sys

import pytest

import torch

from conftest import ROOT
from plumbing import dist

sys.path.insert(0, str(ROOT / "tests"))
import dist_worker  # noqa: E402


def torchrun(nproc: int, *args, timeout=600, check=True):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


def test_dist_shard_and_map_keep_order():
    items = list(range(7))
    shards = [dist.Dist(rank, 3).shard(items) for rank in range(3)]
    assert shards == [[0, 1, 2], [3, 4], [5, 6]]
    assert dist.Dist().map(lambda xs: [x * x for x in xs], items) == [x * x for x in items]


@pytest.fixture(scope="module")
def two_rank_updates(tmp_path_factory, tiny_model_dir):
    """One torchrun of 2 processes for the gradient tests below (each launch costs two model loads)."""
    out = tmp_path_factory.mktemp("two_ranks")
    torchrun(2, ROOT / "tests" / "dist_worker.py", "grads+idle", tiny_model_dir, out)
    return out


def test_summed_gradients_over_two_ranks_equal_one_process(two_rank_updates, tiny_model_dir):
    """Each rank holds two of the four groups; with the batch-wide normalisers summed over ranks and
    the gradients summed once, every loss's LoRA gradient is the one-process gradient."""
    two = torch.load(two_rank_updates / "grads_world2.pt")
    for loss in dist_worker.LOSSES:
        one = dist_worker.lora_gradients(tiny_model_dir, loss, dist.Dist())
        assert one.keys() == two[loss].keys()
        for name in one:
            assert torch.allclose(one[name], two[loss][name], rtol=1e-4, atol=1e-7), (loss, name)
        assert any(g.abs().sum() > 0 for name, g in one.items() if "lora_A" in name)


def test_a_rank_with_nothing_to_train_takes_the_same_step(two_rank_updates):
    """Only rank 0 has a group of mixed rewards; rank 1 has no row to train. Both take the same optimiser
    step (rank 1 without a forward pass): the same weights, moved from the start, and 4 rows trained."""
    ranks = [torch.load(two_rank_updates / f"idle_rank{r}.pt") for r in range(2)]
    assert all(r["rows"] == 4 and r["skipped"] is None for r in ranks)
    assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys()
    assert all(torch.equal(ranks[0]["weights"][n], ranks[1]["weights"][n]) for n in ranks[0]["weights"])
    assert any(w.abs().sum() > 0 for n, w in ranks[0]["weights"].items() if "lora_B" in n)  # B moved from 0


# --- the whole loop under torchrun: 2 processes, the tiny random model, parity rewards ------------

B, G = 4, 4


def fst_args(tmp_path, model_dir, name, steps, mode):
    return ["--config", "tiny.yaml", "--set", f"model.name={model_dir}", "--set", f"out_dir={tmp_path}",
            "--set", f"run_name={name}", "--set", f"train.steps={steps}", "--set", "train.save_every=2",
            "--set", "sampling.max_new_tokens=8", "--set", f"train.batch_size={B}",
            "--set", f"sampling.group_size={G}", "--set", "train.lr=0.01", "--set", f"mode={mode}",
            "--set", "fast.every=2", "--set", "fast.budget=2", "--set", "fast.reflector_max_new_tokens=8",
            "--set", "fast.operators=[demo, reflect]", "--set", "eval.every=2", "--set", "eval.n=3",
            "--set", "eval.k=2", "--set", "fast.reuse=all"]  # fst: the round's rollouts train the next steps


def train_2(tmp_path, model_dir, name, args, *extra):
    record = tmp_path / f"{name}-record"
    record.mkdir(exist_ok=True)
    proc = torchrun(2, ROOT / "tests" / "dist_worker.py", "train", model_dir, record, *extra, "--", *args,
                    check=not extra)
    rows = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            if (tmp_path / name / "metrics.jsonl").exists() else [])
    prints = [[json.loads(line) for line in (record / f"fingerprints_rank{r}.jsonl").read_text().splitlines()]
              for r in range(2)]
    return proc, rows, prints


@pytest.mark.parametrize("mode", ["rl", "fst"])
def test_torchrun_two_processes_train_as_one_run(tmp_path, tiny_model_dir, mode):
    """A 4-step run on 2 ranks: rank 0 alone writes, the rows count the whole batch, the adapter and
    the pool are identical on both ranks after every step, and (fst) a resumed 2-process run logs
    what the uninterrupted one logged."""
    _, full, prints = train_2(tmp_path, tiny_model_dir, "full", fst_args(tmp_path, tiny_model_dir, "full", 4, mode))
    assert len(prints[0]) == 4 and prints[0] == prints[1]        # one fingerprint per step, the same on both
    assert len({p["fingerprint"] for p in prints[0]}) == 4        # ...and the adapter moved every step
    train_rows = [r for r in full if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [0, 1, 2, 3]       # written once, by rank 0
    assert [r["rollouts_rl"] for r in train_rows] == [B * G * (s + 1) for s in range(4)]
    assert all(len(r["reward_by_prompt"]) >= 1 and 0 <= r["dropped_group_frac"] <= 1 for r in train_rows)
    assert train_rows[-1]["kl_to_base"] > 0
    evals = [r for r in full if r["kind"] == "eval"]
    assert [r["n"] for r in evals] == [3] * len(evals)            # 3 problems split 2 + 1, gathered
    fast = [r for r in full if r["kind"] == "fast"]
    assert [r["step"] for r in fast] == ([1, 3] if mode == "fst" else [])
    if mode == "rl":  # eval.py under torchrun: the problems split over the ranks, rank 0 writes
        proc = torchrun(2, ROOT / "eval.py", tmp_path / "full", "--problems", "3", "--k", "2", "--forgetting")
        report = json.loads((tmp_path / "full" / "eval" / "step_3.json").read_text())
        cell = report["tasks"]["add"]["accuracy"]
        assert (cell["n"], cell["k"]) == (3, 2) and proc.stdout.count("| trained |") == 1  # printed by rank 0 alone
        assert proc.stderr.count("Loading weights:   0%") == 1                           # rank 0's bar alone
        return
    assert train_rows[-1]["rollouts_fast"] == sum(r["metric_calls"] for r in fast) > 0
    assert train_rows[-1]["rollouts_reused"] > 0 and train_rows[2]["reused_share"] > 0  # the round's rollouts trained
    train_2(tmp_path, tiny_model_dir, "part", fst_args(tmp_path, tiny_model_dir, "part", 2, mode))
    _, resumed, prints = train_2(tmp_path, tiny_model_dir, "part", ["--resume", str(tmp_path / "part"),
                                                                     "--set", "train.steps=4"])
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("seconds") and k != "tokens_per_s"}
                          for r in rows]  # noqa: E731
    assert strip(resumed) == strip(full)


def test_ranks_that_drift_apart_stop_the_run(tmp_path, tiny_model_dir):
    proc, _, prints = train_2(tmp_path, tiny_model_dir, "drift",
                              fst_args(tmp_path, tiny_model_dir, "drift", 3, "rl"), "diverge")
    assert proc.returncode != 0
    assert "ranks diverged: the adapter or the prompt pool after step 0 on rank(s) [1]" in proc.stderr
    assert prints[0][0]["fingerprint"] != prints[1][0]["fingerprint"]


def test_batch_smaller_than_the_world_is_refused_before_the_run_folder(tmp_path, tiny_model_dir):
    args = fst_args(tmp_path, tiny_model_dir, "small", 1, "rl") + ["--set", "train.batch_size=1"]
    proc = torchrun(2, ROOT / "fst.py", *args, check=False)
    assert proc.returncode != 0 and "config key 'train.batch_size'" in proc.stderr
    assert not (tmp_path / "small").exists()
