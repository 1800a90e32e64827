"""`REGULARISER_DEFAULTS`: each regulariser's paper, defaults and flag help as plain JSON-able values, so the trainer's
arguments read their help from here and a run records them in its provenance."""

from __future__ import annotations

from .scale import SCALE_EQUIVARIANCE_FACTORS

REGULARISER_DEFAULTS: dict[str, dict] = {
    "equivariance": {
        "flag": "--equivariance",
        "paper": "EQ-VAE (Kouzelis et al., ICML 2025, arXiv:2502.09509); code zelaki/eqvae",
        "help": (
            "EQ-VAE (arXiv:2502.09509): decode scaled (0.25-1x) and 90/180/270-degree rotated latents against the "
            "same transform of the images; with probability p_prior a plain step (prior preservation)."
        ),
        "defaults": {
            "p_prior": 0.5,
            "p_prior_low_res": 0.25,
            "scales": "s/32 for s in 8..31",
            "rotate": True,
            "anisotropic": False,
            "antialias": True,
        },
        "paper_recipe": {"kl_weight": 1e-6, "disc_weight": 0.5, "learning_rate": 4.5e-6, "epochs": 5},
        "ours": ["antialias (EQ-VAE's code resizes with plain bilinear)", "p_prior read as the README defines it"],
    },
    "scale_equivariance": {
        "flag": "--scale_equivariance",
        "paper": "Improving the Diffusability of Autoencoders (Skorokhodov et al., ICML 2025, arXiv:2502.14831)",
        "help": (
            "Scale equivariance (arXiv:2502.14831): 2x/4x-downsampled latents must decode to the downsampled "
            "images (an extra reconstruction term); 10-20k fine-tuning steps in the paper."
        ),
        "defaults": {"factors": list(SCALE_EQUIVARIANCE_FACTORS), "weight": 1.0, "antialias": True},
        "ours": ["weight 1.0 (the paper's weight was not checked here)", "antialias"],
    },
    "align": {
        "flag": "--align_to PATH / --align_weight",
        "paper": "VA-VAE / LightningDiT (Yao et al., CVPR 2025, arXiv:2501.01423); code hustvl/LightningDiT",
        "help": (
            "VA-VAE (arXiv:2501.01423): align latents (1x1-conv projected) to a frozen vision model loaded from "
            "the local transformers folder PATH (e.g. DINOv2): margin cosine + distance-matrix loss, adaptive weight."
        ),
        "defaults": {
            "align_weight": 0.1,
            "cos_margin": 0.5,
            "distmat_margin": 0.25,
            "cos_weight": 1.0,
            "distmat_weight": 1.0,
            "adaptive": True,
            "max_adaptive_weight": 1e8,
        },
        "ours": ["ImageNet normalisation of the vision model's input", "features resized to the latent grid"],
    },
    "latent_noise": {
        "flag": "--latent_noise SIGMA",
        "paper": "Noise-augmented decoder training, RAE (Zheng et al., arXiv:2510.11690)",
        "help": (
            "Noise-augmented decoder (RAE, arXiv:2510.11690): the decoder sees z + sigma * eps, sigma drawn per "
            "sample from [0, SIGMA] in units of the latent's own std."
        ),
        "defaults": {"sigma": 0.1, "relative": True},
        "ours": ["sigma 0.1, uniform per sample, relative to the latent's std"],
    },
}
