"""Pictures of the diffusability measurements (matplotlib, Agg backend): spectra and per-t loss curves."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .probe import DiffusabilityResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_spectra(results: Mapping[str, DiffusabilityResult], path: str | os.PathLike) -> Path:
    """Radially averaged power of each VAE's standardised latents (solid) and of its images at latent resolution
    (dashed), log-log, one colour per VAE; the legend gives each high-frequency share."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for index, (label, result) in enumerate(results.items()):
        spectrum, color = result.spectrum, f"C{index}"
        axis.loglog(spectrum.frequencies, spectrum.latent_power, color=color,
                    label=f"{label} latents (HF {spectrum.high_frequency_energy:.3f})")  # fmt: skip
        if spectrum.image_power is not None:
            axis.loglog(spectrum.frequencies, spectrum.image_power, color=color, linestyle="--",
                        label=f"{label} images (HF {spectrum.image_high_frequency_energy:.3f})")  # fmt: skip
    axis.axvline(0.25, color="0.6", linewidth=0.8)
    from matplotlib.ticker import NullFormatter

    axis.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels overlap on a short range
    axis.set_xlabel("radial frequency (cycles / latent pixel); high-frequency half right of the line")
    axis.set_ylabel("power per coefficient (standardised)")
    axis.set_title("Spectrum: latents vs images at latent resolution")
    return _save(plt, figure, axis, path)


def plot_loss_curves(results: Mapping[str, DiffusabilityResult], path: str | os.PathLike) -> Path:
    """Held-out probe loss relative to the Gaussian optimum at each t, one line per VAE (1.0 = nothing learned)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for index, (label, result) in enumerate(results.items()):
        axis.plot(result.t_grid, result.loss_curve, marker="o", color=f"C{index}",
                  label=f"{label} (probe_loss {result.probe_loss:.3f})")  # fmt: skip
    axis.axhline(1.0, color="0.6", linewidth=0.8)
    axis.set_xlabel("t (0: data, 1: noise)")
    axis.set_ylabel("held-out loss / Gaussian optimum")
    axis.set_title("Diffusability probe: lower is easier to learn")
    return _save(plt, figure, axis, path)


def _save(plt, figure, axis, path: str | os.PathLike) -> Path:
    """Legend, tight layout, PNG at `path`, figure closed (pyplot keeps every open figure alive)."""
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path
