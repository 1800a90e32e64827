"""Our AutoencoderKL as `vae=` in real (tiny, local) diffusers pipelines, against diffusers' own AutoencoderKL.

Every comparison runs the same pipeline twice with the same UNet, text encoders, scheduler and seed, once with our
VAE and once with diffusers' AutoencoderKL holding identical weights, and requires the same image.
"""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from conftest import diffusers_twin, make_vae
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from pipeline_fixtures import sd_components, sdxl_components

from diffusers_vae_ext import AutoencoderKL, weights_fingerprint
from diffusers_vae_ext.data import resize_and_crop
from diffusers_vae_ext.scaling import unscale_latents

PROMPT = "a photo of an astronaut riding a horse"
ATOL = 1e-5
# SDXL-style per-channel latent statistics (4 channels: SDXL reshapes them with a hard-coded view(1, 4, 1, 1)).
SDXL_VAE_OVERRIDES = dict(
    scaling_factor=0.13025, latents_mean=(0.2, -0.4, 0.1, 0.3), latents_std=(1.5, 0.7, 1.1, 2.0), force_upcast=True
)


# ------------------------------------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer")


@pytest.fixture(scope="session")
def sd_parts(tokenizer_dir) -> dict:
    return sd_components(tokenizer_dir)


@pytest.fixture(scope="session")
def inpaint_parts(tokenizer_dir) -> dict:
    return sd_components(tokenizer_dir, in_channels=9)


@pytest.fixture(scope="session")
def sdxl_parts(tokenizer_dir) -> dict:
    return sdxl_components(tokenizer_dir)


@pytest.fixture(scope="session")
def vae_pair() -> tuple[AutoencoderKL, DiffusersAutoencoderKL]:
    vae = make_vae(seed=0)
    return vae, diffusers_twin(vae)


@pytest.fixture(scope="session")
def sdxl_vae_pair() -> tuple[AutoencoderKL, DiffusersAutoencoderKL]:
    vae = make_vae(seed=0, **SDXL_VAE_OVERRIDES)
    return vae, diffusers_twin(vae)


@pytest.fixture(scope="session")
def photo(sample_images) -> Image.Image:
    return resize_and_crop(sample_images["astronaut"], (64, 64))[0]


@pytest.fixture(scope="session")
def photo_and_mask(sample_images) -> tuple[Image.Image, Image.Image]:
    image = resize_and_crop(sample_images["chelsea"], (64, 64))[0]
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 20:52] = 255  # repaint the cat's face
    return image, Image.fromarray(mask, mode="L")


def make_pipe(pipeline_class, vae, parts: dict):
    pipe = pipeline_class(vae=vae, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, **kwargs) -> np.ndarray:
    """One seeded call; images as float arrays (N, H, W, C) in [0, 1], or latents with output_type="latent"."""
    kwargs = {"prompt": PROMPT, "num_inference_steps": 2, "output_type": "np", **kwargs}
    if "image" not in kwargs:
        kwargs.setdefault("height", 32)
        kwargs.setdefault("width", 32)
    with torch.no_grad():
        output = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    return output.float().numpy() if isinstance(output, torch.Tensor) else output


def assert_same_images(ours: np.ndarray, reference: np.ndarray, atol: float = ATOL) -> None:
    assert ours.shape == reference.shape
    assert np.isfinite(ours).all()
    # A flat image would match trivially; the tiny models must produce some structure.
    assert reference.std() > 0.01
    np.testing.assert_allclose(ours, reference, rtol=0, atol=atol)


# -------------------------------------------------------------------------------- same images as diffusers' VAE
def test_txt2img_matches_diffusers_vae(vae_pair, sd_parts):
    ours, theirs = vae_pair
    pipe = make_pipe(StableDiffusionPipeline, ours, sd_parts)
    assert pipe.vae_scale_factor == ours.downsampling_factor == 4
    image = generate(pipe)
    assert image.shape == (1, 32, 32, 3)
    assert_same_images(image, generate(make_pipe(StableDiffusionPipeline, theirs, sd_parts)))


