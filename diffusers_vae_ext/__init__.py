"""diffusers-vae-ext: a drop-in diffusers AutoencoderKL with latent tools and a trainer."""

# diffusers' pipeline loader finds a component's load method by looking `ModelMixin` up on the module named in
# model_index.json ("diffusers_vae_ext"), so the package root must expose it.
from diffusers.models.modeling_utils import ModelMixin

from .modeling import AutoencoderKL, weights_fingerprint

__version__ = "0.1.0"

__all__ = ["AutoencoderKL", "ModelMixin", "weights_fingerprint", "__version__"]
