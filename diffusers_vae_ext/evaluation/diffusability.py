"""`diffusers-vae eval --diffusability`: run `diffusers_vae_ext.diffusability` on each VAE's latents of the
evaluated images, after the reconstruction rows are on disk; write the sample grids and the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .patches import IMAGES_DIR


def measure_all(
    measurements: list[Any],
    results: list[Any],
    slugs: dict[str, str],
    output_dir: Path,
    original_features: list[np.ndarray],
    inception: Any,
    probe_steps: int | None,
    probe_samples: int,
    seed: int,
    show_progress: bool,
) -> dict[str, Any]:
    """Probe every VAE (one after the other, each with the same seed and budget); fill `result.diffusability`.

    A VAE whose latents the probe cannot take (too few images, NaN) gets `{"skipped": reason}` and the report says
    why; the others are still measured. Returns the settings for the summary.
    """
    from ..diffusability import measure_diffusability
    from ..diffusability.plots import plot_loss_curves, plot_spectra
    from ..diffusability.samples import save_grid

    options: dict[str, Any] = {"seed": seed, "show_progress": show_progress}
    if probe_steps is not None:
        options["steps"] = probe_steps
    measured = {}
    for measurement, result in zip(measurements, results):
        latents, images = torch.cat(measurement.latents), torch.cat(measurement.small_images)
        measurement.latents, measurement.small_images = [], []  # free them as we go
        try:
            probe = measure_diffusability(
                latents, images=images, vae=measurement.adapter, num_samples=probe_samples, **options
            )
        except ValueError as err:
            result.diffusability = {"skipped": str(err)}
            continue
        record = probe.to_dict()
        if probe.samples is not None:
            name = f"{IMAGES_DIR}/diffusability-{slugs[result.label]}-samples.png"
            save_grid(probe.samples, output_dir / name)
            record["sample_grid"] = name
            if inception is not None and original_features and len(probe.samples) >= 2:
                from .fid import frechet_distance_of_features

                rgb = probe.samples.expand(-1, 3, -1, -1) if probe.samples.shape[1] == 1 else probe.samples
                with torch.no_grad():
                    features = inception(rgb).double().numpy()
                record["sample_fid"] = frechet_distance_of_features(np.concatenate(original_features), features)
                record["sample_fid_count"] = len(probe.samples)
        result.diffusability = record
        measured[result.label] = probe
    plots = {}
    if measured:
        plots["spectrum"] = f"{IMAGES_DIR}/diffusability-spectrum.png"
        plot_spectra(measured, output_dir / plots["spectrum"])
        plots["loss_curve"] = f"{IMAGES_DIR}/diffusability-loss.png"
        plot_loss_curves(measured, output_dir / plots["loss_curve"])
    return {"probe_steps": probe_steps, "probe_samples": probe_samples, "plots": plots}
