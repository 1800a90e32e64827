"""Latent cache at dataset scale: webdataset / parquet inputs, S3 (moto's real HTTP server) in and out, kill -9 on
S3, the streaming reader (exactly once over ranks x workers), the Ray engine, and bad storage input."""

from __future__ import annotations

import io
import json
import logging
import signal
import socket
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_vae, write_tar
from PIL import Image
from test_cache import assert_same_cache, kill_9_when

from diffusers_vae_ext.cache import LatentCacheDataset, StorageAccessError, load_cache_info, precompute_latents
from diffusers_vae_ext.data import sample_photos

s3fs = pytest.importorskip("s3fs", reason="the S3 tests need s3fs (pip install 'diffusers-vae-ext[scale]')")
moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the dev extra)")

# Tiny and fast: 32 px, small batches and shards so a run has several units and shards.
RUN = dict(resolution=32, flip=True, batch_size=2, shard_size=3, num_workers=0, progress=False)
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class S3:
    endpoint: str
    fs: Any

    def put_folder(self, local: Path, url: str) -> None:
        for path in sorted(local.rglob("*")):
            if path.is_file():
                self.fs.pipe_file(
                    f"{url.removeprefix('s3://')}/{path.relative_to(local).as_posix()}", path.read_bytes()
                )

    def get_folder(self, url: str, local: Path) -> Path:
        root = url.removeprefix("s3://").rstrip("/")
        for key in self.fs.find(root):
            target = local / key[len(root) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.fs.cat_file(key))
        return local