def test_txt2img_with_a_four_level_vae(sd_parts):
    """Stable Diffusion's layout: 4 levels, latents at 1/8 of the image size."""
    vae = make_vae(
        seed=1,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
    )
    pipe = make_pipe(StableDiffusionPipeline, vae, sd_parts)
    assert pipe.vae_scale_factor == 8
    latents = generate(pipe, height=64, width=64, output_type="latent")
    assert latents.shape == (1, 4, 8, 8)
    image = generate(pipe, height=64, width=64)
    assert image.shape == (1, 64, 64, 3)
    assert_same_images(
        image, generate(make_pipe(StableDiffusionPipeline, diffusers_twin(vae), sd_parts), height=64, width=64)
    )


def test_img2img_on_a_photo_matches_diffusers_vae(vae_pair, sd_parts, photo):
    ours, theirs = vae_pair
    kwargs = dict(image=photo, strength=0.6, num_inference_steps=4)
    image = generate(make_pipe(StableDiffusionImg2ImgPipeline, ours, sd_parts), **kwargs)
    assert image.shape == (1, 64, 64, 3)
    assert_same_images(image, generate(make_pipe(StableDiffusionImg2ImgPipeline, theirs, sd_parts), **kwargs))


def test_inpaint_on_a_photo_matches_diffusers_vae(vae_pair, inpaint_parts, photo_and_mask):
    ours, theirs = vae_pair
    image, mask = photo_and_mask
    kwargs = dict(image=image, mask_image=mask, height=64, width=64)
    pipe = make_pipe(StableDiffusionInpaintPipeline, ours, inpaint_parts)
    result = generate(pipe, **kwargs)
    assert result.shape == (1, 64, 64, 3)
    assert_same_images(result, generate(make_pipe(StableDiffusionInpaintPipeline, theirs, inpaint_parts), **kwargs))


def test_sdxl_with_latents_mean_std_matches_diffusers_vae(sdxl_vae_pair, sdxl_parts):
    ours, theirs = sdxl_vae_pair
    image = generate(make_pipe(StableDiffusionXLPipeline, ours, sdxl_parts))
    assert_same_images(image, generate(make_pipe(StableDiffusionXLPipeline, theirs, sdxl_parts)))


@pytest.mark.parametrize("force_upcast", [True, False])
def test_sdxl_fp16_follows_force_upcast(sdxl_parts, force_upcast):
    """fp16 SDXL decodes in float32 when the VAE config says `force_upcast`, and casts the VAE back after."""
    vae = make_vae(seed=0, **{**SDXL_VAE_OVERRIDES, "force_upcast": force_upcast})
    images, decode_dtypes = [], []
    for candidate in (vae, diffusers_twin(vae)):
        pipe = make_pipe(StableDiffusionXLPipeline, candidate, copy.deepcopy(sdxl_parts)).to(torch.float16)
        dtypes = []
        pipe.vae.post_quant_conv.register_forward_pre_hook(
            lambda module, args, dtypes=dtypes: dtypes.append(args[0].dtype)
        )
        images.append(generate(pipe))
        decode_dtypes.append(dtypes)
        assert pipe.vae.dtype == torch.float16
    expected = torch.float32 if force_upcast else torch.float16
    assert decode_dtypes == [[expected], [expected]]
    # A float16 decode sums in a different order on our fast path (sub-pixel upsample conv): a few fp16 ulps.
    assert_same_images(images[0], images[1], atol=ATOL if force_upcast else 2e-3)


def test_sdxl_img2img_matches_diffusers_vae(sdxl_vae_pair, sdxl_parts, photo):
    ours, theirs = sdxl_vae_pair
    kwargs = dict(image=photo, strength=0.6, num_inference_steps=4)
    image = generate(make_pipe(StableDiffusionXLImg2ImgPipeline, ours, sdxl_parts), **kwargs)
    assert_same_images(image, generate(make_pipe(StableDiffusionXLImg2ImgPipeline, theirs, sdxl_parts), **kwargs))


