"""Speed paths keep results: the streamed data paths (raw or JPEG shards, decoded by worker processes
or on the device) equal the device-resident one; the benchmark commands run at tiny size on the CPU."""

import functools
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from funmatch import config
from funmatch.app import cli
from funmatch.data import loader, prepared
from funmatch.errors import DataError
from funmatch.recipe import augment
from funmatch.stages import distill, prepare


@pytest.fixture(scope="module")
def jpeg_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("jpeg")
    prepare.run(config.load("demo-tiny", ["data.encoding=jpeg", "data.shard_size=700"]), out)  # several shards
    return out


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_sharded_gather_matches_loaded_split(tmp_path, encoding, jpeg_dataset):
    if encoding == "raw":
        prepare.run(config.load("demo-tiny", ["data.shard_size=700"]), tmp_path / "ds")
    dataset = tmp_path / "ds" if encoding == "raw" else jpeg_dataset
    images, _ = prepared.load_split(dataset, "train")
    source = prepared.ShardedImages(dataset, "train")
    assert source.encoding == encoding and len(source.counts) > 1
    idx = np.random.default_rng(0).permutation(len(images))[:300]
    assert len(source) == len(images) and np.array_equal(source.gather(idx), images[idx])


def test_jpeg_shards_are_smaller_and_close_to_raw(dataset_dir, jpeg_dataset):
    raw_x, raw_y = prepared.load_split(dataset_dir, "train")
    jpg_x, jpg_y = prepared.load_split(jpeg_dataset, "train")
    assert np.array_equal(raw_y, jpg_y) and raw_x.shape == jpg_x.shape
    err = np.abs(raw_x.astype(np.int16) - jpg_x.astype(np.int16))
    assert err.mean() < 2.0  # quality 95 of upscaled 28-px greyscale images: ~1 grey level
    manifest = prepared.read_manifest(jpeg_dataset)
    stored = sum((jpeg_dataset / sh["images"]).stat().st_size for sh in manifest["splits"]["train"]["shards"])
    assert manifest["encoding"] == "jpeg" and stored < raw_x.nbytes / 2


def test_jpeg_shard_corruption_is_detected(tmp_path, jpeg_dataset):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(jpeg_dataset, copy)
    shard = copy / prepared.read_manifest(copy)["splits"]["val"]["shards"][0]["images"]
    shard.write_bytes(shard.read_bytes()[:-10] + bytes(10))
    with pytest.raises(DataError, match="checksum mismatch"):
        prepared.load_split(copy, "val")


@pytest.mark.parametrize("setup,shard", [("funmatch", (0, 1)), ("funmatch", (1, 3)), ("consistent", (2, 3))])
def test_streamed_loader_gives_the_resident_batches(jpeg_dataset, setup, shard):
    """Worker processes decoding JPEG shards (or the device decoding their bytes) deliver, step by
    step, the rows the resident path gathers — under DDP only the rows a rank's views use."""
    rows = augment.shard_rows(64, setup, shard)
    make = functools.partial(loader.Batches, jpeg_dataset, torch.device("cpu"), batch_size=64, seed=3, rows=rows)
    resident = make(resident_max_gb=16.0)
    streamed = make(resident_max_gb=0.0, workers=2)
    on_device = make(resident_max_gb=0.0, workers=1, jpeg_decode="device")
    assert resident.resident is not None and streamed.resident is None and on_device.decode_on_device
    expected = list(resident.iterate(5, 9))
    assert len(expected) == 4 and len(expected[0][0]) == len(expected[0][1]) == len(rows)
    for got in (list(streamed.iterate(5, 9)), list(on_device.iterate(5, 9))):
        assert len(got) == 4
        for (images, frames), (want_images, want_frames) in zip(got, expected, strict=True):
            assert torch.equal(images, want_images) and torch.equal(frames, want_frames)