@pytest.fixture(scope="module")
def s3():
    """moto's standalone S3 server on 127.0.0.1 (a real HTTP endpoint), found by clients through the environment."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    environment = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never look for instance credentials (nothing outside is reachable)
    }
    with pytest.MonkeyPatch.context() as patch:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
            patch.delenv(key, raising=False)
        for key, value in environment.items():
            patch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        for bucket in ("inputs", "caches"):
            fs.mkdir(bucket)
        yield S3(endpoint, fs)
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


# ------------------------------------------------------------------------------------------------- inputs
def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def small_photos(count: int) -> list[Image.Image]:
    """`count` real photos (crops of scikit-image's) of 48-96 px, several aspect ratios."""
    photos = sample_photos()
    images = []
    for i in range(count):
        photo = photos[PHOTOS[i % len(PHOTOS)]]
        side = min(photo.size) // (1 + i // len(PHOTOS))
        crop = photo.crop((0, 0, side, side)).resize((48 + 16 * (i % 3), 48 + 16 * ((i + 1) % 3)))
        images.append(crop)
    return images


def write_shards(root: Path) -> dict[str, str]:
    """4 webdataset shards of real photos with bad samples; returns {label: expected skip kind}."""
    root.mkdir(parents=True)
    photos = small_photos(12)
    bad = {}
    for shard in range(4):
        members = []
        for i in range(3):
            n = shard * 3 + i
            key = f"{n:05d}"
            image = _jpeg(photos[n]) if n % 2 else _png(photos[n])
            members.append((f"{key}.{'jpg' if n % 2 else 'png'}", image))
            if n % 3:
                members.append((f"{key}.txt", f"photo {n}".encode()))
            else:
                members.append((f"{key}.json", json.dumps({"caption": f"photo {n}", "width": 1}).encode()))
        if shard == 1:  # a member that is not an image, and a sample without any image
            members.append(("00100.jpg", b"this is not a JPEG"))
            members.append(("00101.txt", b"a caption without its image"))
            bad.update({"00001.tar/00100": "unreadable", "00001.tar/00101": "no_image"})
        write_tar(root / f"{shard:05d}.tar", members)
    # Shard 3 is cut off inside its last sample's image: the first two samples are kept, the loss is reported.
    with tarfile.open(root / "00003.tar") as tar:
        last = next(m for m in tar.getmembers() if m.name.startswith("00011."))
    data = (root / "00003.tar").read_bytes()
    (root / "00003.tar").write_bytes(data[: last.offset_data + last.size // 2])
    bad["00003.tar"] = "unreadable"
    return bad


@pytest.fixture(scope="module")
def shards(workdir, s3) -> tuple[Path, dict[str, str]]:
    bad = write_shards(workdir / "shards")
    s3.put_folder(workdir / "shards", "s3://inputs/shards")
    return workdir / "shards", bad


@pytest.fixture(scope="module")
def local_reference(workdir, vae_dir, shards) -> Path:
    """The same shards from a local folder into a local cache, in one process: what every other run must equal."""
    precompute_latents(vae_dir, workdir / "reference", train_data_dir=shards[0], **RUN)
    return workdir / "reference"


@pytest.fixture(scope="module")
def s3_reference(s3, vae_dir, shards) -> str:
    url = "s3://caches/wds"
    precompute_latents(vae_dir, url, train_data_dir="s3://inputs/shards/{00000..00003}.tar", **RUN)
    return url


def _records(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in LatentCacheDataset(path, sample_posterior=False, scale=False).records}


# ------------------------------------------------------------------------------------------------- tests
def test_webdataset_on_s3_to_cache_on_s3_equals_the_local_run(workdir, s3, shards, local_reference, s3_reference):
    _, bad = shards
    # Nothing but complete objects in the bucket, and the same bytes as the local run (downloaded to compare).
    keys = s3.fs.find("caches/wds")
    assert not [k for k in keys if ".tmp" in k or "write-check" in k]
    downloaded = s3.get_folder(s3_reference, workdir / "downloaded")
    assert_same_cache(downloaded, local_reference, exact=True)
    assert load_cache_info(s3_reference)["status"] == "complete"

    records = _records(local_reference)
    good = {r["source"] for r in records.values()}
    assert good == {f"{shard:05d}.tar/{n:05d}" for shard in range(3) for n in range(shard * 3, shard * 3 + 3)} | {
        "00003.tar/00009",
        "00003.tar/00010",
    }, "every good sample cached, including those before the cut in the truncated shard"
    assert all(r["id"].startswith(r["source"] + "@") for r in records.values())
    assert {r["caption"] for r in records.values() if not r["flip"]} == {f"photo {n}" for n in range(11)}
    skipped = [json.loads(line) for line in (local_reference / "skipped.jsonl").read_text().splitlines()]
    assert {s["source"]: s["kind"] for s in skipped} == bad
    by_source = {s["source"]: s["reason"] for s in skipped}
    assert "no image in the sample" in by_source["00001.tar/00101"] and "txt" in by_source["00001.tar/00101"]
    assert "after sample '00010'" in by_source["00003.tar"] and "lost" in by_source["00003.tar"]


def test_parquet_on_s3_with_hf_image_structs_equals_the_same_rows_as_a_dataset(workdir, s3, vae_dir):
    import datasets
    import pyarrow.parquet as pq

    photos = small_photos(5)
    rows = {
        "image": [{"bytes": _png(p), "path": None} for p in photos] + [None],
        "text": [f"row {i}" for i in range(6)],
    }
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    table = datasets.Dataset.from_dict(rows, features=features)
    folder = workdir / "parquet"
    folder.mkdir()
    table.to_parquet(str(folder / "a.parquet"), batch_size=3)  # as HF writes it: {"bytes", "path"} structs
    assert pq.ParquetFile(folder / "a.parquet").metadata.num_row_groups == 2
    table.to_parquet(str(folder / "b.parquet"))
    data = (folder / "b.parquet").read_bytes()
    (folder / "b.parquet").write_bytes(data[: len(data) // 2])  # truncated: its footer is gone
    s3.put_folder(folder, "s3://inputs/parquet")

    run = {**RUN, "flip": False}
    precompute_latents(vae_dir, workdir / "from_parquet", train_data_dir="s3://inputs/parquet/", **run)
    precompute_latents(vae_dir, workdir / "from_rows", dataset=table, unit_size=3, **run)
    parquet = LatentCacheDataset(workdir / "from_parquet", sample_posterior=False, scale=False)
    dataset = LatentCacheDataset(workdir / "from_rows", sample_posterior=False, scale=False)
    assert [r["source"] for r in parquet.records] == [f"a.parquet/row{i}" for i in range(5)]
    assert [r["caption"] for r in parquet.records] == [f"row {i}" for i in range(5)]
    assert len(dataset) == 5
    for i in range(5):  # the same rows in the same batches: the same tensors
        assert torch.equal(parquet.moments(i), dataset.moments(i))
    skipped = [json.loads(line) for line in (workdir / "from_parquet/skipped.jsonl").read_text().splitlines()]
    assert [(s["source"], s["kind"]) for s in skipped] == [("a.parquet/row5", "no_image"), ("b.parquet", "unreadable")]
    assert "not a readable parquet file" in skipped[1]["reason"]
    units = sorted(p.name for p in (workdir / "from_parquet/units").iterdir())
    assert [u.rsplit("-", 1)[0] for u in units] == ["a.parquet_rg0", "a.parquet_rg1", "b.parquet"]


def _shard_objects(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return [k for k in fs.ls(f"{prefix}/shards", refresh=True) if k.endswith(".safetensors")]
    except FileNotFoundError:
        return []


def test_kill_9_while_writing_to_s3_then_rerun_equals_the_uninterrupted_run(
    workdir, s3, vae_dir, shards, s3_reference
):
    from safetensors.torch import load

    out = "s3://caches/killed"
    # The child sleeps around each upload so the kill lands mid-run, between and during uploads.
    slow = (
        "import sys, time\n"
        "from diffusers_vae_ext.cache.storage import CacheStore\n"
        "put = CacheStore.put_shard\n"
        "def slow_put(*args, **kwargs):\n    time.sleep(0.3)\n    put(*args, **kwargs)\n    time.sleep(0.3)\n"
        "CacheStore.put_shard = slow_put\n"
        "from diffusers_vae_ext.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["cache", "--vae", str(vae_dir), "--train_data_dir", "s3://inputs/shards/", "--output_dir", out]
    args += ["--resolution", "32", "--flip", "--batch_size", "2", "--shard_size", "3", "--dataloader_num_workers", "0"]

    def three_uploaded() -> bool:
        return len(_shard_objects(s3.fs, out.removeprefix("s3://"))) >= 3

    kill_9_when([sys.executable, "-c", slow, *args], three_uploaded, interval=0.05)

    # Every object under a final name is complete (an upload cut off by the kill leaves nothing behind).
    written = _shard_objects(s3.fs, out.removeprefix("s3://"))
    total = len(_shard_objects(s3.fs, s3_reference.removeprefix("s3://")))
    assert 3 <= len(written) < total
    for key in written:
        assert load(s3.fs.cat_file(key)), key
    assert load_cache_info(out)["status"] == "building"

    summary = precompute_latents(vae_dir, out, train_data_dir="s3://inputs/shards/", **RUN)
    assert summary.resumed > 0 and summary.new > 0
    assert_same_cache(
        s3.get_folder(out, workdir / "killed"), s3.get_folder(s3_reference, workdir / "ref2"), exact=True
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bad_storage_input_fails_before_any_work_with_a_clear_error(workdir, s3, vae_dir, shards, monkeypatch):
    import boto3
    import requests

    from diffusers_vae_ext.cli import main

    vae = make_vae(seed=0)
    calls = []
    vae.encoder.register_forward_pre_hook(lambda *args: calls.append(1))
    run = {**RUN, "flip": False}

    with pytest.raises(FileNotFoundError, match="does not exist or is empty"):  # a misspelled prefix
        precompute_latents(vae, workdir / "bad1", train_data_dir="s3://inputs/shardz/", **run)
    with pytest.raises(FileNotFoundError, match="first shard"):  # a pattern that matches nothing
        precompute_latents(vae, workdir / "bad2", train_data_dir="s3://inputs/shards/{00010..00012}.tar", **run)
    with pytest.raises((FileNotFoundError, StorageAccessError), match="no-such-bucket"):
        precompute_latents(vae, workdir / "bad3", train_data_dir="s3://no-such-bucket/data/", **run)

    dead = {"endpoint_url": f"http://127.0.0.1:{_closed_port()}", "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(StorageAccessError, match="cannot be reached"):
        precompute_latents(vae, "s3://caches/never", train_data_dir="s3://inputs/shards/", storage_options=dead, **run)
    command = ["cache", "--vae", str(vae_dir), "--train_data_dir", str(shards[0]), "--output_dir", "s3://caches/never"]
    assert main(command + ["--storage_options", json.dumps(dead)]) == 2

    with monkeypatch.context() as patch:  # no credentials anywhere
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            patch.delenv(key)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(workdir / "none"))
        patch.setenv("AWS_CONFIG_FILE", str(workdir / "none"))
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(StorageAccessError, match="no credentials found.*AWS_ACCESS_KEY_ID"):
            precompute_latents(vae, workdir / "bad4", train_data_dir="s3://inputs/shards/", **run)
    s3fs.S3FileSystem.clear_instance_cache()

    # No write permission: a user who may only read (moto enforces IAM policies once auth is switched on).
    iam = boto3.client("iam", endpoint_url=s3.endpoint)
    iam.create_user(UserName="reader")
    statement = {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}
    document = json.dumps({"Version": "2012-10-17", "Statement": [statement]})
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=document)
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    reader = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    requests.post(f"{s3.endpoint}/moto-api/reset-auth", data=b"0", timeout=10)
    try:
        with pytest.raises(StorageAccessError, match="permission denied"):
            precompute_latents(
                vae, "s3://caches/readonly", train_data_dir="s3://inputs/shards/", storage_options=reader, **run
            )
    finally:
        requests.post(f"{s3.endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
    assert not calls, "every error above comes before the first image is encoded"
    assert not s3.fs.exists("caches/readonly/cache.json") and not s3.fs.exists("caches/never")


def _served(dataset_factory, ranks: int, workers: int) -> list[dict]:
    items = []
    for rank in range(ranks):
        loader = torch.utils.data.DataLoader(dataset_factory(rank), batch_size=None, num_workers=workers)
        items.extend(loader)
    return items


def test_streaming_reader_from_s3_serves_each_sample_once_over_ranks_and_workers_like_the_map_reader(
    s3, local_reference, s3_reference
):
    from diffusers_vae_ext.cache import LatentCacheIterableDataset

    reference = LatentCacheDataset(local_reference, seed=3)
    reference.set_epoch(1)
    expected = {r["id"]: reference[i] for i, r in enumerate(reference.records)}

    def from_s3(rank):
        return LatentCacheIterableDataset(s3_reference, seed=3, epoch=1, rank=rank, world_size=2, shuffle_buffer=4)

    served = _served(from_s3, ranks=2, workers=2)  # 4 consumers, each reading its shards straight from S3
    assert sorted(item["id"] for item in served) == sorted(expected), "every sample exactly once"
    for item in served:
        want = expected[item["id"]]
        assert torch.equal(item["latents"], want["latents"]), item["id"]  # the same draw, the same scaling
        for key in ("caption", "flip"):
            assert item[key] == want[key]
        for key in ("original_size", "crop_coords_top_left", "target_size", "bucket"):
            assert torch.equal(item[key], want[key])

    # More consumers than shards (14 ranks): still each sample once, consumers differ by one sample at most.
    stream = LatentCacheIterableDataset(local_reference, seed=3, epoch=1)
    assert len(stream.shards) < 14
    counts = [sum(e - f for _, f, e in stream.ranges(c, 14)) for c in range(14)]
    assert max(counts) - min(counts) <= 1
    served = [
        item
        for rank in range(14)
        for item in LatentCacheIterableDataset(local_reference, seed=3, epoch=1, rank=rank, world_size=14)
    ]
    assert sorted(item["id"] for item in served) == sorted(expected)

    # A new epoch: a new order and new draws; the same epoch again: the same stream.
    first = [item["id"] for item in LatentCacheIterableDataset(local_reference, seed=3, epoch=1)]
    again = [item["id"] for item in LatentCacheIterableDataset(local_reference, seed=3, epoch=1)]
    stream.set_epoch(2)
    second = list(stream)
    assert first == again and [item["id"] for item in second] != first
    reference.set_epoch(2)
    index = {r["id"]: i for i, r in enumerate(reference.records)}
    assert all(torch.equal(item["latents"], reference[index[item["id"]]]["latents"]) for item in second)


def test_streaming_reader_batches_hold_one_bucket(workdir, vae_dir):
    from diffusers_vae_ext.cache import LatentCacheIterableDataset

    folder = workdir / "aspect"
    folder.mkdir()
    photos = sample_photos()
    sizes = [(256, 64), (64, 256), (128, 128), (192, 64), (128, 128), (256, 64), (64, 192), (128, 128)]
    for i, size in enumerate(sizes):
        photos[PHOTOS[i % len(PHOTOS)]].resize(size).save(folder / f"{i}.png")
    out = workdir / "aspect_cache"
    precompute_latents(vae_dir, out, train_data_dir=folder, **{**RUN, "resolution": 128, "buckets": True})
    records = LatentCacheDataset(out).records
    assert len({tuple(r["bucket"]) for r in records}) >= 3
    served = []
    for rank in range(2):
        stream = LatentCacheIterableDataset(out, batch_size=3, rank=rank, world_size=2)
        batches = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0))
        assert all(len({tuple(b) for b in batch["bucket"].tolist()}) == 1 for batch in batches)
        assert all(batch["latents"].shape[0] == len(batch["id"]) <= 3 for batch in batches)
        served += [i for batch in batches for i in batch["id"]]
    assert sorted(served) == sorted(r["id"] for r in records), "both ranks together: every sample once"


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster started inside the test process (skipped with the reason if it cannot start)."""
    ray = pytest.importorskip("ray", reason="the Ray engine tests need ray (pip install 'diffusers-vae-ext[ray]')")
    try:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    except Exception as err:  # e.g. no shared memory, no free ports
        pytest.skip(f"a local Ray cluster cannot start here: {type(err).__name__}: {err}")
    yield ray
    ray.shutdown()


def _kill_encoder_actor_after_first_unit(out: Path, report: dict) -> None:
    """SIGKILL the Ray encoder actor's process (a descendant of this test) once one unit is complete."""
    import psutil

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (out / "units").is_dir() and any((out / "units").glob("*.json")):
            for process in psutil.Process().children(recursive=True):
                try:
                    if "_UnitEncoderActor" in " ".join(process.cmdline()):
                        report["units_done_at_kill"] = len(list((out / "units").glob("*.json")))
                        process.send_signal(signal.SIGKILL)
                        report["killed"] = process.pid
                        return
                except psutil.Error:
                    continue
        time.sleep(0.02)


def test_ray_engine_equals_the_local_run_also_when_a_worker_is_killed(
    workdir, vae_dir, shards, local_reference, ray_cluster
):
    import threading

    summary = precompute_latents(vae_dir, workdir / "ray", train_data_dir=shards[0], engine="ray", **RUN)
    assert summary.new == summary.cached > 0
    assert_same_cache(workdir / "ray", local_reference, exact=True)

    out, report = workdir / "ray_killed", {}
    killer = threading.Thread(target=_kill_encoder_actor_after_first_unit, args=(out, report), daemon=True)
    killer.start()
    precompute_latents(vae_dir, out, train_data_dir=shards[0], engine="ray", **RUN)
    killer.join(timeout=5)
    assert "killed" in report and report["units_done_at_kill"] < 4, f"the kill did not land mid-run: {report}"
    assert_same_cache(out, local_reference, exact=True)


def test_a_corrupt_tar_header_keeps_the_samples_before_it_and_is_reported(workdir):
    from diffusers_vae_ext.cache import iter_source_items

    root = workdir / "corrupt_header"
    root.mkdir()
    photos = small_photos(4)
    members = []
    for n, photo in enumerate(photos):
        members += [(f"{n:05d}.jpg", _jpeg(photo)), (f"{n:05d}.txt", f"photo {n}".encode())]
    write_tar(root / "00000.tar", members)
    with tarfile.open(root / "00000.tar") as tar:
        header = next(m for m in tar.getmembers() if m.name == "00002.jpg").offset
    data = bytearray((root / "00000.tar").read_bytes())
    data[header : header + 100] = b"\xff" * 100  # tarfile would end the archive here without a word
    (root / "00000.tar").write_bytes(bytes(data))

    items = list(iter_source_items(root))
    assert [(i.label, i.caption) for i in items[:-1]] == [("00000.tar/00000", "photo 0")]
    assert items[0].data == _jpeg(photos[0])
    # Sample 00001 may have lost members after the corrupt header: reported, not cached with a wrong caption.
    assert items[-1].label == "00000.tar" and items[-1].error[0] == "unreadable"
    assert "after sample '00000'" in items[-1].error[1] and "00001" in items[-1].error[1]


def test_an_old_format_cache_is_refused_with_what_to_do(workdir, vae_dir, shards):
    old = workdir / "v1"
    old.mkdir()
    info = {"format": "diffusers_vae_ext.latent_cache", "format_version": 1, "status": "complete"}
    (old / "cache.json").write_text(json.dumps({**info, "provenance": info, "provenance_hash": "0"}))
    with pytest.raises(ValueError, match="format version 1; this code reads 2.*--overwrite"):
        LatentCacheDataset(old)
    with pytest.raises(ValueError, match="v1, this code writes v2"):
        precompute_latents(vae_dir, old, train_data_dir=shards[0], **RUN)
