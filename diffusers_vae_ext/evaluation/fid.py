"""Frechet distance between two Gaussians fitted to feature sets: the distance behind FID and rFID.

    d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))

Everything runs in float64. The trace of the matrix square root is taken from the eigenvalues of the symmetric
positive semi-definite matrix `S_1^(1/2) S_2 S_1^(1/2)`, which has the same eigenvalues as `S_1 S_2`: a symmetric
eigen-decomposition is stable where `scipy.linalg.sqrtm` of the non-symmetric product can return complex values
or lose digits for the singular covariances that small sets give (fewer images than the 2048 feature dimensions).

For such small sets `frechet_distance_of_features` never forms the D x D covariances: with centred, scaled
features A (N1 x D) and B (N2 x D), S_1 = A^T A and S_2 = B^T B, the non-zero eigenvalues of S_1 S_2 are those of
(A B^T)(A B^T)^T, so tr((S_1 S_2)^(1/2)) is the sum of the singular values of the N1 x N2 matrix A B^T. Same value,
O(N1 N2 D) instead of two D x D eigen-decompositions (seconds per VAE at D = 2048).
"""

from __future__ import annotations

import numpy as np
import torch


def _as_float64(array) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array), dtype=torch.float64)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (round-off negatives clipped to 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Args:
        mu1, mu2: mean vectors of shape (D,) (numpy arrays or tensors).
        sigma1, sigma2: covariance matrices of shape (D, D), symmetric positive semi-definite.
    """
    mu1, mu2, sigma1, sigma2 = map(_as_float64, (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"Means must be vectors of the same length, got {tuple(mu1.shape)} and {tuple(mu2.shape)}.")
    dims = mu1.shape[0]
    if sigma1.shape != (dims, dims) or sigma2.shape != (dims, dims):
        raise ValueError(
            f"Covariances must be {dims}x{dims} to match the means, got {tuple(sigma1.shape)} and "
            f"{tuple(sigma2.shape)}."
        )
    root1 = _psd_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased like `np.cov(rowvar=False)`) of features of shape (N, D), N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"Need features of shape (N, D) with N >= 2 to fit a Gaussian, got {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance_of_features(features1, features2) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N1, D) and (N2, D), N1, N2 >= 2.

    With fewer samples than dimensions the covariances are low-rank and the distance is computed from the
    features directly (module docstring); otherwise through `frechet_distance` of the fitted Gaussians.
    """
    features1, features2 = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    for features in (features1, features2):
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"Need features of shape (N, D) with N >= 2 to fit a Gaussian, got {features.shape}.")
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(f"Feature sets differ in dimension: {features1.shape[1]} and {features2.shape[1]}.")
    if max(features1.shape[0], features2.shape[0]) >= features1.shape[1]:
        return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
    a, b = (_as_float64(f - f.mean(axis=0)) / (f.shape[0] - 1) ** 0.5 for f in (features1, features2))
    diff = _as_float64(features1.mean(axis=0) - features2.mean(axis=0))
    trace_sqrt = torch.linalg.svdvals(a @ b.T).sum()
    return float(diff @ diff + a.square().sum() + b.square().sum() - 2 * trace_sqrt)