def test_shard_rows_views_equal_global_batch_views(jpeg_dataset):
    images = torch.from_numpy(prepared.load_split(jpeg_dataset, "train")[0][:16])
    for shard in ((0, 2), (1, 2)):
        rows = augment.shard_rows(16, "funmatch", shard)
        views = [
            augment.distill_views(
                x, "funmatch", 32, 24, (0.08, 1.0), augment.step_generator(0, 7), shard=shard, batch_size=16
            )
            for x in (images, images[rows])
        ]
        (t_full, s_full), (t_rows, s_rows) = views
        assert t_full is not None and t_rows is not None
        assert all(torch.equal(a, b) for a, b in zip(t_full + [s_full], t_rows + [s_rows], strict=True))


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_streamed_and_resident_batches_train_identically(tmp_path, dataset_dir, teacher_dir, jpeg_dataset, encoding):
    dataset = dataset_dir if encoding == "raw" else jpeg_dataset
    base = ["distill.epochs=0.05", "distill.warmup_steps=1", "distill.eval_every=0", "runtime.loader_workers=2"]
    distill.run(config.load("demo-tiny", base), dataset, teacher_dir, tmp_path / "resident")
    distill.run(
        config.load("demo-tiny", base + ["runtime.resident_max_gb=0"]), dataset, teacher_dir, tmp_path / "streamed"
    )
    a = load_file(str(tmp_path / "resident" / "member-0.safetensors"))
    b = load_file(str(tmp_path / "streamed" / "member-0.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bench_distill_prints_and_writes_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        cli.main(
            ["bench", "distill", "--preset", "demo-tiny", "--steps", "3", "--no-compile-baseline", "--json", str(out)]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["loop"]["img_per_s"] > 0 and result["naive_fp32"]["img_per_s"] > 0
    assert result["ratio_to_naive"] == round(result["loop"]["img_per_s"] / result["naive_fp32"]["img_per_s"], 3)
    assert result["gflop_per_img"] > 0 and "img/s" in capsys.readouterr().out


def test_bench_loader_streams_a_synthetic_jpeg_dataset(tmp_path, capsys):
    out = tmp_path / "loader.json"
    assert (
        cli.main(
            [
                "bench",
                "loader",
                "--preset",
                "demo-tiny",
                "--images",
                "96",
                "--batch-size",
                "16",
                "--steps",
                "4",
                "--workers",
                "1,2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["encoding"] == "jpeg" and result["train_images"] == 96 and result["bytes_per_image"] > 0
    assert [r["workers"] for r in result["runs"]] == [1, 2]
    size = config.load("demo-tiny").data.stored_resolution
    assert all(r["img_per_s"] > 0 and r["batch_shape"] == [16, size, size, 3] for r in result["runs"])
    assert "per worker" in capsys.readouterr().out


def test_natural_images_have_a_photographs_spectrum():
    from funmatch.app.bench_loader import natural_images

    x = natural_images(4, 64).astype(np.float64).mean(-1)
    power = np.abs(np.fft.fft2(x - x.mean((1, 2), keepdims=True))) ** 2
    low, high = power[:, 1:4, 1:4].mean(), power[:, 16:32, 16:32].mean()
    assert low > 50 * high  # 1/f amplitude: power falls ~100× from f≈2 to f≈20 cycles


def test_bench_distill_streams_jpeg_shards(tmp_path):
    out = tmp_path / "bench.json"
    assert (
        cli.main(
            [
                "bench",
                "distill",
                "--preset",
                "demo-tiny",
                "--steps",
                "3",
                "--no-compile-baseline",
                "--set",
                "data.encoding=jpeg",
                "--set",
                "runtime.resident_max_gb=0",
                "--set",
                "runtime.loader_workers=1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["loop"]["img_per_s"] > 0


@pytest.mark.slow
def test_compile_cache_persists_across_processes(tmp_path, dataset_dir, teacher_dir):
    """A retry on a fresh node (empty local inductor cache) loads the compiled graphs saved by the first
    attempt next to its checkpoints, and trains to the same weights."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from funmatch import config; from funmatch.stages import distill; "
        "cfg = config.load('demo-tiny', ['distill.epochs=0.03', 'distill.warmup_steps=1', 'distill.eval_every=0', "
        "'runtime.compile=true']); distill.run(cfg, sys.argv[1], sys.argv[2], sys.argv[3], checkpoint_dir=sys.argv[4])"
    )
    logs = []
    for attempt in ("a", "b"):
        env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{attempt}")}
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                str(dataset_dir),
                str(teacher_dir),
                str(tmp_path / attempt),
                str(tmp_path / f"ckpt-{attempt}"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        logs.append(done.stderr)
        if attempt == "a":  # the second attempt resumes nothing but shares the cache (as a retry would)
            (tmp_path / "ckpt-b").mkdir()
            cache = next((tmp_path / "ckpt-a" / "compile-cache").iterdir())
            (tmp_path / "ckpt-b" / "compile-cache").mkdir()
            cache.rename(tmp_path / "ckpt-b" / "compile-cache" / cache.name)
    assert "bytes saved to" in logs[0] and "loaded from" not in logs[0]
    loaded = re.search(r"compile cache: (\d+) inductor, \d+ autograd artifacts loaded", logs[1])
    assert loaded and int(loaded.group(1)) > 0 and "bytes saved" not in logs[1]
    a = load_file(str(tmp_path / "a" / "member-0.safetensors"))
    b = load_file(str(tmp_path / "b" / "member-0.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loader_workers_fit_cpus_and_shared_memory(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(loader, "SHM", str(tmp_path))
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert loader.plan_workers(3, 1000) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert loader.plan_workers(0, 1000) == 15  # one CPU left for the training loop
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader.plan_workers(0, 1000) == 3  # 4 torchrun processes share 16 CPUs
    # batches so large that half the free shared memory holds only 2 per process: 1 worker × 2 in flight
    assert loader.plan_workers(0, free // 2 // 4 // 2) == 1
    assert "raise the pod's shm size" in caplog.text


def test_teacher_finetune_streams_like_resident(tmp_path, jpeg_dataset):
    from funmatch.stages import finetune

    for name, extra in (("resident", []), ("streamed", ["runtime.resident_max_gb=0", "runtime.loader_workers=1"])):
        finetune.run(config.load("demo-tiny", ["finetune.steps=6"] + extra), jpeg_dataset, tmp_path / name)
    a = load_file(str(tmp_path / "resident" / "member-0.safetensors"))
    b = load_file(str(tmp_path / "streamed" / "member-0.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_int8_calibration_reads_jpeg_shards(jpeg_dataset):
    from funmatch.stages import quantize

    images, frames = quantize.calibration_images(jpeg_dataset, 40)
    full, _ = prepared.load_split(jpeg_dataset, "train")
    picks = np.sort(np.random.default_rng(quantize.CALIBRATION_SEED).choice(len(full), 40, replace=False))
    assert np.array_equal(images, full[picks])
    assert np.array_equal(frames, prepared.load_frames(jpeg_dataset, "train")[picks])