@pytest.mark.parametrize("pipeline_class", [StableDiffusionPipeline, StableDiffusionXLPipeline])
def test_latent_output_decodes_to_the_pipeline_image(pipeline_class, vae_pair, sdxl_vae_pair, sd_parts, sdxl_parts):
    """`output_type="latent"` + `unscale_latents` + our decode == the pipeline's own image output."""
    sdxl = pipeline_class is StableDiffusionXLPipeline
    vae = (sdxl_vae_pair if sdxl else vae_pair)[0]
    pipe = make_pipe(pipeline_class, vae, sdxl_parts if sdxl else sd_parts)
    latents = torch.from_numpy(generate(pipe, output_type="latent"))
    assert latents.shape == (1, 4, 8, 8)
    with torch.no_grad():
        decoded = vae.decode(unscale_latents(latents, vae.config)).sample
        # SDXL's per-channel statistics must be applied: dividing by scaling_factor alone gives another image.
        scale_only = vae.decode(latents / vae.config.scaling_factor).sample
    image = pipe.image_processor.postprocess(decoded, output_type="np")
    assert_same_images(image, generate(pipe))
    if sdxl:
        wrong = pipe.image_processor.postprocess(scale_only, output_type="np")
        assert np.abs(wrong - image).max() > 0.05


# ------------------------------------------------------------------------------------- offload, slicing, from_pipe
def test_model_cpu_offload_runs_the_vae_through_its_hook(vae_pair, sd_parts, photo):
    ours, _ = vae_pair
    kwargs = dict(image=photo, strength=0.6, num_inference_steps=4)
    reference = generate(make_pipe(StableDiffusionImg2ImgPipeline, ours, sd_parts), **kwargs)

    pipe = make_pipe(StableDiffusionImg2ImgPipeline, copy.deepcopy(ours), copy.deepcopy(sd_parts))
    pipe.enable_model_cpu_offload(device="cpu")
    hook = pipe.vae._hf_hook
    calls = []
    original_pre_forward = hook.pre_forward
    hook.pre_forward = lambda module, *args, **kw: calls.append(1) or original_pre_forward(module, *args, **kw)
    image = generate(pipe, **kwargs)
    assert len(calls) == 2  # encode (the input photo) and decode, both through `apply_forward_hook`
    assert_same_images(image, reference)


def test_vae_slicing_decodes_one_image_at_a_time(vae_pair, sd_parts):
    ours, _ = vae_pair
    reference = generate(make_pipe(StableDiffusionPipeline, ours, sd_parts), num_images_per_prompt=2)
    sliced_vae = copy.deepcopy(ours)
    sliced_vae.enable_slicing()
    batch_sizes = []
    sliced_vae.decoder.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    image = generate(make_pipe(StableDiffusionPipeline, sliced_vae, sd_parts), num_images_per_prompt=2)
    assert batch_sizes == [1, 1]
    assert_same_images(image, reference)


def test_from_pipe_needs_the_vae_passed_explicitly(vae_pair, sd_parts, photo):
    ours, theirs = vae_pair
    pipe = make_pipe(StableDiffusionPipeline, ours, sd_parts)
    # from_pipe keeps a model component only if its type is exactly the hinted diffusers class.
    with pytest.raises(ValueError, match="expected"):
        StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe, vae=pipe.vae)
    assert img2img.vae is ours and img2img.unet is pipe.unet
    img2img.set_progress_bar_config(disable=True)
    kwargs = dict(image=photo, strength=0.6, num_inference_steps=4)
    assert_same_images(
        generate(img2img, **kwargs), generate(make_pipe(StableDiffusionImg2ImgPipeline, theirs, sd_parts), **kwargs)
    )


# ------------------------------------------------------------------------------------------------ save and load
def test_save_pretrained_round_trip_keeps_our_vae(vae_pair, sd_parts, tmp_path):
    ours, _ = vae_pair
    pipe = make_pipe(StableDiffusionPipeline, ours, sd_parts)
    pipe.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["vae"] == ["diffusers_vae_ext", "AutoencoderKL"]
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()

    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.vae) is AutoencoderKL
    assert weights_fingerprint(loaded.vae) == weights_fingerprint(ours)
    assert_same_images(generate(loaded), generate(pipe))


