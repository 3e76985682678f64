"""torchrun on CPU (gloo): the data-parallel loop computes what one process computes."""
import os
import subprocess
import sys

import torch

import fst
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))
import dist_worker  # noqa: E402


def torchrun(nproc: int, *args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_dist_shard_and_map_keep_order():
    items = list(range(7))
    shards = [fst.Dist(rank, 3).shard(items) for rank in range(3)]
    assert shards == [[0, 1, 2], [3, 4], [5, 6]]
    assert fst.Dist().map(lambda xs: [x * x for x in xs], items) == [x * x for x in items]


def test_summed_gradients_over_two_ranks_equal_one_process(tmp_path, tiny_model_dir):
    """Each rank holds two of the four groups; with the batch-wide normalisers summed over ranks and
    the gradients summed once, every loss's LoRA gradient is the one-process gradient."""
    torchrun(2, ROOT / "tests" / "dist_worker.py", "grads", tiny_model_dir, tmp_path)
    two = torch.load(tmp_path / "grads_world2.pt")
    for loss in dist_worker.LOSSES:
        one = dist_worker.lora_gradients(tiny_model_dir, loss, fst.Dist())
        assert one.keys() == two[loss].keys()
        for name in one:
            assert torch.allclose(one[name], two[loss][name], rtol=1e-4, atol=1e-7), (loss, name)
        assert any(g.abs().sum() > 0 for name, g in one.items() if "lora_A" in name)
