"""Exact tiled encode and decode for `AutoencoderKL`: the tiled result equals the untiled one up to float rounding.

diffusers' tiler runs every tile through the whole network on its own, so each tile gets its own GroupNorm
statistics and its own attention, and overlapping tiles are blended; the result differs from the untiled one
(visible seams and tone shifts). This tiler instead runs the network **layer by layer over all tiles**:

* Between two GroupNorms the network is local: one or two convolutions (a 3x3 convolution reads 1 pixel of
  neighbourhood at its resolution; the encoder's stride-2 downsampling reads 1 more pixel below and right; the
  decoder's nearest-upsample + 3x3 convolution reads 1 pixel at the coarse resolution). Each such *stage*
  computes only the non-overlapping core of every tile, reading exactly that neighbourhood from the stored
  output of the previous stage (true neighbours inside the image, zeros at the image border, as the untiled
  zero padding does). No convolution output is computed twice, so tiling costs no extra convolution work.
* At every GroupNorm the statistics are those of the whole image: each stage accumulates, per sample and group,
  the count, mean and sum of squared deviations of every tile core (Welford per tile in fp32, combined with
  Chan's formula in float64), and the next stage normalises all tiles with the combined statistics.
* The mid blocks (with their attention) run on the whole latent-resolution feature map, which is small
  (`block_out_channels[-1]` channels at 1/`downsampling_factor` of the resolution), with the model's own modules.
* Stage outputs are kept as horizontal bands; a band an input is no longer needed for is freed as soon as the
  tiles below it are done, and a ResNet block's residual sum is written in place over its input.
* As in the untiled fast path (`blocks.py`), work tiles are channels_last on CPU (oneDNN's faster layout) and the
  decoder's nearest-2x + 3x3 convolutions run as sub-pixel convolutions (`blocks.subpixel_weight`), so tiling
  does the same convolution work as the untiled path; the extra cost is one statistics pass per GroupNorm and
  the copies of tile borders.

Tiles are `tile_sample_size` pixels (at the image resolution; the image is split into equal tiles aligned to the
downsampling factor, so a stride-2 layer never straddles a tile origin). At coarse stages, where a tile holds
few pixels, neighbouring tiles are merged into one work tile of about the same number of elements as a full
resolution tile: one convolution over a merged tile computes the same pixels as a batch of the small tiles,
without their duplicated borders, and keeps the convolutions large enough to run efficiently.

Peak memory (N images of H x W, tile T x T pixels, C_k channels at stage k, `factor` the downsampling factor):

* compute device: the weights; the latent-resolution part run whole (mid block: a few tensors of
  N x C_mid x (H/factor) x (W/factor), plus what the attention kernel needs for (H/factor * W/factor) tokens);
  and one work tile at a time: about 4 tensors of N x C_k x (t + 2)^2 elements (the tile with its border, its
  normalised copy, the zero-padded copy at the image edge, the convolution output), with t ~ T at full
  resolution (merged tiles at coarse stages hold about as many elements).
* storage (host memory when the compute device is an accelerator and `offload_to_cpu` is on, else the compute
  device): the current stage's inputs and outputs at their resolution. Inputs that the stage consumes are freed
  band by band, so the live total is at most the input plus the output of one stage plus one band of
  T rows: for a ResNet block about N x (C_in + 2 C_out) x H_k x W_k (input, first convolution's output, shortcut),
  for the decoder's upsampling stages about N x C x (H_k W_k / 4 + H_k W_k). For the Stable Diffusion kl-f8 VAE
  the largest is the first full-resolution decoder block (256 -> 128 channels): about N x 512 x H x W values,
  i.e. 2 GiB at 1024 x 1024 in float32 if held at once, about 1.25 GiB with the band-wise release
  (untiled diffusers holds about 3 GiB at that point: input, GroupNorm output and SiLU output at 256 channels).
  With offloading, the compute device never holds a full-resolution activation.

Tiling is for inference: it writes tiles in place, which autograd cannot follow, so a call that would need
gradients (grad mode on and the input or a parameter requires grad) raises a `RuntimeError`; wrap the call in
`torch.no_grad()` or `torch.inference_mode()` (pipelines already do).

Modules: `api` (`TiledAutoencoderMixin`, `tiled_encode`, `tiled_decode`, `check_tiling_supported`), `storage`
(activations kept as bands, GroupNorm statistics accumulated over tiles, GroupNorm with fixed statistics), `run`
(the tile layout and the layer-by-layer run over all tiles). The public names are importable from
`diffusers_vae_ext.tiling`.
"""

from .api import TiledAutoencoderMixin, check_tiling_supported, tiled_decode, tiled_encode

__all__ = ["TiledAutoencoderMixin", "tiled_decode", "tiled_encode", "check_tiling_supported"]
