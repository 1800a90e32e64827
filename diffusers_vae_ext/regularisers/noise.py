"""Noise-augmented decoder training (RAE, Zheng et al., arXiv:2510.11690; `--latent_noise`)."""

from __future__ import annotations

import torch
from torch import Tensor


def augment_latents(
    z: Tensor,
    sigma: float,
    generator: torch.Generator | None = None,
    *,
    relative: bool = True,
    global_batch_size: int | None = None,
    offset: int = 0,
) -> Tensor:
    """z + sigma_i * eps with sigma_i ~ U[0, sigma] drawn per sample and eps ~ N(0, I): the decoder's input in
    noise-augmented decoder training (RAE, arXiv:2510.11690), so it learns to decode the slightly-off latents a
    diffusion model samples.

    With `relative=True` (default) sigma is in units of each sample's own latent standard deviation (detached), so
    one value means the same for every autoencoder class whatever its raw latent scale; `relative=False` adds
    absolute noise. Use it on the decoder's input only: the KL and any encoder-side loss keep the clean `z`.
    The gradient to `z` is unchanged (identity). Noise is drawn on `generator`'s device (CPU by default, so runs
    are reproducible across devices) and moved to `z`'s device and dtype.

    Several processes: give every rank the same generator state, `global_batch_size` (the batch summed over ranks)
    and `offset` (this rank's first row); each draws the global batch's noise and keeps its own rows, so the run
    adds the same noise to each sample as one process would, and the generators stay in step.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}.")
    if sigma == 0:
        return z
    rows = z.shape[0] if global_batch_size is None else global_batch_size
    if offset < 0 or offset + z.shape[0] > rows:
        raise ValueError(f"Rows {offset}..{offset + z.shape[0]} do not fit in a global batch of {rows}.")
    device = generator.device if generator is not None else z.device
    levels = torch.rand(rows, generator=generator, device=device, dtype=torch.float32) * sigma
    eps = torch.randn((rows, *z.shape[1:]), generator=generator, device=device, dtype=torch.float32)
    levels, eps = levels[offset : offset + z.shape[0]], eps[offset : offset + z.shape[0]]
    levels = levels.to(z.device).view(-1, *([1] * (z.ndim - 1)))
    if relative:
        levels = levels * z.detach().float().flatten(1).std(dim=1).view_as(levels)
    return z + (levels * eps.to(z.device)).to(z.dtype)
