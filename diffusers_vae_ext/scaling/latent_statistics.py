"""`LatentStatistics`: streaming, mergeable float64 statistics of VAE latents with per-image standard errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .apply import CONVENTIONS


class LatentStatistics:
    r"""Streaming, mergeable statistics of VAE latents, in float64: everything a scaling convention needs.

    Feed it latent batches of shape (N, C, h, w) (more trailing dimensions are allowed, e.g. video) with
    `update`; merge accumulators built on different data shards with `merge` (exact), or across processes with
    `all_reduce(accelerator)` / `gather(accelerator)`.

    **What is accumulated.** Per channel c: the count n of latent elements, the mean and M2 = sum (z - mean)^2,
    updated with Chan et al.'s parallel formula (a batch's own mean and M2 are computed in two passes, then
    merged), which stays exact where the one-pass `E[z^2] - E[z]^2` loses every digit to cancellation. The
    statistics over all channels follow from the per-channel ones, between-channel term included:
    `mean = avg_c mean_c`, `M2 = sum_c M2_c + n * sum_c (mean_c - mean)^2`. Standard deviations divide by the
    count (population std); at the millions of elements a factor is estimated from, dividing by n - 1 instead
    changes nothing that is printed.

    **The numbers a config needs** (see `config_updates` and `docs/scaling.md`):

    - `scaling_factor = 1 / std`, std taken about the mean. In the "scale" convention (SD 1.x/2.x/SDXL, the
      latent-diffusion recipe) `z * scaling_factor` then has std 1 and keeps its mean `mean * scaling_factor`.
    - `shift_factor = mean` (SD3/FLUX convention). `(z - shift_factor) * scaling_factor` has mean 0 and std 1.
      The factor is the same number in both conventions, because the std is already taken about the mean:
      `1 / std(z - shift) == 1 / std(z)`.
    - `channel_mean` / `channel_std` (`latents_mean` / `latents_std` in a config): `(z - mean_c) / std_c` has
      mean 0 and std 1 in every channel.

    **Standard errors: images, not pixels, are the independent units.** Latent elements of one image are
    strongly correlated (neighbouring pixels, a shared colour cast, the same scene), so treating the
    `N * C * h * w` elements as independent draws would understate the error by the square root of the
    design effect, often 10x or more, and make a few images look like plenty. Instead every estimate here is
    treated as a function of per-image sums, and its error is the cluster-robust (linearisation, or delta
    method) standard error over images: for image i with sums `S1_ic = sum z`, `S2_ic = sum z^2` over `P_i`
    elements per channel, the variance estimate's influence is `r_i = sum_c sum_j (z_ijc - mean)^2 - C P_i var`,
    and `Var(var_hat) = K / (K - 1) * sum_i r_i^2 / (C sum_i P_i)^2` over K images. The r_i are linear in the
    vector `(P_i, S1_i, S2_i)`, so streaming the mean and the centred co-moment matrix of those vectors
    (Chan's formula again, about a fixed reference shift for precision) gives the exact `sum_i r_i^2` without
    storing anything per image. Posterior-sample noise and image-to-image variation are both included. The
    error of `scaling_factor = var^(-1/2)` follows by the delta method: `se(s) = s * se(var) / (2 var)`. It
    needs at least two images (NaN before) and assumes the images are a random sample of the data the
    diffusion model will see; rule of thumb: a relative error below 1% is plenty for a scaling factor.

    Args:
        num_channels (`int`, *optional*): latent channels; taken from the first batch when not given.
        sample_posterior (`bool`, *optional*): only a label saying whether the latents are posterior samples
            (`True`, the LDM recipe) or posterior means (`False`); merging statistics with different labels
            is refused.
    """

    def __init__(self, num_channels: int | None = None, sample_posterior: bool | None = None):
        self.num_channels = num_channels
        self.sample_posterior = sample_posterior
        self._count = 0  # latent elements per channel
        self._num_images = 0
        self._channel_mean: torch.Tensor | None = None
        self._channel_m2: torch.Tensor | None = None
        # Per-image vectors y_i = (P_i, S1_i[C], S2_i[C]) taken about `_reference`: their mean and centred
        # co-moment matrix (see the class docstring).
        self._reference: torch.Tensor | None = None
        self._image_mean: torch.Tensor | None = None
        self._image_comoment: torch.Tensor | None = None
        if num_channels is not None:
            self._allocate(num_channels)

    # ------------------------------------------------------------------------------------------ accumulation
    def _allocate(self, num_channels: int) -> None:
        if num_channels < 1:
            raise ValueError(f"num_channels must be at least 1, got {num_channels}.")
        self.num_channels = num_channels
        size = 1 + 2 * num_channels
        self._channel_mean = torch.zeros(num_channels, dtype=torch.float64)
        self._channel_m2 = torch.zeros(num_channels, dtype=torch.float64)
        self._reference = torch.zeros(num_channels, dtype=torch.float64)
        self._image_mean = torch.zeros(size, dtype=torch.float64)
        self._image_comoment = torch.zeros(size, size, dtype=torch.float64)

    @torch.no_grad()
    def update(self, latents: torch.Tensor) -> LatentStatistics:
        """Add a batch of latents of shape (N, C, h, w) (or (N, C, ...)), one image per row. Returns `self`."""
        if not isinstance(latents, torch.Tensor) or latents.ndim < 3:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"update() expects latents of shape (N, C, h, w), got {shape}.")
        if self.num_channels is None:
            self._allocate(latents.shape[1])
        if latents.shape[1] != self.num_channels:
            raise ValueError(
                f"update() got latents with {latents.shape[1]} channels, these statistics have {self.num_channels}."
            )
        if latents.shape[0] == 0 or latents[0, 0].numel() == 0:
            return self
        z = latents.detach().to(device="cpu", dtype=torch.float64).flatten(2)  # (N, C, P)
        if not torch.isfinite(z).all():
            raise ValueError(
                "update() got NaN or Inf latents. In float16 this usually means the VAE overflowed (the SDXL VAE "
                "does): encode in float32 or bfloat16, or use an fp16-safe VAE."
            )
        num_images, _, elements = z.shape
        if self._count == 0:
            # The first batch's channel means keep the per-image sums small (see _image_vectors).
            self._reference = z.mean(dim=(0, 2))
        batch_count = num_images * elements
        batch_mean = z.mean(dim=(0, 2))
        batch_m2 = (z - batch_mean[None, :, None]).square().sum(dim=(0, 2))
        self._channel_mean, self._channel_m2 = _chan_merge(
            self._count, self._channel_mean, self._channel_m2, batch_count, batch_mean, batch_m2
        )
        self._count += batch_count

        vectors = self._image_vectors(z)
        vectors_mean = vectors.mean(dim=0)
        centred = vectors - vectors_mean
        self._image_mean, self._image_comoment = _chan_merge(
            self._num_images, self._image_mean, self._image_comoment, num_images, vectors_mean, centred.T @ centred
        )
        self._num_images += num_images
        return self

    def _image_vectors(self, z: torch.Tensor) -> torch.Tensor:
        shifted = z - self._reference[None, :, None]
        elements = torch.full((z.shape[0], 1), float(z.shape[2]), dtype=torch.float64)
        return torch.cat([elements, shifted.sum(dim=2), shifted.square().sum(dim=2)], dim=1)

    def merge(self, other: LatentStatistics) -> LatentStatistics:
        """Add the data summarised by `other` (exact: as if its batches had been fed to `self`). Returns `self`."""
        if not isinstance(other, LatentStatistics):
            raise TypeError(f"merge() expects LatentStatistics, got {type(other).__name__}.")
        if None not in (self.sample_posterior, other.sample_posterior) and (
            self.sample_posterior != other.sample_posterior
        ):
            raise ValueError("Cannot merge statistics of posterior samples with statistics of posterior means.")
        if self.sample_posterior is None:
            self.sample_posterior = other.sample_posterior
        if other.num_channels is None:
            return self
        if self.num_channels is None:
            self._allocate(other.num_channels)
        if other.num_channels != self.num_channels:
            raise ValueError(f"Cannot merge statistics of {other.num_channels} and {self.num_channels} channels.")
        if other._count == 0:
            return self
        if self._count == 0:
            self._reference = other._reference.clone()
        self._channel_mean, self._channel_m2 = _chan_merge(
            self._count, self._channel_mean, self._channel_m2, other._count, other._channel_mean, other._channel_m2
        )
        self._count += other._count
        other_mean, other_comoment = other._image_moments_about(self._reference)
        self._image_mean, self._image_comoment = _chan_merge(
            self._num_images, self._image_mean, self._image_comoment, other._num_images, other_mean, other_comoment
        )
        self._num_images += other._num_images
        return self

    def _image_moments_about(self, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and co-moment of the per-image vectors re-expressed about another reference shift.

        With d = old - new reference: S1' = S1 + P d and S2' = S2 + 2 d S1 + P d^2, a linear map A of the vector,
        so the mean maps to A mean and the co-moment to A M A^T.
        """
        channels = self.num_channels
        d = self._reference - reference
        if not torch.any(d):
            return self._image_mean, self._image_comoment
        transform = torch.eye(1 + 2 * channels, dtype=torch.float64)
        s1 = torch.arange(1, 1 + channels)
        s2 = s1 + channels
        transform[s1, 0] = d
        transform[s2, 0] = d.square()
        transform[s2, s1] = 2 * d
        return transform @ self._image_mean, transform @ self._image_comoment @ transform.T

    # ------------------------------------------------------------------------------------------ processes
    def gather(self, accelerator: Any) -> LatentStatistics:
        """Statistics of the data seen by all processes, merged in rank order (same on every rank).

        `accelerator`: an `accelerate.Accelerator` or `accelerate.PartialState` (None or a single process: a
        copy of `self`). Each rank's state travels as one small float64 tensor through `gather`; merging in rank
        order makes the result identical on every rank and equal to a single-process run up to float64
        rounding. Every rank must call it.
        """
        merged = LatentStatistics(sample_posterior=self.sample_posterior)
        if accelerator is None or getattr(accelerator, "num_processes", 1) == 1:
            return merged.merge(self)
        gather = getattr(accelerator, "gather", None)
        if gather is None:
            from accelerate.utils import gather
        device = accelerator.device
        # Ranks that saw no data may not know the channel count yet: agree on it first.
        channels = gather(torch.tensor([float(self.num_channels or 0)], dtype=torch.float64, device=device))
        known = sorted({int(c) for c in channels.tolist() if c > 0})
        if len(known) > 1:
            raise ValueError(f"Processes saw latents with different channel counts: {known}.")
        num_channels = known[0] if known else None
        if num_channels is None:
            return merged
        packed = self._pack(num_channels).to(device)
        rows = gather(packed[None]).cpu()
        for row in rows:
            merged.merge(LatentStatistics._unpack(row, num_channels))
        return merged

    def all_reduce(self, accelerator: Any) -> LatentStatistics:
        """In-place `gather`: afterwards `self` holds the statistics of all processes. Returns `self`."""
        self.__dict__.update(self.gather(accelerator).__dict__)
        return self

    _LABELS = {None: -1.0, False: 0.0, True: 1.0}

    def _pack(self, num_channels: int) -> torch.Tensor:
        state = self if self.num_channels is not None else LatentStatistics(num_channels)
        header = torch.tensor(
            [state._count, state._num_images, self._LABELS[self.sample_posterior]], dtype=torch.float64
        )
        parts = [
            header,
            state._channel_mean,
            state._channel_m2,
            state._reference,
            state._image_mean,
            state._image_comoment.flatten(),
        ]
        return torch.cat(parts)

    @classmethod
    def _unpack(cls, row: torch.Tensor, num_channels: int) -> LatentStatistics:
        label = {v: k for k, v in cls._LABELS.items()}[float(row[2])]
        stats = cls(num_channels, sample_posterior=label)
        stats._count, stats._num_images = int(row[0]), int(row[1])
        sizes = [num_channels] * 3 + [1 + 2 * num_channels, (1 + 2 * num_channels) ** 2]
        channel_mean, channel_m2, reference, image_mean, comoment = row[3:].split(sizes)
        stats._channel_mean, stats._channel_m2, stats._reference = channel_mean, channel_m2, reference
        stats._image_mean, stats._image_comoment = image_mean, comoment.view(len(image_mean), -1)
        return stats

    # ------------------------------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """The full state as JSON-serialisable Python numbers (float64 survives JSON exactly)."""
        state: dict[str, Any] = {
            "num_channels": self.num_channels,
            "sample_posterior": self.sample_posterior,
            "count": self._count,
            "num_images": self._num_images,
        }
        if self.num_channels is not None:
            state.update(
                channel_mean=self._channel_mean.tolist(),
                channel_m2=self._channel_m2.tolist(),
                reference=self._reference.tolist(),
                image_mean=self._image_mean.tolist(),
                image_comoment=self._image_comoment.tolist(),
            )
        return state

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> LatentStatistics:
        """Inverse of `to_dict`."""
        stats = cls(state["num_channels"], sample_posterior=state.get("sample_posterior"))
        stats._count, stats._num_images = int(state["count"]), int(state["num_images"])
        if stats.num_channels is not None:
            for key in ("channel_mean", "channel_m2", "reference", "image_mean", "image_comoment"):
                setattr(stats, f"_{key}", torch.tensor(state[key], dtype=torch.float64))
        return stats

    # ------------------------------------------------------------------------------------------ results
    def _require_data(self) -> None:
        if self._count == 0:
            raise ValueError("No latents have been added to these statistics yet.")

    @property
    def count(self) -> int:
        """Latent elements seen per channel (images x h x w)."""
        return self._count

    @property
    def num_images(self) -> int:
        """Images (rows of the latent batches) seen."""
        return self._num_images

    @property
    def channel_mean(self) -> torch.Tensor:
        """Per-channel mean, float64 (C,): `latents_mean` of a config."""
        self._require_data()
        return self._channel_mean.clone()

    @property
    def channel_var(self) -> torch.Tensor:
        """Per-channel variance about the channel mean (divided by the count), float64 (C,)."""
        self._require_data()
        return self._channel_m2 / self._count

    @property
    def channel_std(self) -> torch.Tensor:
        """Per-channel standard deviation, float64 (C,): `latents_std` of a config."""
        return self.channel_var.sqrt()

    @property
    def mean(self) -> float:
        """Mean over all channels and positions."""
        return float(self.channel_mean.mean())

    @property
    def var(self) -> float:
        """Variance over all channels and positions about `mean`, between-channel term included."""
        channel_mean = self.channel_mean
        m2 = self._channel_m2.sum() + self._count * (channel_mean - channel_mean.mean()).square().sum()
        return float(m2 / (self._count * self.num_channels))

    @property
    def std(self) -> float:
        """Standard deviation over all channels and positions (about `mean`)."""
        return self.var**0.5

    @property
    def scaling_factor(self) -> float:
        """`1 / std`: makes `z * s` (scale convention) or `(z - shift_factor) * s` (shift convention) unit-std."""
        return 1.0 / self.std

    @property
    def shift_factor(self) -> float:
        """`mean`: the SD3/FLUX shift, subtracted before multiplying by `scaling_factor`."""
        return self.mean

    def _residual_sum_of_squares(self, coefficients: torch.Tensor) -> float:
        """sum_i (g . y_i)^2 over images, from the streamed mean and co-moment of the vectors y_i."""
        g = coefficients
        return float(g @ self._image_comoment @ g + self._num_images * (g @ self._image_mean) ** 2)

    def _stderr(self, coefficients: torch.Tensor, normaliser: float) -> float:
        images = self._num_images
        if images < 2:
            return float("nan")
        rss = max(self._residual_sum_of_squares(coefficients), 0.0)
        return (images / (images - 1) * rss) ** 0.5 / normaliser

    @property
    def var_stderr(self) -> float:
        """Standard error of `var`, with images as the independent units (see the class docstring)."""
        self._require_data()
        channels = self.num_channels
        offset = self.mean - self._reference  # global mean about the reference, per channel
        g = torch.cat([(offset.square().sum() - channels * self.var).view(1), -2 * offset, torch.ones(channels)])
        return self._stderr(g, channels * self._count)

    @property
    def scaling_factor_stderr(self) -> float:
        """Standard error of `scaling_factor` (delta method: `s * se(var) / (2 var)`); NaN with fewer than 2 images."""
        return self.scaling_factor * self.var_stderr / (2 * self.var)

    @property
    def shift_factor_stderr(self) -> float:
        """Standard error of `shift_factor` (the mean), images as the units; NaN with fewer than 2 images."""
        self._require_data()
        channels = self.num_channels
        offset = self.mean - self._reference
        g = torch.cat([(-offset.sum()).view(1), torch.ones(channels), torch.zeros(channels)])
        return self._stderr(g, channels * self._count)

    @property
    def channel_mean_stderr(self) -> torch.Tensor:
        """Per-channel standard errors of `channel_mean`, images as the units."""
        self._require_data()
        offset = self.channel_mean - self._reference
        errors = []
        for c in range(self.num_channels):
            g = torch.zeros(1 + 2 * self.num_channels, dtype=torch.float64)
            g[0], g[1 + c] = -offset[c], 1.0
            errors.append(self._stderr(g, self._count))
        return torch.tensor(errors, dtype=torch.float64)

    @property
    def channel_std_stderr(self) -> torch.Tensor:
        """Per-channel standard errors of `channel_std` (delta method), images as the units."""
        self._require_data()
        offset = self.channel_mean - self._reference
        var = self.channel_var
        errors = []
        for c in range(self.num_channels):
            g = torch.zeros(1 + 2 * self.num_channels, dtype=torch.float64)
            g[0], g[1 + c], g[1 + self.num_channels + c] = offset[c] ** 2 - var[c], -2 * offset[c], 1.0
            errors.append(self._stderr(g, self._count) / (2 * float(var[c]) ** 0.5))
        return torch.tensor(errors, dtype=torch.float64)

    def scaling_factor_interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Normal-approximation confidence interval of `scaling_factor` (NaNs with fewer than 2 images)."""
        from statistics import NormalDist

        half_width = NormalDist().inv_cdf(0.5 + confidence / 2) * self.scaling_factor_stderr
        return self.scaling_factor - half_width, self.scaling_factor + half_width

    def config_updates(self, convention: str = "scale") -> dict[str, Any]:
        """The VAE config values that make latents unit-variance under `convention` (see `write_latent_statistics`).

        - `"scale"`: `scaling_factor = 1 / std`; `shift_factor`, `latents_mean`, `latents_std` set to None.
        - `"shift"`: `shift_factor = mean`, `scaling_factor = 1 / std`; `latents_mean`/`latents_std` set to None.
        - `"per_channel"`: `latents_mean`, `latents_std` per channel and `scaling_factor = 1.0`, because the
          pipelines compute `(z - latents_mean) * scaling_factor / latents_std`; `shift_factor` set to None.

        Keys of the other conventions are cleared so that `scaling_convention` of the updated config (and the
        pipelines, which test the keys in their own order) use exactly the convention written.
        """
        if convention == "scale":
            return {
                "scaling_factor": self.scaling_factor,
                "shift_factor": None,
                "latents_mean": None,
                "latents_std": None,
            }
        if convention == "shift":
            return {
                "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor,
                "latents_mean": None,
                "latents_std": None,
            }
        if convention == "per_channel":
            return {
                "scaling_factor": 1.0,
                "shift_factor": None,
                "latents_mean": self.channel_mean.tolist(),
                "latents_std": self.channel_std.tolist(),
            }
        raise ValueError(f"Unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}.")

    def summary(self) -> dict[str, Any]:
        """All reported numbers as plain Python values (the JSON line of `diffusers-vae stats`)."""
        low, high = self.scaling_factor_interval(0.95)
        return {
            "scaling_factor": self.scaling_factor,
            "scaling_factor_stderr": self.scaling_factor_stderr,
            "scaling_factor_ci95": [low, high],
            "shift_factor": self.shift_factor,
            "shift_factor_stderr": self.shift_factor_stderr,
            "mean": self.mean,
            "std": self.std,
            "latents_mean": self.channel_mean.tolist(),
            "latents_std": self.channel_std.tolist(),
            "latents_mean_stderr": self.channel_mean_stderr.tolist(),
            "latents_std_stderr": self.channel_std_stderr.tolist(),
            "count": self.count,
            "num_images": self.num_images,
            "sample_posterior": self.sample_posterior,
        }

    def __repr__(self) -> str:
        if self._count == 0:
            return f"LatentStatistics(num_channels={self.num_channels}, empty)"
        return (
            f"LatentStatistics(num_images={self.num_images}, count={self.count}, mean={self.mean:.6g}, "
            f"std={self.std:.6g}, scaling_factor={self.scaling_factor:.6g} ± {self.scaling_factor_stderr:.2g})"
        )


def _chan_merge(
    count_a: int, mean_a: torch.Tensor, m2_a: torch.Tensor, count_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan et al.'s pairwise update of (mean, M2) for scalars per entry or (mean vector, co-moment matrix)."""
    if count_b == 0:
        return mean_a, m2_a
    if count_a == 0:
        return mean_b.clone(), m2_b.clone()
    total = count_a + count_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / total)
    weight = count_a * count_b / total
    correction = torch.outer(delta, delta) if m2_a.ndim == 2 else delta.square()
    return mean, m2_a + m2_b + correction * weight
