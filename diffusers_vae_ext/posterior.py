"""The encoder's posterior q(z | x): diffusers' `DiagonalGaussianDistribution`, kept in float32 for half models.

In bfloat16 or float16, diffusers computes `logvar`, `std = exp(logvar / 2)` and `mean + std * eps` in the model's
dtype: a bf16 log-variance of -20 carries an error of up to 0.04, i.e. 2% in the standard deviation, and every
draw is rounded twice. `LatentPosterior` takes float32 moments (the fast path computes the encoder's last
convolution and `quant_conv` in float32 for half models), does the clamp, the exponentials, the draws and the KL
in float32, and hands out `mean`, `logvar`, `std`, `var`, `parameters` and samples in the model's dtype, each
rounded once. Pipelines see the dtype they expect; latent caches and statistics get the best moments bf16 allows.

For float32 (or float64) moments it *is* diffusers' class, bit for bit.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

HALF_DTYPES = (torch.float16, torch.bfloat16)


class LatentPosterior(DiagonalGaussianDistribution):
    """A diagonal Gaussian posterior whose arithmetic runs in float32 when it is handed out in half precision.

    Args:
        parameters (`torch.Tensor`): the moments (N, 2 * latent_channels, h, w): mean, then log-variance.
        deterministic (`bool`, defaults to `False`): zero variance (`sample()` returns the mean), as in diffusers.
        dtype (`torch.dtype`, *optional*): the dtype of the tensors handed out; default `parameters.dtype`. With a
            half dtype the moments are used in float32 (pass float32 moments to keep their precision).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False, dtype: torch.dtype | None = None):
        dtype = dtype or parameters.dtype
        if dtype not in HALF_DTYPES:
            super().__init__(parameters.to(dtype), deterministic)
            self._float32 = None
            return
        # The float32 twin does the arithmetic; the attributes are its values rounded once to `dtype`.
        self._float32 = DiagonalGaussianDistribution(parameters.float(), deterministic)
        self.deterministic = deterministic
        self.parameters = parameters.to(dtype)
        self.mean, self.logvar, self.std, self.var = (
            t.to(dtype) for t in (self._float32.mean, self._float32.logvar, self._float32.std, self._float32.var)
        )

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """`mean + std * eps`; eps is drawn as diffusers draws it (same generator, shape and dtype, so the same
        numbers), the sum is taken in float32 for half models."""
        if self._float32 is None:
            return super().sample(generator)
        noise = randn_tensor(
            self.mean.shape, generator=generator, device=self.parameters.device, dtype=self.mean.dtype
        )
        return (self._float32.mean + self._float32.std * noise.float()).to(self.mean.dtype)

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL divergence to `other` (default: the N(0, I) prior), summed per sample; float32 sums for half models."""
        if self._float32 is None:
            return super().kl(other)
        other = getattr(other, "_float32", None) or other
        if other is not None and other.mean.dtype != torch.float32:
            other = DiagonalGaussianDistribution(other.parameters.float(), other.deterministic)
        return self._float32.kl(other).to(self.mean.dtype)

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample`, summed over `dims`; float32 sums for half models."""
        if self._float32 is None:
            return super().nll(sample, list(dims))
        return self._float32.nll(sample.float(), list(dims)).to(self.mean.dtype)