def test_loading_without_importing_the_package_fails_clearly(vae_pair, sd_parts, tmp_path, monkeypatch):
    make_pipe(StableDiffusionPipeline, vae_pair[0], sd_parts).save_pretrained(tmp_path)
    # diffusers never imports a component's library named in model_index.json itself (it would run its code).
    monkeypatch.delitem(sys.modules, "diffusers_vae_ext")
    with pytest.raises(ValueError, match="has not been imported"):
        StableDiffusionPipeline.from_pretrained(tmp_path)


def test_our_vae_folder_loads_into_a_diffusers_saved_pipeline(vae_pair, sd_parts, tmp_path):
    ours, theirs = vae_pair
    diffusers_pipe = make_pipe(StableDiffusionPipeline, theirs, sd_parts)
    diffusers_pipe.save_pretrained(tmp_path / "pipeline")
    ours.save_pretrained(tmp_path / "our_vae")

    pipe = StableDiffusionPipeline.from_pretrained(
        tmp_path / "pipeline", vae=AutoencoderKL.from_pretrained(tmp_path / "our_vae")
    )
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.vae) is AutoencoderKL
    assert_same_images(generate(pipe), generate(diffusers_pipe))

    # The other direction: the diffusers pipeline folder's own vae/ subfolder loads into our class.
    from_subfolder = AutoencoderKL.from_pretrained(tmp_path / "pipeline", subfolder="vae")
    assert weights_fingerprint(from_subfolder) == weights_fingerprint(ours)


def test_fuse_qkv_projections_of_the_unet_only(vae_pair, sd_parts):
    ours, _ = vae_pair
    reference = generate(make_pipe(StableDiffusionPipeline, ours, sd_parts))
    pipe = make_pipe(StableDiffusionPipeline, ours, copy.deepcopy(sd_parts))
    # diffusers' pipeline-level fusion checks isinstance(vae, diffusers.AutoencoderKL).
    with pytest.raises(ValueError, match="only supported for the VAE of type `AutoencoderKL`"):
        pipe.fuse_qkv_projections()
    pipe.fuse_qkv_projections(vae=False)
    assert pipe.fusing_unet
    np.testing.assert_allclose(generate(pipe), reference, rtol=0, atol=1e-5)


def test_bf16_img2img_with_torch_dtype_bfloat16(vae_pair, sd_parts, photo, tmp_path):
    """A bf16 pipeline (VAE loaded with torch_dtype=torch.bfloat16) runs our bf16 path end to end."""
    ours, theirs = vae_pair
    ours.save_pretrained(tmp_path / "vae")
    bf16_vae = AutoencoderKL.from_pretrained(tmp_path / "vae", torch_dtype=torch.bfloat16)
    assert bf16_vae.dtype == torch.bfloat16
    kwargs = dict(image=photo, strength=0.6, num_inference_steps=4)
    parts = copy.deepcopy(sd_parts)
    image = generate(make_pipe(StableDiffusionImg2ImgPipeline, bf16_vae, parts).to(torch.bfloat16), **kwargs)
    reference = generate(
        make_pipe(StableDiffusionImg2ImgPipeline, copy.deepcopy(theirs), parts).to(torch.bfloat16), **kwargs
    )
    fp32 = generate(make_pipe(StableDiffusionImg2ImgPipeline, theirs, sd_parts), **kwargs)
    # Same UNet and noise; the two VAEs round differently in bf16. Ours must be as close to the fp32 pipeline as
    # diffusers' bf16 VAE is.
    assert image.shape == fp32.shape and np.isfinite(image).all()
    our_error, their_error = np.abs(image - fp32), np.abs(reference - fp32)
    assert our_error.max() <= 1.5 * their_error.max()
    assert our_error.mean() <= 1.5 * their_error.mean()
