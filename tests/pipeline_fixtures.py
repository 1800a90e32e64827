"""Small but real Stable Diffusion / SDXL pipeline components, built locally (no hub downloads).

The UNets, CLIP text encoders and the byte-level BPE tokenizer are the real diffusers/transformers classes at toy
sizes, so a pipeline built from them runs every line a full-size pipeline runs on its `vae`. Each builder is seeded,
so two calls give identical weights; tests pass the same components to two pipelines that differ only in the VAE.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_HIDDEN_SIZE = 32
TEXT_PROJECTION_DIM = 32
SDXL_TIME_EMBED_DIM = 8
# The tokenizer's specials follow the 512 byte tokens; CLIP's text model finds the pooled token by eos_token_id.
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_VOCAB_SIZE = 514
MAX_PROMPT_TOKENS = 16


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codepoints)))


def write_tiny_clip_tokenizer(folder: str | Path) -> Path:
    """Write vocab.json / merges.txt of a byte-level CLIP BPE with no merges: every byte is a token.

    512 byte tokens (each byte alone and with the end-of-word suffix `</w>`) plus the two specials; any text
    tokenizes, one token per byte. Returns the folder, loadable with `CLIPTokenizer.from_pretrained`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [char + "</w>" for char in byte_chars] + [BOS_TOKEN, EOS_TOKEN]
    assert len(tokens) == TOKENIZER_VOCAB_SIZE
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": MAX_PROMPT_TOKENS, "tokenizer_class": "CLIPTokenizer"})
    )
    return folder


def make_tokenizer(folder: str | Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(folder))


def _text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        projection_dim=TEXT_PROJECTION_DIM,
        bos_token_id=TOKENIZER_VOCAB_SIZE - 2,
        eos_token_id=TOKENIZER_VOCAB_SIZE - 1,
        pad_token_id=TOKENIZER_VOCAB_SIZE - 1,
    )


def make_text_encoder(seed: int = 0, with_projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(_text_config()).eval()


def make_unet(seed: int = 0, in_channels: int = 4, sdxl: bool = False, sample_size: int = 8) -> UNet2DConditionModel:
    """A two-level cross-attention UNet; `in_channels=9` is the inpainting layout (latents, mask, masked image).

    `sdxl=True` adds SDXL's "text_time" conditioning (pooled text embedding + six size/crop ids) and takes the
    concatenated hidden states of both text encoders as cross-attention input.
    """
    torch.manual_seed(seed)
    common = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
    )
    if sdxl:
        common.update(
            cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + TEXT_PROJECTION_DIM,
            use_linear_projection=True,
        )
    else:
        common.update(cross_attention_dim=TEXT_HIDDEN_SIZE)
    unet = UNet2DConditionModel(**common).eval()
    # Random init leaves conv_out at small values; make the UNet's prediction matter for the final image.
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return unet


def make_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )


def sd_components(tokenizer_folder: str | Path, in_channels: int = 4) -> dict:
    """Everything `StableDiffusionPipeline` (and its img2img/inpaint siblings) needs except `vae`."""
    return dict(
        unet=make_unet(seed=1, in_channels=in_channels),
        text_encoder=make_text_encoder(seed=2),
        tokenizer=make_tokenizer(tokenizer_folder),
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_components(tokenizer_folder: str | Path) -> dict:
    """Everything `StableDiffusionXLPipeline` needs except `vae`."""
    tokenizer = make_tokenizer(tokenizer_folder)
    return dict(
        unet=make_unet(seed=3, sdxl=True),
        text_encoder=make_text_encoder(seed=4),
        text_encoder_2=make_text_encoder(seed=5, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=make_scheduler(),
    )
