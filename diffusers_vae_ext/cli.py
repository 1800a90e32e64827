"""The `diffusers-vae` command: one subcommand per job, each a thin wrapper over the package."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    from .modeling import AutoencoderKL, weights_fingerprint

    vae = AutoencoderKL.from_pretrained(args.path, subfolder=args.subfolder or "")
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    num_params = sum(p.numel() for p in vae.parameters())
    print(json.dumps(config, indent=2, default=list))
    print(f"parameters: {num_params:,}")
    print(f"downsampling factor: {vae.downsampling_factor}")
    print(f"fingerprint: {weights_fingerprint(vae)}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from .modeling import PICKLE_WEIGHT_SUFFIXES

    folder = Path(args.path)
    sources = (
        [folder] if folder.is_file() else sorted(p for p in folder.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
    )
    if not sources:
        print(f"No pickle checkpoint ({', '.join(PICKLE_WEIGHT_SUFFIXES)}) found at {folder}.", file=sys.stderr)
        return 2
    for source in sources:
        # weights_only=True refuses arbitrary objects: only tensors and plain containers are unpickled.
        state = torch.load(source, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
        target = source.with_name("diffusion_pytorch_model.safetensors")
        save_file(tensors, str(target), metadata={"format": "pt"})
        print(f"{source} -> {target} ({len(tensors)} tensors)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-vae", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="print a VAE folder's config and a fingerprint of its weights")
    info.add_argument("path", help="VAE folder (or a pipeline folder with --subfolder vae)")
    info.add_argument("--subfolder", default=None)
    info.set_defaults(func=_cmd_info)

    convert = commands.add_parser(
        "convert-to-safetensors", help="convert a trusted pickle checkpoint (.bin/.ckpt) to safetensors"
    )
    convert.add_argument("path", help="a checkpoint file, or a folder holding one")
    convert.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
