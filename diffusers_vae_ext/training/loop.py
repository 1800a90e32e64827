"""`train(args)`: the training loop, one plain loop read top to bottom (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from .. import fp16_safe, losses
from ..autoencoders import as_autoencoder
from ..hardware import choose_path, describe_path
from ..modeling import AutoencoderKL
from ..regularisers import encoder_last_layer, load_vision_model
from .arguments import parse_args, resolve_mixed_precision
from .checkpoints import StopRequested, logged_steps, register_ema_checkpointing, resume_state, save_checkpoint
from .data import (
    describe_training_data,
    epoch_batches,
    posterior_noise,
    redacted_storage_options,
    skipped_summary,
    training_dataloader,
    training_images,
    updates_per_epoch,
    validation_batch,
)
from .model import (
    VAETrainingForward,
    check_model_arguments,
    ema_weights,
    last_decoder_layer,
    latent_shape,
    load_teacher,
    load_vae,
    prepare_for_training,
    trains_on_clips,
)
from .objective import (
    build_alignment,
    discriminator_input,
    discriminator_loss_fn,
    draw_regularisers,
    generator_loss,
    patchgan_fits,
    vision_features,
)
from .output import (
    begin_final_save,
    load_discriminator,
    publish_final,
    recompute_scaling_factor,
    save_discriminator,
    write_recipe,
)
from .recipe import training_recipe
from .validation import plot_loss_curve, validate

logger = logging.getLogger(__package__)


def create_accelerator(args: argparse.Namespace):
    """The run's `Accelerator` (mixed precision, trackers, gradient accumulation), logging and seed."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    output_dir = Path(args.output_dir)
    report_to = None if args.report_to in (None, "none") else args.report_to
    mixed_precision = resolve_mixed_precision(args.mixed_precision)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    # Our own messages at INFO; accelerate's per-file "saved in ..." lines only at WARNING.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    set_seed(args.seed)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if accelerator.device.type == "cpu" and accelerator.num_processes == 1 and torch.get_num_threads() < cores:
        # `accelerate launch --cpu` sets OMP_NUM_THREADS=1 for a single process, halving speed on 2 cores.
        logger.warning(
            "Training on %d of %d CPU threads; pass --num_cpu_threads_per_process %d to accelerate launch "
            "(or run the script with python) to use them all.",
            torch.get_num_threads(),
            cores,
            cores,
        )

    accelerator.print(
        f"Mixed precision {mixed_precision} ({args.mixed_precision}) on {describe_path(choose_path(accelerator.device))}"
    )
    return accelerator, report_to


