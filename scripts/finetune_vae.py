"""Fine-tune a VAE or train one from scratch: `accelerate launch scripts/finetune_vae.py --output_dir DIR`.

With no data argument it trains a small VAE on the built-in sample photos. All options: `--help`, and
docs/training.md.
"""

from diffusers_vae_ext.training import main

if __name__ == "__main__":
    main()
