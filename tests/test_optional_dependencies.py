"""Every optional dependency, missing, gives its install hint before any work starts (issue 18).

A package is hidden by `sys.modules[name] = None` (its import then raises ModuleNotFoundError, as when it is not
installed). Each test calls a real entry point (the CLI's `main`, or the library function a user calls) with an
input that needs the package and checks: exit code 2 with the pip command in the message, no model loaded (a spy
on the model loaders), nothing written. The same call with the package present gets past the check: it reaches
the model loader (the spy raises `ModelLoadReached` there), so the check cannot pass by accident.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import diffusers_vae_ext.autoencoders
import diffusers_vae_ext.cache.writer
import diffusers_vae_ext.evaluation.inputs
import diffusers_vae_ext.stats
from diffusers_vae_ext import optional
from diffusers_vae_ext.cli import main
from diffusers_vae_ext.data import sample_photos
from diffusers_vae_ext.optional import OPTIONAL_DEPENDENCIES, MissingDependencyError, require, require_filesystem

ROOT = Path(__file__).resolve().parents[1]


class ModelLoadReached(Exception):
    """Raised by the spy in place of loading a model: the command got past its dependency checks."""


@pytest.fixture
def model_spy(monkeypatch) -> list[str]:
    """Replace every model / config loader a command reaches first; the list records who was reached."""
    calls: list[str] = []

    def reached(name):
        def loader(*args, **kwargs):
            calls.append(name)
            raise ModelLoadReached(name)

        return loader

    monkeypatch.setattr(diffusers_vae_ext.cache.writer, "load_autoencoder", reached("cache"))
    monkeypatch.setattr(diffusers_vae_ext.stats, "_current_config", reached("stats"))
    monkeypatch.setattr(diffusers_vae_ext.stats, "load_autoencoder", reached("stats"))
    monkeypatch.setattr(diffusers_vae_ext.evaluation.inputs, "load_autoencoder", reached("eval"))
    monkeypatch.setattr(diffusers_vae_ext.autoencoders, "load_autoencoder", reached("reconstruct"))
    return calls


def hide(monkeypatch, name: str) -> None:
    """Make `import name` fail as if the package were not installed."""
    monkeypatch.setitem(sys.modules, name, None)


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    sample_photos()["coffee"].resize((32, 32)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Small real inputs of each kind (listing them is all a check may do)."""
    root = tmp_path_factory.mktemp("inputs")
    tars = root / "tars"
    tars.mkdir()
    data = _jpeg()
    for number in range(2):
        with tarfile.open(tars / f"{number:04d}.tar", "w") as tar:
            info = tarfile.TarInfo(f"{number:06d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    parquet = root / "parquet"
    parquet.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [data], "text": ["coffee"]}), parquet / "a.parquet")
    videos = root / "videos"
    videos.mkdir()
    from diffusers_vae_ext.video import write_pan_zoom_video

    write_pan_zoom_video(videos / "clip.mp4", num_frames=5, size=(32, 32))
    images = root / "images"
    images.mkdir()
    sample_photos()["chelsea"].resize((32, 32)).save(images / "chelsea.png")
    import datasets

    datasets.Dataset.from_dict({"image": [data]}).save_to_disk(str(root / "dataset"))
    return {
        "tars": tars,
        "parquet": parquet,
        "videos": videos,
        "images": images,
        "dataset": root / "dataset",
        "video_file": videos / "clip.mp4",
    }


