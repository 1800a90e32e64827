"""Precompute a latent cache: `python scripts/precompute_latents.py --vae PATH --train_data_dir DIR --output_dir OUT`.

The same as `diffusers-vae cache ...`; runs under `accelerate launch --num_processes N scripts/precompute_latents.py`.
See docs/latent_cache.md.
"""

import sys

from diffusers_vae_ext.cli import main

if __name__ == "__main__":
    sys.exit(main(["cache", *sys.argv[1:]]))
