"""Seeding: every random choice comes from a generator of its own, derived from (seed, index, stream).

A result must not depend on the batch an example is in, its position, the device, the number of
processes or whether the run was resumed. So nothing ever draws from a global random state: each
example gets one CPU ``torch.Generator`` per *stream*, seeded by :func:`example_seed` from the user's
seed, the example's stable id and the stream number. The attack engine uses the run index as the
stream (run ``r`` of an attack draws its start from stream ``r``); every other consumer has a named
stream below, far from any run index, so two consumers never share draws.

The streams are part of the results: changing a number changes every record that depends on it.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1

#: The random target class of ``random-targeted`` (one draw per example, shared by its restarts).
TARGET = 1 << 40
#: The runner's fit check: one random point of each example's ball must give finite logits.
PROBE = (1 << 40) + 7
#: The masking checks: random points of the ball at which the input gradient must be usable.
ALARM_START = 1 << 42
#: The masking checks: the order in which examples are regrouped to test batch independence.
BATCH_ORDER = (1 << 42) + 1
#: A randomised model's own draws (it reads the global RNG, which is forked and seeded per batch from
#: these): during an attack (plus a per-attack offset), when judging points over many draws, and in the
#: search for the number of EoT samples.
MODEL_DRAWS = 1 << 43
JUDGE = (1 << 43) + (1 << 20)
EOT_SEARCH = (1 << 43) + (2 << 20)

# The trainer seeds by (seed, step or epoch, tag): its index is a step, not an example id.
TRAIN_ORDER, TRAIN_AUGMENT, TRAIN_ATTACK, TRAIN_EVAL = 1, 2, 3, 4

#: The largest seed a user may give (seeds are reduced to 64 bits; a larger one would alias another).
MAX_SEED = (1 << 63) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def example_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit seed for one (seed, example id or step, stream) triple (SplitMix64, chained)."""
    h = _splitmix64(int(seed) & _MASK64)
    h = _splitmix64(h ^ (int(index) & _MASK64))
    h = _splitmix64(h ^ (int(stream) & _MASK64))
    return h & ((1 << 63) - 1)


def generators(seed: int, ids, stream: int) -> list[torch.Generator]:
    """One CPU generator per example id, seeded by :func:`example_seed`."""
    return [torch.Generator().manual_seed(example_seed(seed, int(i), stream)) for i in ids]


def generator(seed: int, index: int, stream: int) -> torch.Generator:
    """One CPU generator for (seed, index, stream)."""
    return torch.Generator().manual_seed(example_seed(seed, index, stream))
