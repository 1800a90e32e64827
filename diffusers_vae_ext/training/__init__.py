"""Fine-tune any supported autoencoder class, train one from scratch, or distil one into a small one:
`accelerate launch scripts/finetune_vae.py --output_dir DIR`.

The loop is a plain loop in `train()`, readable top to bottom, in the style of diffusers' example scripts (same
argument names). Per optimisation step:

1. Generator step. Encode, draw `z = mean + std * eps` from the posterior (eps seeded by (seed, step, rank) so a
   resumed run draws the same noise), decode. Loss = reconstruction (L1 or L2, summed over pixels, the
   latent-diffusion convention) + `perceptual_weight` * LPIPS + KL (`--kl_mode plain|H|B`) + once
   `--disc_start` is reached, the adaptive-weighted adversarial term. The discriminator is called unwrapped and
   with `requires_grad_(False)`, so this step neither updates it nor leaves gradients in it, and DDP never sees
   a discriminator forward without its backward.
2. Discriminator step (from `--disc_start`): hinge or vanilla loss on real images and *detached*
   reconstructions, so no gradient reaches the VAE.

Weights stay fp32 (accelerate autocast for `--mixed_precision`; by default bf16 where the hardware runs it natively,
see `hardware.py`); EMA uses diffusers' `EMAModel`. Checkpoints are
`accelerator.save_state` folders (VAE, discriminator, optimizers, schedulers, RNG, EMA as a diffusers folder)
and resuming replays the same data order, crops and noise, so the losses after a resume equal the uninterrupted
run's. Ctrl-C or SIGTERM saves a checkpoint before exiting. The output folder is a plain diffusers VAE folder.
Checkpoints and the final folder are written aside, marked complete and renamed into place, so a `kill -9` at any
moment loses nothing (`checkpoints`, `output`); both carry the run's recipe (`recipe`).

Modules, lower layers first (none imports `loop`):

- `arguments`: `parse_args` (every argument and default), `resolve_mixed_precision`, the built-in configs;
- `data`: training and held-out images, the training DataLoader, the posterior noise per step;
- `streaming`: shards, parquet, URLs and video folders (clips cut as `cache`/`stats` cut them, `{"pixel_values":
  (N, C, T, H, W)}` for video classes) streamed over (process, worker) readers, each sample once per epoch, with
  the stream's position in every checkpoint (exact resume);
- `model`: what is trained: `load_vae` (any class the adapter loads, or a config with `_class_name`),
  `VAETrainingForward` (the module the optimiser sees: posterior or deterministic latents, 4-D or 5-D, decoder-only,
  distillation against `load_teacher`), EMA weights;
- `objective`: the generator's loss (reconstruction, LPIPS per frame, KL where the class has a posterior,
  adversarial on frames or clips, distillation's latent error, the diffusability regularisers' terms and their
  per-step draws) and the discriminator's;
- `recipe`: `training_recipe.json`, what it takes to reproduce, resume or restart the run elsewhere;
- `checkpoints`: atomic saving, which checkpoint is complete, resuming, pruning, EMA inside them, Ctrl-C/SIGTERM;
- `validation`: held-out PSNR/SSIM with a picture per validation step, the loss curve;
- `output`: the final folder, written aside and swapped in; latent statistics, discriminator, recipe;
- `loop`: `train(args)` and `main(argv)`.
- `same_start` (above `loop`): a regulariser's effect, the same model trained from the same start with and without it
  and measured (equivariance error, high-frequency share, probe loss, PSNR); the tests and `bench_train.py` share it.
"""

from .arguments import BUILTIN_CONFIGS, CONFIG_DIR, parse_args, resolve_mixed_precision
from .data import DatasetImages, training_images, validation_batch
from .loop import main, train
from .model import VAETrainingForward, load_model_config, load_vae
from .validation import image_grid, plot_loss_curve, validate

__all__ = [
    "BUILTIN_CONFIGS",
    "CONFIG_DIR",
    "DatasetImages",
    "VAETrainingForward",
    "image_grid",
    "load_model_config",
    "load_vae",
    "main",
    "parse_args",
    "plot_loss_curve",
    "resolve_mixed_precision",
    "train",
    "training_images",
    "validate",
    "validation_batch",
]
