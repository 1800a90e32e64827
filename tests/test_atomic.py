"""The atomic-write layer and the config/weights rewrite of `stats --write_config`: a failure or kill part way
leaves the old files (all of them), never a mix or a partial file."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_vae_ext import atomic, conventions


def test_atomic_write_text_keeps_mode_and_gives_new_files_the_usual_one(tmp_path):
    path = tmp_path / "config.json"
    atomic.atomic_write_text(path, "{}\n")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    os.chmod(path, 0o640)
    atomic.atomic_write_text(path, '{"a": 1}\n')
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_sync_tree_passes_over_a_file_another_process_renamed_meanwhile(tmp_path, monkeypatch):
    # In a checkpoint two processes write, rank 1 listed rank 0's temporary `.tmpXXXX` just before rank 0 renamed
    # it (seen as a FileNotFoundError crash of a 2-process run): the listing holds a name that is gone.
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    walk = os.walk

    def listing_with_a_vanished_file(root, topdown=True):
        for folder, folders, files in walk(root, topdown=topdown):
            yield folder, folders, [".tmpNsT9vo", *files]

    monkeypatch.setattr(atomic.os, "walk", listing_with_a_vanished_file)
    synced = []
    fsync = atomic.fsync_file
    monkeypatch.setattr(atomic, "fsync_file", lambda path: (fsync(path), synced.append(os.path.basename(path))))
    atomic.sync_tree(tmp_path)
    assert synced == ["model.safetensors"]  # the files still there are flushed


def test_safetensors_problem_sees_truncated_and_padded_files(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(100.0)}, str(path))
    assert atomic.safetensors_problem(path) is None
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])
    assert "truncated" in atomic.safetensors_problem(path)
    path.write_bytes(whole[:20])
    assert "unreadable safetensors header" in atomic.safetensors_problem(path)
    path.write_bytes(whole + b"\0")
    assert "padded" in atomic.safetensors_problem(path)


def test_marker_lists_sizes_and_hashes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.txt").write_text("x")
    atomic.write_marker(tmp_path, "done.json", atomic.folder_files(tmp_path), step=3)
    assert atomic.marker_problem(tmp_path, "done.json", verify_hashes=True) is None
    (tmp_path / "a.bin").write_bytes(b"abd")  # same size, other content
    assert atomic.marker_problem(tmp_path, "done.json") is None
    assert "sha256" in atomic.marker_problem(tmp_path, "done.json", verify_hashes=True)
    (tmp_path / "sub" / "b.txt").unlink()
    assert atomic.marker_problem(tmp_path, "done.json") == "sub/b.txt is missing"


def test_weight_statistics_rewrite_is_all_or_nothing(tmp_path, monkeypatch):
    # LTX-Video-like folder whose statistics live in two weight files (a sharded checkpoint).
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"latents_mean": torch.zeros(4), "w": torch.ones(3)}, str(first))
    save_file({"latents_std": torch.ones(4)}, str(second))
    before = {p: p.read_bytes() for p in (first, second)}
    stale = tmp_path / ".a.safetensors.x1y2.tmp"  # what a kill during an earlier rewrite leaves
    stale.write_bytes(b"partial")
    updates = {"latents_mean": [1.0, 2.0, 3.0, 4.0], "latents_std": [5.0, 6.0, 7.0, 8.0]}

    import safetensors.torch

    real_save, calls = safetensors.torch.save_file, []

    def save_then_fail_on_the_second_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail_on_the_second_file)
    with pytest.raises(OSError, match="disk full"):
        conventions.write_weight_statistics(tmp_path, updates)
    assert {p: p.read_bytes() for p in (first, second)} == before  # the first new file was not swapped in alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]  # no temporaries

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    conventions.write_weight_statistics(tmp_path, updates)
    assert load_file(str(first))["latents_mean"].tolist() == updates["latents_mean"]
    assert load_file(str(first))["w"].tolist() == [1.0, 1.0, 1.0]
    assert load_file(str(second))["latents_std"].tolist() == updates["latents_std"]
