"""Seeds for each purpose of a run, derived from (--seed, epoch, purpose): independent streams, so an epoch's
shuffle and eps draws do not depend on what ran before it, and a resumed run reproduces an uninterrupted one."""

from __future__ import annotations

import numpy as np
import torch

# Purposes; epoch 0 for the streams that are the same every epoch (evaluation, samples, the test split).
SHUFFLE, EPS, EVAL, SAMPLES, SPLIT = range(5)


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one purpose, independent of every other (seed, keys) pair."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0] >> 1)


def generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derived_seed(seed, *keys))
