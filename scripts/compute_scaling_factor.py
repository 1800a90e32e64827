"""Measure a VAE's latent scaling_factor / shift_factor / latents_mean+std from images or a latent cache.

    python scripts/compute_scaling_factor.py --vae path/to/vae --train_data_dir images/ --resolution 512
    accelerate launch --num_processes 8 scripts/compute_scaling_factor.py --vae ... --write_config

Same arguments as `diffusers-vae stats` (see `--help` and docs/scaling.md).
"""

import sys

from diffusers_vae_ext.cli import main

if __name__ == "__main__":
    sys.exit(main(["stats", *sys.argv[1:]]))
