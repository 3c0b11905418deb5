"""Random streams a resumed run recreates rather than restores: seeded by (seed, rank, position in the run).

Rank 0 alone writes a checkpoint, and every rank of a resumed run loads it: state carried in it, such as a
random generator's, would hand rank 0's stream to every rank. A stream seeded by its position (the step or
epoch it starts at) is the same on a resumed run as on an uninterrupted one, on every rank.
"""

from __future__ import annotations

import numpy as np
import torch


def reseed(generator: torch.Generator, seed: int, rank: int, position: int) -> torch.Generator:
    """`generator` seeded for (seed, rank, position): independent streams for different triples."""
    entropy = [seed % 2**64, rank, position]
    generator.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]))
    return generator
