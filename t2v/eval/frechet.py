"""Frechet distance between two feature sets (FID / FVD formula on any features).

``d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with the numerical handling of
pytorch-fid: if the matrix square root is not finite, ``eps`` is added to both diagonals; a small
imaginary part from round-off is dropped, a large one is an error.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from t2v.eval.retrieval import to_numpy


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), N >= 2."""
    feats = to_numpy(feats, "feats")
    if feats.ndim != 2:
        raise ValueError(f"feats must be 2-D (N, D), got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"feats needs at least 2 samples for a covariance, got {feats.shape[0]}")
    if not np.isfinite(feats).all():
        raise ValueError("feats must be finite")
    mu = feats.mean(axis=0)
    sigma = np.atleast_2d(np.cov(feats, rowvar=False))
    return mu, sigma


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians (mu_a, sigma_a) and (mu_b, sigma_b)."""
    mu_a, mu_b = np.atleast_1d(to_numpy(mu_a, "mu_a")), np.atleast_1d(to_numpy(mu_b, "mu_b"))
    sigma_a, sigma_b = np.atleast_2d(to_numpy(sigma_a, "sigma_a")), np.atleast_2d(to_numpy(sigma_b, "sigma_b"))
    if mu_a.shape != mu_b.shape or mu_a.ndim != 1:
        raise ValueError(f"means must be equal-length vectors, got {mu_a.shape} and {mu_b.shape}")
    dim = mu_a.shape[0]
    if sigma_a.shape != (dim, dim) or sigma_b.shape != (dim, dim):
        raise ValueError(f"covariances must be ({dim}, {dim}), got {sigma_a.shape} and {sigma_b.shape}")

    diff = mu_a - mu_b
    covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(dim) * eps
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrt of the covariance product has imaginary part {np.abs(covmean.imag).max()}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def frechet_distance(feats_a, feats_b, eps: float = 1e-6) -> float:
    """Frechet distance between feature sets (N_a, D) and (N_b, D), numpy or torch."""
    mu_a, sigma_a = feature_stats(feats_a)
    mu_b, sigma_b = feature_stats(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature widths differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b, eps=eps)