# (hidden module, CLI arguments given the inputs and an output folder, words the hint must contain)
CASES = {
    "brace pattern": (
        "braceexpand",
        lambda i, out: [
            "cache",
            "--vae",
            "v",
            "--train_data_dir",
            f"{i['tars']}/{{0000..0001}}.tar",
            "--output_dir",
            out,
        ],
        "brace pattern",
    ),
    "webdataset folder": (
        "webdataset",
        lambda i, out: ["cache", "--vae", "v", "--train_data_dir", str(i["tars"]), "--output_dir", out],
        "webdataset",
    ),
    "webdataset glob (eval)": (
        "webdataset",
        lambda i, out: ["eval", "--vae", "v", "--train_data_dir", f"{i['tars']}/*.tar", "--output_dir", out],
        "webdataset",
    ),
    "parquet folder": (
        "pyarrow",
        lambda i, out: ["cache", "--vae", "v", "--train_data_dir", str(i["parquet"]), "--output_dir", out],
        ".parquet",
    ),
    "parquet file (eval)": (
        "pyarrow",
        lambda i, out: ["eval", "--vae", "v", "--train_data_dir", f"{i['parquet']}/a.parquet", "--output_dir", out],
        ".parquet",
    ),
    "s3 output": (
        "s3fs",
        lambda i, out: ["cache", "--vae", "v", "--train_data_dir", str(i["images"]), "--output_dir", "s3://b/cache"],
        "s3://",
    ),
    "ray engine": (
        "ray",
        lambda i, out: (
            ["cache", "--vae", "v", "--train_data_dir", str(i["images"]), "--output_dir", out] + ["--engine", "ray"]
        ),
        "--engine ray",
    ),
    "datasets (cache)": (
        "datasets",
        lambda i, out: ["cache", "--vae", "v", "--dataset_name", str(i["dataset"]), "--output_dir", out],
        "--dataset_name",
    ),
    "datasets (eval)": (
        "datasets",
        lambda i, out: ["eval", "--vae", "v", "--dataset_name", str(i["dataset"]), "--output_dir", out],
        "--dataset_name",
    ),
    "video folder (cache)": (
        "av",
        lambda i, out: ["cache", "--vae", "v", "--train_data_dir", str(i["videos"]), "--output_dir", out],
        "videos",
    ),
    "video folder (stats)": (
        "av",
        lambda i, out: ["stats", "--vae", "v", "--train_data_dir", str(i["videos"])],
        "videos",
    ),
    "video file (reconstruct)": (
        "av",
        lambda i, out: ["reconstruct", str(i["video_file"]), "--vae", "v", "--output-dir", out],
        "videos",
    ),
    "video folder (reconstruct)": (
        "av",
        lambda i, out: ["reconstruct", str(i["videos"]), "--vae", "v", "--output-dir", out],
        "videos",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_missing_package_gives_its_hint_before_any_work(case, inputs, tmp_path, monkeypatch, model_spy, capsys):
    module, make_argv, words = CASES[case]
    out = tmp_path / "out"
    argv = make_argv(inputs, str(out))
    hint = OPTIONAL_DEPENDENCIES[module].install_command

    # Present: past the check, up to the model loader.
    with pytest.raises(ModelLoadReached):
        main(argv)
    assert model_spy, "the command never reached its model loader"
    model_spy.clear()
    capsys.readouterr()

    # Missing: argparse's error (usage, "error: ...", exit code 2), the hint, no model, nothing written.
    hide(monkeypatch, module)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: diffusers-vae" in err
    assert f"`{OPTIONAL_DEPENDENCIES[module].package}` is needed for" in err and "is not installed" in err
    assert hint in err and words in err
    assert model_spy == []
    assert not out.exists()


def test_gs_urls_need_gcsfs(inputs, tmp_path, monkeypatch, model_spy, capsys):
    """gcsfs is in no extra the tests install: hidden here, and a stand-in module shows the check passes."""
    argv = ["cache", "--vae", "v", "--train_data_dir", "gs://bucket/shards/", "--output_dir", str(tmp_path / "out")]
    hide(monkeypatch, "gcsfs")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'pip install "diffusers-vae-ext[gcs]"' in err and "gs:// URLs" in err
    assert model_spy == [] and not (tmp_path / "out").exists()

    monkeypatch.setitem(sys.modules, "gcsfs", type(sys)("gcsfs"))  # installed: the check passes
    require_filesystem("gs://bucket/shards/")


def test_s3_input_url_needs_s3fs_in_the_library_too(monkeypatch):
    from diffusers_vae_ext.cache import load_cache_info, open_source

    require_filesystem("s3://bucket/shards/")  # present: passes, and fsspec gives its file system without I/O
    from diffusers_vae_ext.cache.storage import url_to_fs

    assert type(url_to_fs("s3://bucket/shards/")[0]).__name__ == "S3FileSystem"
    hide(monkeypatch, "s3fs")
    for call in (
        lambda: open_source("s3://bucket/shards/{0000..0009}.tar"),
        lambda: open_source("simplecache::s3://bucket/shards/"),
        lambda: load_cache_info("s3://bucket/cache"),
    ):
        with pytest.raises(MissingDependencyError, match=r'pip install "diffusers-vae-ext\[s3\]"'):
            call()


def test_other_fsspec_protocols_get_fsspecs_own_hint(monkeypatch):
    hide(monkeypatch, "adlfs")
    with pytest.raises(MissingDependencyError, match="Install adlfs"):
        require_filesystem("az://container/images")
    require_filesystem("memory://images")  # built into fsspec
    require_filesystem("/plain/local/path")


def test_library_entry_points_raise_the_hint(inputs, monkeypatch):
    """`open_source`, `iter_source_items` and the video reader raise the same hint (an ImportError subclass)."""
    from diffusers_vae_ext.cache import iter_source_items, open_source
    from diffusers_vae_ext.video import probe_video

    assert open_source(inputs["tars"]).kind == "webdataset"
    assert open_source(inputs["videos"]).kind == "video_folder"
    assert probe_video(inputs["video_file"]).num_frames == 5
    hide(monkeypatch, "webdataset")
    hide(monkeypatch, "av")
    with pytest.raises(ImportError, match=r"webdataset.*pip install \"diffusers-vae-ext\[scale\]\""):
        list(iter_source_items(inputs["tars"]))
    with pytest.raises(MissingDependencyError, match=r"pip install \"diffusers-vae-ext\[video\]\""):
        open_source(inputs["videos"])
    with pytest.raises(MissingDependencyError, match=r"pip install \"diffusers-vae-ext\[video\]\""):
        probe_video(inputs["video_file"])


def test_a_broken_install_is_told_apart_from_a_missing_one(monkeypatch):
    import importlib

    real = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "pyarrow":
            raise ImportError("libarrow.so.1900: cannot open shared object file")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(optional.importlib, "import_module", broken)
    with pytest.raises(MissingDependencyError) as info:
        require("pyarrow", ".parquet files")
    message = str(info.value)
    assert "is installed but cannot be imported (libarrow.so.1900" in message
    assert 'pip install "diffusers-vae-ext[scale]"' in message


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]


def test_every_hint_names_an_extra_that_installs_the_package():
    """The table and pyproject.toml agree: each extra a hint names exists and lists the package."""
    extras = _extras()
    for dep in OPTIONAL_DEPENDENCIES.values():
        if dep.extra is None:
            assert dep.install_command == f"pip install {dep.package}"
            continue
        assert dep.extra in extras, f"{dep.module}: no [{dep.extra}] extra in pyproject.toml"
        assert dep.package in {_name(r) for r in extras[dep.extra]}, f"[{dep.extra}] does not install {dep.package}"


def test_the_dev_extra_installs_every_optional_package_the_tests_use():
    """README command 1 (`pip install -e ".[dev]"`) installs every optional package the tests need (issue 18)."""
    extras = _extras()
    pulled = set()
    for requirement in extras["dev"]:
        if _name(requirement) == "diffusers-vae-ext":
            pulled |= set(requirement.split("[", 1)[1].split("]", 1)[0].split(","))
    installed = {_name(r) for extra in pulled for r in extras[extra]} | {_name(r) for r in extras["dev"]}
    for module in ("braceexpand", "webdataset", "pyarrow", "fsspec", "s3fs", "ray", "av", "tensorboard", "datasets"):
        assert OPTIONAL_DEPENDENCIES[module].package in installed, f"[dev] does not install {module}"


def run_cli(argv: list[str]) -> int:
    """`main`'s exit code, whether it returns it or exits with it (argparse)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_training_report_to_tensorboard_gives_the_hint(tmp_path, monkeypatch, capsys):
    hide(monkeypatch, "tensorboard")
    code = run_cli(["train", "--output_dir", str(tmp_path / "run"), "--report_to", "tensorboard"])
    assert code == 2
    assert 'pip install "diffusers-vae-ext[tensorboard]"' in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_issues_brace_pattern_in_a_fresh_process_gives_the_hint_not_a_traceback(inputs, tmp_path):
    """The reproducer of issue 18, as a user runs it (no braceexpand installed)."""
    code = (
        "import sys; sys.modules['braceexpand'] = None\n"
        "from diffusers_vae_ext.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    pattern = f"{inputs['tars']}/{{0000..0001}}.tar"
    out = tmp_path / "out"
    argv = ["cache", "--vae", str(tmp_path / "no-vae"), "--train_data_dir", pattern, "--output_dir", str(out)]
    result = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "No module named 'braceexpand'" not in result.stderr
    assert "diffusers-vae cache: error: `braceexpand` is needed for the brace pattern" in result.stderr
    assert 'pip install "diffusers-vae-ext[scale]"' in result.stderr
    assert not out.exists()
