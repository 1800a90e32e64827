"""The trainer's data at scale: webdataset shards on moto's S3 server train exactly like the same images in a folder,
2 processes give the result of 1, each sample is read once per epoch over 2 ranks x 2 workers, a resume on shards
is exact, broken inputs are skipped and listed, and a missing package gives its install hint before any work."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, cpu_launch, read_jsonl, write_tar
from safetensors.torch import load_file

from diffusers_vae_ext import training
from diffusers_vae_ext.cache.sources import open_source
from diffusers_vae_ext.data import sample_photos
from diffusers_vae_ext.training.streaming import SKIPPED_FILE, StreamedImages

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]
PER_SHARD = 3


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


def encoded_photos(count: int) -> list[bytes]:
    """`count` distinct real photos (crops of scikit-image's), 64-80 px, PNG and JPEG."""
    photos = sample_photos()
    blobs = []
    for i in range(count):
        photo = photos[PHOTOS[i % len(PHOTOS)]]
        side = min(photo.size) // (1 + i // len(PHOTOS))
        image = photo.crop((3 * i, 0, 3 * i + side, side)).resize((64 + 8 * (i % 3), 64))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if i % 2 else "JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def extension(data: bytes) -> str:
    return "png" if data.startswith(b"\x89PNG") else "jpg"


def write_folder_and_shards(root: Path, blobs: list[bytes]) -> tuple[Path, Path]:
    """The same images as a folder (`00000.png`, ...) and as webdataset shards of PER_SHARD samples each."""
    folder, shards = root / "folder", root / "shards"
    folder.mkdir(parents=True)
    shards.mkdir()
    for i, data in enumerate(blobs):
        (folder / f"{i:05d}.{extension(data)}").write_bytes(data)
    for shard in range(0, len(blobs), PER_SHARD):
        members = [
            (f"{i:05d}.{extension(blobs[i])}", blobs[i]) for i in range(shard, min(shard + PER_SHARD, len(blobs)))
        ]
        members += [(f"{i:05d}.txt", f"photo {i}".encode()) for i in range(shard, min(shard + PER_SHARD, len(blobs)))]
        members.sort()
        write_tar(shards / f"{shard // PER_SHARD:05d}.tar", members)
    return folder, shards


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("data")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    folder, shards = write_folder_and_shards(root, encoded_photos(12))
    return config, folder, shards


def train_args(config: Path, output_dir: Path, data: str, *extra: str) -> list[str]:
    return [
        "--model_config", str(config),
        "--train_data_dir", data,
        "--output_dir", str(output_dir),
        "--resolution", "32",
        "--train_batch_size", "2",
        "--report_to", "none",
        "--no_progress",
        "--lr_warmup_steps", "0",
        "--learning_rate", "1e-3",
        "--validation_steps", "1000",
        "--mixed_precision", "no",
        "--random_flip",
        "--num_validation_images", "1",
        # A folder's units are slices of --unit_size images: PER_SHARD makes them the shards' units.
        "--unit_size", str(PER_SHARD),
        *extra,
    ]  # fmt: skip


def free_port() -> int:
    """A free port for torchrun's rendezvous: the default 29500 collides with any other 2-process run here."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def losses(output_dir: Path) -> list[float]:
    """Step, reconstruction and KL of every step, flat (for pytest.approx)."""
    rows = read_jsonl(output_dir / "train_log.jsonl")
    return [value for row in rows for value in (row["step"], row["rec_per_pixel"], row["kl"])]


# ------------------------------------------------------------------------------------------ moto S3 server
@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's standalone S3 server on 127.0.0.1 (a real HTTP endpoint); credentials from the environment."""
    s3fs = pytest.importorskip("s3fs", reason="the S3 test needs s3fs (pip install 'diffusers-vae-ext[s3]')")
    moto_server = pytest.importorskip("moto.server", reason="the S3 test needs moto[server] (the dev extra)")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
            patch.delenv(key, raising=False)
        patch.delenv("AWS_ENDPOINT_URL", raising=False)  # the endpoint comes from --storage_options
        patch.setenv("AWS_ACCESS_KEY_ID", "test")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        s3fs.S3FileSystem.clear_instance_cache()
        yield endpoint, s3fs.S3FileSystem(endpoint_url=endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_shards_on_s3_train_exactly_like_the_same_images_in_a_folder(data, s3_endpoint, tmp_path):
    config, folder, shards = data
    endpoint, fs = s3_endpoint
    fs.mkdir("training")
    for tar in sorted(shards.glob("*.tar")):
        fs.pipe_file(f"training/shards/{tar.name}", tar.read_bytes())
    steps = ("--max_train_steps", "5")
    from_folder = training.main(train_args(config, tmp_path / "folder", str(folder), *steps))
    pattern = "s3://training/shards/{00000..00003}.tar"  # a brace pattern, as webdataset users write them
    options = json.dumps({"endpoint_url": endpoint})
    from_s3 = training.main(train_args(config, tmp_path / "s3", pattern, *steps, "--storage_options", options))

    # The folder is read map-style, the shards streamed: the same images, order, crops and flips, step for step.
    expected, got = losses(from_folder), losses(from_s3)
    assert got[::3] == [1, 2, 3, 4, 5]
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert len({round(r, 6) for r in expected[1::3]}) == 5  # distinct batches: a test that could fail
    final_folder = load_file(str(from_folder / "diffusion_pytorch_model.safetensors"))
    final_s3 = load_file(str(from_s3 / "diffusion_pytorch_model.safetensors"))
    for key, value in final_folder.items():
        torch.testing.assert_close(final_s3[key], value, rtol=1e-5, atol=1e-6)
    assert not (from_s3 / SKIPPED_FILE).exists()

    # The same images as parquet, HF's {"bytes": ..., "path": ...} image structs, one row group per PER_SHARD rows.
    pq = pytest.importorskip("pyarrow.parquet", reason="parquet needs pyarrow (the scale extra)")
    import pyarrow as pa

    files = sorted(folder.iterdir())
    images = [{"bytes": f.read_bytes(), "path": f.name} for f in files]
    table = pa.table({"image": images, "text": [f"photo {i}" for i in range(len(files))]})
    (tmp_path / "parquet").mkdir()
    pq.write_table(table, tmp_path / "parquet" / "part-0.parquet", row_group_size=PER_SHARD)
    from_parquet = training.main(train_args(config, tmp_path / "pq", str(tmp_path / "parquet"), *steps))
    assert losses(from_parquet) == pytest.approx(expected, rel=1e-6, abs=1e-7)


# ----------------------------------------------------------------------------------- the split over readers
def test_each_sample_is_read_once_per_epoch_over_2_ranks_x_2_workers(tmp_path):
    blobs = encoded_photos(17)  # 6 shards, the last one short: readers get different amounts
    _, shards = write_folder_and_shards(tmp_path, blobs)
    source = open_source(str(shards))
    units = list(source.units())
    held_out = ["00000.tar/00000"]
    served: dict[int, list[tuple[int, str]]] = {}
    for rank in range(2):
        dataset = StreamedImages(source, units, 32, 3, held_out=held_out, rank=rank, world_size=2, seed=3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
        batches = iter(loader)
        for _ in range(16):  # 32 samples per rank: every reader well into its second epoch
            batch = next(batches)
            for consumer, epoch, key in zip(batch["consumer"].tolist(), batch["epoch"].tolist(), batch["key"]):
                served.setdefault(consumer, []).append((epoch, key))
            assert batch["pixel_values"].shape == (2, 3, 32, 32)
            assert -1 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1
        del batches
    assert sorted(served) == [0, 1, 2, 3]
    everything = {f"{i // PER_SHARD:05d}.tar/{i:05d}" for i in range(len(blobs))} - set(held_out)
    for epoch in (0, 1):
        keys = [key for consumer in served.values() for e, key in consumer if e == epoch]
        assert len(keys) == len(set(keys)), f"a sample was read twice in epoch {epoch}"
        assert set(keys) == everything, f"epoch {epoch} missed {sorted(everything - set(keys))}"
    # Each reader takes whole shards, a different set each epoch.
    shards_of = {c: {(e, k.split("/")[0]) for e, k in samples} for c, samples in served.items()}
    assert all(len({s for e, s in shards_of[c] if e == 0}) >= 1 for c in served)
    assert [sorted(s for e, s in shards_of[c] if e == 0) for c in sorted(served)] != [
        sorted(s for e, s in shards_of[c] if e == 1) for c in sorted(served)
    ]


@pytest.mark.slow
def test_two_processes_give_the_result_of_one_on_streamed_shards(data, tmp_path):
    config, _, shards = data
    steps = ("--max_train_steps", "4")
    # One process reading with 2 DataLoader workers and 2 accumulation steps has the same 2 readers as 2
    # processes with none: micro-step k of the one is rank k of the two (same samples, same crops, same noise).
    one = training.main(
        train_args(config, tmp_path / "one", str(shards), *steps)
        + ["--dataloader_num_workers", "2", "--gradient_accumulation_steps", "2"]
    )
    # `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate >= 1.x only starts several CPU
    # processes through mpirun); --multi_gpu with ACCELERATE_USE_CPU starts 2 through torchrun, on gloo.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()),
         str(REPO / "scripts" / "finetune_vae.py"), *train_args(config, tmp_path / "two", str(shards), *steps),
         "--checkpointing_steps", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-10000:]
    assert "x 2 processes" in result.stdout  # really two
    assert [row["step"] for row in read_jsonl(tmp_path / "two" / "train_log.jsonl")] == [1, 2, 3, 4]
    # Each checkpoint holds both ranks' stream positions (gathered from the two processes).
    state = json.loads((tmp_path / "two" / "checkpoint-2" / "data_state.json").read_text())
    assert state["processes"] == 2 and state["batches"] == {"0": 2, "1": 2}
    assert {c: p[0] for c, p in state["positions"].items()} == {"0": 0, "1": 0}
    # The gradient is the mean of the same two micro-batch gradients, summed in another order (accumulation vs
    # gloo's all-reduce): float32 rounding, about 1e-7 relative per step, which AdamW's 4 steps of lr 1e-3 keep
    # far below 1e-5 (measured: bit-identical). A wrong split (other samples) moves weights by ~1e-3.
    final_one = load_file(str(one / "diffusion_pytorch_model.safetensors"))
    final_two = load_file(str(tmp_path / "two" / "diffusion_pytorch_model.safetensors"))
    from accelerate.utils import set_seed

    set_seed(0)  # as the trainer does before building the model from its config
    start = training.load_vae(training.parse_args(["--model_config", str(config), "--report_to", "none"]))
    start = start.state_dict()
    moved = max((final_one[k] - start[k]).abs().max().item() for k in final_one)
    assert moved > 1e-3  # it trained
    for key, value in final_one.items():
        torch.testing.assert_close(final_two[key], value, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- exact resume
def test_resume_on_shards_continues_with_identical_losses(data, tmp_path):
    config, _, shards = data
    # 2 readers (workers) of ~5 samples an epoch, batch 2: both cross into epoch 1 within 6 steps, and the stop
    # after step 3 leaves each in the middle of its shuffle buffer.
    common = ("--dataloader_num_workers", "2", "--checkpointing_steps", "3", "--use_ema")
    whole = training.main(train_args(config, tmp_path / "whole", str(shards), *common, "--max_train_steps", "6"))
    part = training.main(train_args(config, tmp_path / "part", str(shards), *common, "--max_train_steps", "3"))
    state = json.loads((part / "checkpoint-3" / "data_state.json").read_text())
    assert state["processes"] == 1 and state["workers"] == 2 and set(state["positions"]) == {"0", "1"}
    assert state["batches"] == {"0": 3}  # the next batch is worker 1's turn
    resumed = training.main(
        train_args(config, part, str(shards), *common, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    )
    expected, got = losses(whole), losses(resumed)
    assert got[::3] == [1, 2, 3, 4, 5, 6]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    final_whole = load_file(str(whole / "diffusion_pytorch_model.safetensors"))
    final_resumed = load_file(str(resumed / "diffusion_pytorch_model.safetensors"))
    for key, value in final_whole.items():
        torch.testing.assert_close(final_resumed[key], value, rtol=1e-5, atol=1e-6)

    # The readers' layout is part of the position: another one refuses to resume instead of replaying wrongly.
    with pytest.raises(ValueError, match="same accelerate launch"):
        training.main(
            train_args(config, part, str(shards), "--checkpointing_steps", "3", "--max_train_steps", "7",
                       "--resume_from_checkpoint", str(part / "checkpoint-3"))
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------- bad inputs
def test_corrupt_members_are_skipped_and_listed_without_stopping(tmp_path, data, capsys):
    config, _, _ = data
    blobs = encoded_photos(8)
    _, shards = write_folder_and_shards(tmp_path, blobs)
    # A member that is not an image, and a truncated JPEG (its header reads, its pixels do not).
    truncated = next(b for b in blobs if not b.startswith(b"\x89PNG"))[:400]
    write_tar(
        shards / "00003.tar",
        [("00100.jpg", b"this is not an image"), ("00101.jpg", truncated), ("00102.png", blobs[1])],
    )
    # A tar cut in the middle of a member: the samples before the break are kept, the break is listed.
    whole = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(whole[: len(whole) // 2])
    out = training.main(train_args(config, tmp_path / "run", str(shards), "--max_train_steps", "6"))
    assert [row["step"] for row in read_jsonl(out / "train_log.jsonl")] == [1, 2, 3, 4, 5, 6]
    skipped = read_jsonl(out / SKIPPED_FILE)
    by_source = {row["source"]: row for row in skipped}
    assert by_source["00003.tar/00100"]["kind"] == "unreadable"
    assert "not an image" in by_source["00003.tar/00100"]["reason"]
    assert by_source["00003.tar/00101"]["kind"] == "unreadable"
    assert "truncated" in by_source["00003.tar/00101"]["reason"]
    assert "tar broken" in by_source["00001.tar"]["reason"]
    assert all(row["epoch"] >= 0 for row in skipped)
    assert len(skipped) == len({(row["epoch"], row["source"]) for row in skipped})  # each listed once per epoch
    assert f"Skipped {len(skipped)} inputs" in capsys.readouterr().out


def test_a_missing_package_gives_the_install_hint_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed
    with pytest.raises(SystemExit) as exit_info:
        training.parse_args(["--train_data_dir", "s3://bucket/shards/{000..009}.tar", "--report_to", "none"])
    assert exit_info.value.code == 2
    assert 'pip install "diffusers-vae-ext[s3]"' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        training.parse_args(["--train_data_dir", str(tmp_path), "--storage_options", "[1, 2]"])
    assert "JSON object" in capsys.readouterr().err


def test_too_few_shards_for_the_readers_fails_before_training(data, tmp_path):
    config, _, shards = data
    with pytest.raises(ValueError, match="4 units of training data for 5 readers"):
        training.main(train_args(config, tmp_path / "run", str(shards), "--dataloader_num_workers", "5"))


def test_video_folder_streams_clips_cut_as_the_cache_cuts_them(tmp_path):
    pytest.importorskip("av", reason="videos need PyAV (pip install 'diffusers-vae-ext[video]')")
    from diffusers_vae_ext.cache.sources import read_unit_items
    from diffusers_vae_ext.video import ClipOptions, clips_from_file, write_pan_zoom_video

    root = tmp_path / "videos"
    root.mkdir()
    for name in ("astronaut", "chelsea", "coffee"):
        write_pan_zoom_video(root / f"{name}.mp4", name, num_frames=20, size=(48, 64))
    write_pan_zoom_video(root / "short.mp4", "rocket", num_frames=4, size=(48, 64))  # too short for 9 frames
    args = training.parse_args(
        ["--train_data_dir", str(root), "--num_frames", "9", "--frame_stride", "2", "--output_dir", str(tmp_path / "o"),
         "--report_to", "none", "--resolution", "32"]
    )  # fmt: skip
    train, validation, description = training.training_images(args)
    assert "4 videos" in description and "streamed as clips of 9 frames" in description
    assert train.held_out == ["astronaut.mp4"]
    with pytest.raises(ValueError, match="needs --num_frames"):
        training.training_images(training.parse_args(["--train_data_dir", str(root), "--report_to", "none"]))
    held_out_clips = training.validation_batch(validation, 32, 3, 4)
    assert held_out_clips.shape == (1, 3, 9, 32, 32)
    options = ClipOptions(num_frames=9, frame_stride=2)
    dataset = StreamedImages(
        train.source, train.units, 32, 3, held_out=train.held_out, clip_options=options, output_dir=tmp_path / "o"
    )
    samples = dataset.consumer_stream(0, 1)
    first_epoch = [next(samples) for _ in range(2)]
    assert sorted(s["key"] for s in first_epoch) == ["chelsea.mp4#clip0", "coffee.mp4#clip0"]
    for sample in first_epoch:
        assert sample["pixel_values"].shape == (3, 9, 32, 32)  # (C, T, H, W), collated to (N, C, T, H, W)
        # The frames the cache and stats would take for this clip: every other frame from 0.
        path = str(root / sample["key"].split("#")[0])
        label = sample["key"].split("#")[0]
        clip = clips_from_file(path, options, 1, label)[0]
        assert clip.frame_indices == tuple(range(0, 18, 2))
    skipped = read_jsonl(tmp_path / "o" / SKIPPED_FILE)
    assert [(row["source"], row["kind"]) for row in skipped] == [("short.mp4", "too_short")]
    assert next(iter(read_unit_items(train.source, train.units[0]))).extra["path"].endswith(".mp4")


# ------------------------------------------------------------------------------------------ a video class
@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny AutoencoderKLWan config and five real mp4s (a camera panning and zooming over five photos, 12
    frames, two 5-frame clips each); the first video is held out for validation."""
    pytest.importorskip("av", reason="videos need PyAV (pip install 'diffusers-vae-ext[video]')")
    from autoencoder_configs import TINY_CONFIGS

    from diffusers_vae_ext.video import write_pan_zoom_video

    root = tmp_path_factory.mktemp("videos")
    config = root / "wan.json"
    config.write_text(json.dumps({"_class_name": "AutoencoderKLWan", **TINY_CONFIGS["AutoencoderKLWan"]}))
    for photo in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"):
        write_pan_zoom_video(root / "clips" / f"{photo}.mp4", photo, num_frames=12, size=(48, 48))
    return config, root / "clips"


def video_args(config: Path, output_dir: Path, folder: Path, *extra: str) -> list[str]:
    """A video class on a video folder: clips of 5 frames, 2 per video, one video per unit (4 training units)."""
    args = train_args(config, output_dir, str(folder), "--num_frames", "5", "--clips_per_video", "2", *extra)
    args[args.index("--unit_size") + 1] = "1"
    return args


def test_a_video_class_reads_each_clip_once_per_epoch_over_2_ranks(videos, tmp_path):
    config, folder = videos
    args = training.parse_args(video_args(config, tmp_path / "o", folder))
    train, validation, _ = training.training_images(args, True, 4, "AutoencoderKLWan")
    assert train.held_out == ["astronaut.mp4"] and len(train.units) == 5
    assert [clip.clip_id for clip in validation] == ["astronaut.mp4:clip0"]  # --num_validation_images 1
    served = []
    for rank in range(2):  # what each of 2 processes reads (consumer = rank without DataLoader workers)
        dataset = StreamedImages(
            train.source, train.units, 32, 3, held_out=train.held_out, rank=rank, world_size=2,
            clip_options=train.clip_options, frame_multiple=4, random_flip=True,
        )  # fmt: skip
        for sample in dataset.consumer_stream(rank, 2):
            if sample["epoch"] > 0:
                break
            assert sample["pixel_values"].shape == (3, 5, 32, 32)
            served.append((rank, sample["key"]))
    keys = [key for _, key in served]
    expected = {f"{name}.mp4#clip{k}" for name in ("chelsea", "coffee", "rocket", "hubble_deep_field") for k in (0, 1)}
    assert sorted(keys) == sorted(expected)  # every training clip once, none twice, the held-out video never
    assert {rank for rank, _ in served} == {0, 1}
    by_video = {key.split("#")[0]: rank for rank, key in served}
    assert all(by_video[key.split("#")[0]] == rank for rank, key in served)  # a video's clips stay with its reader


@pytest.mark.slow
def test_two_processes_give_the_result_of_one_on_a_video_class(videos, tmp_path):
    config, folder = videos
    steps = ("--max_train_steps", "3", "--train_batch_size", "1")
    # As for shards: 1 process with 2 DataLoader workers and 2 accumulation steps has the readers of 2 processes.
    one = training.main(
        video_args(config, tmp_path / "one", folder, *steps, "--dataloader_num_workers", "2",
                   "--gradient_accumulation_steps", "2")
    )  # fmt: skip
    launch, launch_env = cpu_launch(2, port=free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **launch_env}
    result = subprocess.run(
        [*launch, str(REPO / "scripts" / "finetune_vae.py"),
         *video_args(config, tmp_path / "two", folder, *steps, "--checkpointing_steps", "3")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-10000:]
    assert "AutoencoderKLWan" in result.stdout and "x 2 processes" in result.stdout  # really two
    # Both ranks' stream positions are in the checkpoint (3 batches each, gathered from the two processes).
    state = json.loads((tmp_path / "two" / "checkpoint-3" / "data_state.json").read_text())
    assert state["processes"] == 2 and set(state["positions"]) == {"0", "1"}
    assert state["batches"] == {"0": 3, "1": 3}
    # The logs cannot be compared (one process logs its 2nd micro-batch's loss, two log rank 0's): the weights
    # are. The same clips meet the same noise (gradient norms equal to 8 digits); what differs is float32
    # rounding (accumulation vs gloo's all-reduce), which AdamW turns into at most a few % of one step (lr 1e-3)
    # where a gradient is near zero: measured 5e-6 after 3 steps. Other clips move the weights by 2e-3 to 6e-3.
    final_one = load_file(str(one / "diffusion_pytorch_model.safetensors"))
    final_two = load_file(str(tmp_path / "two" / "diffusion_pytorch_model.safetensors"))
    start = build_start(config)
    assert max((final_one[k] - start[k]).abs().max().item() for k in final_one) > 1e-3  # it trained
    for key, value in final_one.items():
        torch.testing.assert_close(final_two[key], value, rtol=0, atol=5e-5)


def build_start(config: Path) -> dict[str, torch.Tensor]:
    """The weights the trainer starts from with `--model_config config` (seed 0)."""
    from accelerate.utils import set_seed

    set_seed(0)  # as the trainer does before building the model from its config
    return training.load_vae(training.parse_args(["--model_config", str(config), "--report_to", "none"])).state_dict()


def test_an_unreadable_video_is_skipped_and_listed_without_stopping(videos, tmp_path, capsys):
    config, folder = videos
    shutil.copytree(folder, tmp_path / "clips")
    # First in the listing (where the held-out video is picked: it is passed over), and not a video at all.
    (tmp_path / "clips" / "aaa_broken.mp4").write_bytes(b"this is not a video")
    from diffusers_vae_ext.video import write_pan_zoom_video

    write_pan_zoom_video(tmp_path / "clips" / "short.mp4", "coffee", num_frames=3, size=(48, 48))  # < 5 frames
    out = training.main(video_args(config, tmp_path / "run", tmp_path / "clips", "--max_train_steps", "5"))
    assert [row["step"] for row in read_jsonl(out / "train_log.jsonl")] == [1, 2, 3, 4, 5]
    recipe = json.loads((out / "training_recipe.json").read_text())
    assert recipe["data"]["held_out"] == ["astronaut.mp4"]
    skipped = read_jsonl(out / SKIPPED_FILE)
    by_source = {row["source"]: row for row in skipped}
    assert by_source["aaa_broken.mp4"]["kind"] == "unreadable" and by_source["short.mp4"]["kind"] == "too_short"
    assert len(skipped) == len({(row["epoch"], row["source"]) for row in skipped})  # each listed once per epoch
    assert f"Skipped {len(skipped)} inputs" in capsys.readouterr().out


def test_the_recipe_describes_the_data_without_credentials(data):
    from diffusers_vae_ext.training.data import describe_training_data

    _, folder, shards = data
    args = training.parse_args(
        ["--train_data_dir", str(shards), "--report_to", "none", "--num_validation_images", "1"]
    )
    train, _, _ = training.training_images(args)
    args.storage_options = {
        "endpoint_url": "http://x",
        "key": "AKIASECRET",
        "client_kwargs": {"aws_session_token": "t"},
    }
    record = describe_training_data(args, train)
    text = json.dumps(record)
    assert "AKIASECRET" not in text and '"t"' not in text and "http://x" in text
    assert record["type"] == "webdataset" and record["read"] == "streamed" and record["num_units"] == 4
    assert record["held_out"] == ["00000.tar/00000"]
    args = training.parse_args(["--train_data_dir", str(folder), "--report_to", "none"])
    train, _, _ = training.training_images(args)
    assert describe_training_data(args, train)["read"] == "map-style"
