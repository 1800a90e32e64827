"""`diffusers-vae eval`: which VAE reconstructs your images best, is its latent space well scaled, is it fp16-safe.

- `runner`: the per-image loop and the aggregates (`evaluate`);
- `report`: report.html (sortable tables, worst-patch crops, heat maps), report.md;
- `fp16`: the half-precision check (`check_half_precision`);
- `inception` + `fid`: the FID Inception-v3 (safetensors) and the Frechet distance behind rFID;
- `browser`: headless Chromium screenshots of the report;

See docs/evaluation.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .fid import frechet_distance, frechet_distance_of_features
from .fp16 import check_half_precision, format_half_precision
from .inception import FIDInceptionV3, convert_inception_weights, load_inception
from .inputs import EvalVAE, load_vaes
from .report import write_html, write_markdown, write_report
from .results import EvalResult
from .runner import evaluate

__all__ = [
    "EvalResult",
    "EvalVAE",
    "FIDInceptionV3",
    "check_half_precision",
    "convert_inception_weights",
    "evaluate",
    "format_half_precision",
    "frechet_distance",
    "frechet_distance_of_features",
    "load_inception",
    "load_vaes",
    "run_eval",
    "write_html",
    "write_markdown",
    "write_report",
]


def run_eval(
    vae_specs: Sequence[str],
    output_dir: str | os.PathLike,
    device: str | None = None,
    screenshot: bool = False,
    **options: Any,
) -> EvalResult:
    """`diffusers-vae eval`: load the `--vae` specs (PATH or LABEL=PATH), evaluate, write the report, print the
    Markdown table. `options` go to `evaluate` (data source, resolution, num_images, weights, check_fp16, ...).
    With `screenshot`, also render report.html to report.png in headless Chromium (skipped with a message when no
    browser is installed)."""
    import torch

    from ..cache.sources import check_source_dependencies

    # A missing optional package for the images (webdataset, s3fs, datasets, ...): the hint before loading a VAE.
    check_source_dependencies(options.get("train_data_dir"), options.get("dataset_name"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vaes = load_vaes(vae_specs, device=device)
    result = evaluate(vaes, output_dir, **options)
    paths = write_report(result)
    print(write_markdown(result))
    for vae in result.vaes:
        for report in vae.half_precision:
            print(f"{vae.label} {report.dtype}: {report.verdict}")
    if result.skipped:
        print(f"Skipped {len(result.skipped)} unreadable images (listed in the report).")
    print(f"Report: {paths['html']} (rows: {Path(output_dir) / 'metrics.csv'})")
    if screenshot:
        from .browser import BrowserError, screenshot_html

        try:
            print(f"Screenshot: {screenshot_html(paths['html'], Path(output_dir) / 'report.png')}")
        except BrowserError as err:
            print(f"No screenshot: {err} Install Chromium (e.g. apt-get install chromium).")
    return result
