"""A seeded train/test split stratified by class, hitting the requested test fraction exactly overall."""

from __future__ import annotations

import numpy as np

from metallo_core.errors import DataError


def stratified_split(strata: np.ndarray, test_fraction: float, seed: int = 0, *,
                     every_stratum: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, test_rows), sorted. Each stratum gives floor(n * f) test rows, the remainder up to
    round(N * f) goes to randomly chosen strata with the largest fractional parts, and (`every_stratum`)
    every stratum of two or more rows keeps at least one training row and one test row. Without
    `every_stratum` the test side has exactly round(N * f) rows even when strata are tiny (a validation
    split of a few rows per stratum would otherwise take far more than its fraction)."""
    strata = np.asarray(strata)
    total = len(strata)
    if not 0 < test_fraction < 1:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    if total < 2:
        raise DataError(f"cannot split {total} image(s) into a training and a test set")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == value) for value in np.unique(strata)]
    sizes = np.array([len(group) for group in groups])
    exact = sizes * test_fraction
    quota = np.floor(exact).astype(int)
    remaining = round(total * test_fraction) - int(quota.sum())
    if remaining > 0:
        # Largest remainders first, ties broken at random (seeded).
        order = np.lexsort((rng.random(len(groups)), -(exact - quota)))
        quota[order[:remaining]] += 1
    if every_stratum:
        quota = np.where(sizes >= 2, np.clip(quota, 1, sizes - 1), quota)
    test_rows = [rng.permutation(group)[:count] for group, count in zip(groups, quota)]
    test = np.sort(np.concatenate(test_rows)) if test_rows else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(total), test)
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"test fraction {test_fraction} leaves an empty training or test set for {total} image(s)")
    return train, test


def validation_split(train_rows: np.ndarray, strata: np.ndarray, fraction: float,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit_rows, validation_rows) out of `train_rows` (indices into `strata`): `fraction` of them,
    stratified, for early stopping. Empty validation rows when `fraction` is 0 or would hold no row."""
    train_rows = np.asarray(train_rows)
    count = round(len(train_rows) * fraction)
    if fraction <= 0 or count < 1 or count >= len(train_rows):
        return train_rows, train_rows[:0]
    fit_local, validation_local = stratified_split(np.asarray(strata)[train_rows], fraction, seed, every_stratum=False)
    return train_rows[fit_local], train_rows[validation_local]