def train(args: argparse.Namespace) -> Path:
    """Run the training described by `args` (see `parse_args`); returns the output folder."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    accelerator, report_to = create_accelerator(args)
    # --align_to: the frozen vision model is read first, so a wrong folder stops the run before any other work.
    vision = load_vision_model(args.align_to, device=accelerator.device) if args.align_to else None

    # ---- model (any class the adapter loads) and its data: images, or clips for video classes; bad input fails
    # here, before any training
    vae = load_vae(args)
    adapter = as_autoencoder(vae)
    check_model_arguments(adapter, args)
    train_images, validation_images, source = training_images(
        args, trains_on_clips(adapter), adapter.frame_multiple, adapter.class_name
    )
    teacher = load_teacher(args.teacher_vae, adapter) if args.teacher_vae else None
    if teacher is not None:
        teacher.vae.to(accelerator.device)
    resolution = args.resolution or vae.config.get("sample_size") or 256
    if isinstance(resolution, (list, tuple)):
        resolution = resolution[0]
    if resolution % adapter.size_multiple:
        raise ValueError(
            f"--resolution {resolution} must be divisible by {adapter.size_multiple} for {adapter.class_name}."
        )
    channels = adapter.in_channels
    recipe = None
    if args.fp16_safe:  # teacher = the starting VAE; the student is rescaled, then trained to match it
        calibration = fp16_safe.calibration_pixels(train_images, resolution, channels, resize_to=args.resize_to)
        recipe = fp16_safe.FP16SafeRecipe.from_args(vae, args, calibration)
    vae_parameters = prepare_for_training(vae, args)

    ema = None
    if args.use_ema:
        ema = EMAModel(vae.parameters(), decay=args.ema_decay, model_cls=type(vae), model_config=vae.config)

    lpips = None
    if args.perceptual_weight > 0:
        lpips = losses.load_lpips(args.lpips_weights).to(accelerator.device)

    discriminator = None
    if args.disc_weight > 0:
        patchgan = losses.PatchGAN3DDiscriminator if args.disc_3d else losses.PatchGANDiscriminator
        discriminator = patchgan(in_channels=adapter.out_channels, num_layers=args.disc_layers)
        if args.discriminator_weights:
            load_discriminator(discriminator, args.discriminator_weights)
        discriminator.train()

    alignment = build_alignment(adapter.latent_channels, vision) if vision is not None else None
    # The VF projection trains with the autoencoder (same optimiser); it is saved in the checkpoints, not the output.
    trained_parameters = vae_parameters + (list(alignment.parameters()) if alignment is not None else [])

    # ---- optimisers and schedulers (steps counted per process, as in diffusers' examples)
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    betas = (args.adam_beta1, args.adam_beta2)
    optimizer = torch.optim.AdamW(
        trained_parameters, lr=learning_rate, betas=betas, weight_decay=args.adam_weight_decay
    )
    scheduler_steps = dict(
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, **scheduler_steps)

    dataset, dataloader = training_dataloader(train_images, resolution, channels, args, accelerator)
    training_forward = VAETrainingForward(vae, args.train_decoder_only, teacher, args.distill_target)
    if discriminator is not None:
        disc_optimizer = torch.optim.AdamW(
            discriminator.parameters(), lr=args.disc_learning_rate or learning_rate, betas=betas, weight_decay=0.0
        )
        disc_scheduler = get_scheduler(args.lr_scheduler, optimizer=disc_optimizer, **scheduler_steps)
        training_forward, discriminator, optimizer, disc_optimizer, dataloader, lr_scheduler, disc_scheduler = (
            accelerator.prepare(
                training_forward, discriminator, optimizer, disc_optimizer, dataloader, lr_scheduler, disc_scheduler
            )
        )
    else:
        training_forward, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            training_forward, optimizer, dataloader, lr_scheduler
        )
    if alignment is not None:  # prepared last, so the checkpoint's model_0/model_1 keep their meaning
        alignment = accelerator.prepare(alignment)
    if ema is not None:
        ema.to(accelerator.device)
        register_ema_checkpointing(accelerator, ema)

    unwrapped_vae = accelerator.unwrap_model(training_forward).vae
    unwrapped_disc = accelerator.unwrap_model(discriminator) if discriminator is not None else None
    last_layer = last_decoder_layer(unwrapped_vae)
    encoder_layer = encoder_last_layer(unwrapped_vae) if alignment is not None else None
    validation_pixels = validation_batch(
        validation_images, resolution, channels, args.num_validation_images, args.resize_to
    )
    d_loss_fn = discriminator_loss_fn(args.disc_loss)

    steps_per_epoch = updates_per_epoch(dataloader, args)  # a stream: --max_train_steps (one pass)
    if steps_per_epoch == 0:
        raise ValueError("The data loader yields no full batch: lower --train_batch_size.")
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if report_to:
            accelerator.init_trackers(
                "finetune_vae", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
            )
    log_path, metrics_path = output_dir / "train_log.jsonl", output_dir / "metrics.jsonl"

    data_record = {"source": source, **describe_training_data(args, train_images)}
    data_record["num_validation_images"] = len(validation_images)
    run_recipe = training_recipe(args, unwrapped_vae, unwrapped_disc, data_record, accelerator)

    # ---- resume
    global_step, first_epoch, skip_batches = resume_state(accelerator, args, steps_per_epoch, (log_path, metrics_path))

    accelerator.print(
        f"Training {'the decoder of ' if args.train_decoder_only else ''}{adapter.class_name} with "
        + (f"teacher {teacher.class_name} ({args.teacher_vae}) and " if teacher is not None else "")
        + f"{sum(p.numel() for p in vae_parameters) / 1e6:.2f}M trainable parameters on {source}, "
        f"{resolution}x{resolution}, batch {args.train_batch_size} x {accelerator.num_processes} processes x "
        f"{args.gradient_accumulation_steps} accumulation, lr {learning_rate:g}, {args.max_train_steps} steps."
    )
    if accelerator.is_main_process and global_step == 0:
        before = validate(unwrapped_vae, validation_pixels, 0, args, accelerator, teacher)
        accelerator.print(f"Held-out PSNR before training: {before['psnr']:.2f} dB")

    progress = tqdm(
        total=args.max_train_steps,
        initial=global_step,
        desc="Steps",
        disable=args.no_progress or not accelerator.is_local_main_process,
    )
    nonfinite_in_a_row = 0
    micro_step = 0
    started = step_started = time.perf_counter()
    with StopRequested() as stop:
        for epoch in range(first_epoch, num_epochs):
            if global_step >= args.max_train_steps:  # resumed from the last step's checkpoint
                break
            dataloader.set_epoch(epoch)
            dataset.set_epoch(epoch)
            batches = epoch_batches(accelerator, dataloader, skip_batches if epoch == first_epoch else 0)
            for batch in batches:
                pixels = batch["pixel_values"]
                step = global_step  # the optimisation step this micro-batch belongs to
                models = [training_forward] + ([discriminator] if discriminator is not None else [])
                models += [alignment] if alignment is not None else []  # no DDP sync between micro-steps
                with accelerator.accumulate(*models):
                    # ---------------- generator step
                    regularise = draw_regularisers(args, step, micro_step, accelerator.process_index)
                    if regularise.transform is not None and regularise.transform.input_only:
                        # EQ-VAE's low-resolution prior preservation: a plain step on a rescaled image.
                        pixels = regularise.transform.apply_image(pixels, adapter.spatial_factor)
                    noise = None
                    if adapter.has_posterior and teacher is None:
                        shape = latent_shape(adapter, pixels.shape)
                        noise = posterior_noise(
                            shape, args.seed, step, micro_step, accelerator.process_index, accelerator.num_processes
                        )
                        noise = noise.to(accelerator.device)
                    output = training_forward(pixels, noise, **regularise.forward_kwargs())
                    reconstructions, moments = output.reconstructions.float(), output.moments
                    target = pixels if output.pixel_target is None else output.pixel_target
                    features = None
                    if alignment is not None:
                        features = vision_features(vision, pixels, adapter.temporal_factor)
                    scale_pair = None
                    if output.scale_reconstructions is not None:
                        scale_pair = (output.scale_target, output.scale_reconstructions.float())
                    adversarial = discriminator is not None and step >= args.disc_start
                    # A small --equivariance target can be below the PatchGAN's smallest input: no GAN that step.
                    adversarial = adversarial and patchgan_fits(target, args.disc_layers)
                    loss, logs = generator_loss(
                        target,
                        reconstructions,
                        moments,
                        step,
                        args,
                        num_pixels=target[0].numel(),  # tau(x) on --equivariance steps is smaller
                        autocast=accelerator.autocast,
                        lpips=lpips,
                        discriminator=unwrapped_disc if adversarial else None,
                        last_layer=last_layer,
                        has_posterior=adapter.has_posterior,
                        latent_target=output.latent_target,
                        scale_pair=scale_pair,
                        alignment=alignment,
                        latents=output.latents,
                        features=features,
                        encoder_layer=encoder_layer,
                    )
                    logs.update(regularise.logs())
                    if recipe is not None:
                        loss, recipe_logs = recipe.loss(pixels, noise, reconstructions, moments)
                        logs.update(recipe_logs)
                    finite = torch.isfinite(loss.detach()).float().reshape(1)
                    finite = bool(accelerator.gather(finite).min() > 0)  # every rank skips together
                    if finite:
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and args.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(trained_parameters, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

                    # ---------------- discriminator step: real images vs detached reconstructions
                    if adversarial and finite:
                        # One forward on both halves: DDP allows one forward per backward.
                        with accelerator.autocast():
                            # Real images of the reconstructions' size: tau(x) on --equivariance steps.
                            real = pixels if teacher is not None else target
                            real_and_fake = torch.cat([real, reconstructions.detach().to(pixels.dtype)])
                            logits = discriminator(discriminator_input(real_and_fake, args.disc_3d))
                        logits_real, logits_fake = logits.float().chunk(2)
                        d_loss = d_loss_fn(logits_real, logits_fake)
                        accelerator.backward(d_loss)
                        if accelerator.sync_gradients and args.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(discriminator.parameters(), args.max_grad_norm)
                        disc_optimizer.step()
                        disc_scheduler.step()
                        disc_optimizer.zero_grad(set_to_none=True)
                        logs["d_loss"] = d_loss.item()
                micro_step += 1

                if not finite:
                    nonfinite_in_a_row += 1
                    logger.warning("Non-finite loss at step %d: step skipped (%d in a row).", step, nonfinite_in_a_row)
                    if nonfinite_in_a_row >= args.max_nonfinite_steps:
                        raise RuntimeError(
                            f"The loss was NaN or Inf {nonfinite_in_a_row} steps in a row (last at step {step}); "
                            "aborting. Try a lower --learning_rate, --max_grad_norm 1.0, --mixed_precision bf16 "
                            "instead of fp16, or check the data. The last checkpoint is intact."
                        )
                else:
                    nonfinite_in_a_row = 0

                if not accelerator.sync_gradients:
                    continue
                micro_step = 0
                global_step += 1
                progress.update(1)
                if ema is not None and finite:
                    ema.step(unwrapped_vae.parameters())
                now = time.perf_counter()
                logs.update(step=global_step, loss=loss.item(), lr=lr_scheduler.get_last_lr()[0], finite=finite)
                logs["seconds"] = round(now - step_started, 4)
                step_started = now
                progress.set_postfix(rec=f"{logs['rec_per_pixel']:.4f}", kl=f"{logs.get('kl', 0.0):.1f}")
                accelerator.log({k: v for k, v in logs.items() if k != "step"}, step=global_step)
                if accelerator.is_main_process:
                    with open(log_path, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(logs) + "\n")

                stop_now = stop.requested_on_any_process(accelerator)
                if global_step % args.checkpointing_steps == 0 or stop_now:
                    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit, run_recipe)
                if global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    with ema_weights(ema, unwrapped_vae):
                        metrics = validate(unwrapped_vae, validation_pixels, global_step, args, accelerator, teacher)
                    progress.write(f"step {global_step}: held-out PSNR {metrics['psnr']:.2f} dB")
                if stop_now:
                    accelerator.print(
                        f"Stopped at step {global_step}; checkpoint saved. Resume with --resume_from_checkpoint latest."
                    )
                    accelerator.end_training()
                    return output_dir
                if global_step >= args.max_train_steps:
                    break
            if global_step >= args.max_train_steps:
                break
    progress.close()
    elapsed = time.perf_counter() - started

    # ---- final model: a plain diffusers VAE folder, written aside and swapped in (see `output`)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(unwrapped_vae.parameters())
        if args.max_train_steps % args.validation_steps and global_step not in logged_steps(metrics_path):
            # not if a killed final save did
            validate(unwrapped_vae, validation_pixels, global_step, args, accelerator, teacher)
        staging = begin_final_save(output_dir)
        unwrapped_vae.save_pretrained(staging, safe_serialization=True)
        if recipe is not None:
            recipe.finish(unwrapped_vae, validation_pixels, staging)
        if args.recompute_scaling_factor and not isinstance(unwrapped_vae, AutoencoderKL):
            accelerator.print(
                f"Latent statistics not recomputed for {adapter.class_name}: measure them on the output folder with "
                "`diffusers-vae stats --write_config`."
            )
        elif args.recompute_scaling_factor:
            recompute_scaling_factor(unwrapped_vae, train_images, resolution, channels, args, staging)
        curve = plot_loss_curve(log_path, metrics_path, staging / "loss_curve.png")
        save_discriminator(unwrapped_disc, staging)
        write_recipe(staging, run_recipe, global_step)
        recipe_args = {**vars(args), "storage_options": redacted_storage_options(args.storage_options)}
        (staging / "training_args.json").write_text(json.dumps(recipe_args, indent=2) + "\n", encoding="utf-8")
        publish_final(staging, output_dir, global_step)
        final = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line][-1]
        if skipped := skipped_summary(output_dir):
            accelerator.print(skipped)
        accelerator.print(
            f"Done: {global_step} steps in {elapsed:.0f} s. Held-out PSNR {final['psnr']:.2f} dB. "
            f"VAE saved to {output_dir}" + (f"; loss curve {output_dir / curve.name}" if curve else "")
        )
    accelerator.end_training()
    return output_dir


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    return train(parse_args(argv, prog=prog))
