"""Comparing a state dict read from a file with the one a model expects, before loading it.

Converters and loaders of third-party weights (LPIPS, the FID Inception) check a file against the model's own
state dict first, so a wrong file gets an error that names the keys and shapes instead of a bare
`load_state_dict` failure, and a converter writes nothing when its inputs are not what it expects.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


def state_dict_differences(
    state: Mapping[str, Tensor], expected: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """How `state` differs from `expected`: the missing keys, the unexpected keys (both sorted) and, for the shared
    keys, `"key: (shape in state) != (expected shape)"` where the shapes differ. All three are empty for a match.

    `expected` may live on the meta device: only its keys and shapes are read.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{key}: {tuple(state[key].shape)} != {tuple(expected[key].shape)}"
        for key in sorted(set(state) & set(expected))
        if state[key].shape != expected[key].shape
    ]
    return missing, unexpected, wrong_shape
