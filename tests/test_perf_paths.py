"""Speed paths keep results: the streamed (host) data path equals the device-resident one; the
benchmark command runs at tiny size on the CPU."""
import json

import numpy as np
import torch
from safetensors.torch import load_file

from funmatch import cli, config, data, distill


def test_sharded_gather_matches_loaded_split(tmp_path, tiny_cfg):
    from funmatch import prepare

    cfg = config.load("demo-tiny", ["data.shard_size=700"])  # several shards
    prepare.run(cfg, tmp_path / "ds")
    images, _ = data.load_split(tmp_path / "ds", "train")
    source = data.ShardedImages(tmp_path / "ds", "train")
    idx = np.random.default_rng(0).permutation(len(images))[:300]
    assert len(source) == len(images) and np.array_equal(source.gather(idx), images[idx])


def test_streamed_and_resident_batches_train_identically(tmp_path, dataset_dir, teacher_dir):
    base = ["distill.epochs=0.05", "distill.warmup_steps=1", "distill.eval_every=0"]
    distill.run(config.load("demo-tiny", base), dataset_dir, teacher_dir, tmp_path / "resident")
    streamed = config.load("demo-tiny", base + ["runtime.resident_max_gb=0"])
    batches = distill.Batches(dataset_dir, torch.device("cpu"), 0.0)
    assert batches.resident is None  # really the streaming path
    idx = data.batch_indices(3, 64, batches.n, 0)
    resident = distill.Batches(dataset_dir, torch.device("cpu"), 16.0)
    assert torch.equal(batches.get(3, idx, 64, 0), resident.get(3, idx, 64, 0))
    distill.run(streamed, dataset_dir, teacher_dir, tmp_path / "streamed")
    a = load_file(str(tmp_path / "resident" / "member-0.safetensors"))
    b = load_file(str(tmp_path / "streamed" / "member-0.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bench_distill_prints_and_writes_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "distill", "--preset", "demo-tiny", "--steps", "3", "--no-compile-baseline",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["loop"]["img_per_s"] > 0 and result["naive_fp32"]["img_per_s"] > 0
    assert result["ratio_to_naive"] == round(result["loop"]["img_per_s"] / result["naive_fp32"]["img_per_s"], 3)
    assert result["gflop_per_img"] > 0 and "img/s" in capsys.readouterr().out
