"""TaylorSeer step caching, as the official ``enable_taylorseer`` does it (PR #232, #307).

Each guidance branch keeps its own state. On a "full" step the decoder runs and the output of its
last layer (before the final norm) is stored with finite-difference Taylor factors; on a "Taylor"
step the decoder is skipped and that output is extrapolated. Official parameters: steps 0-4 are
full, then every third step (k = 7, 10, 13, ...); factors are recorded once k > 3, up to order 6.

The official code caches every layer, but a Taylor step ignores each layer's input, so only the
last layer's extrapolation reaches the output (PR #307 shows the outputs are bit-identical);
caching the last layer alone is the same computation. Unlike the official code, the state is
scoped to one call (the official flags leak into later calls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FRESH_THRESHOLD = 3
MAX_ORDER = 6
FIRST_ENHANCE = 5


@dataclass
class TaylorSeerState:
    """One branch's cache; ``step`` counts the forwards this branch was asked for."""

    step: int = 0
    counter: int = 0
    activated: list[int] = field(default_factory=lambda: [0])
    factors: list[torch.Tensor] = field(default_factory=list)

    def next_is_full(self) -> bool:
        """Decide the type of this branch's current step (and book-keep it, as ``cal_type`` does)."""
        if self.step < FIRST_ENHANCE or self.counter == FRESH_THRESHOLD - 1:
            self.counter = 0
            self.activated.append(self.step)
            return True
        self.counter += 1
        return False

    def record(self, feature: torch.Tensor) -> None:
        """After a full step: order 0 is the feature, order j+1 the divided difference of order j."""
        if self.step == 0:
            self.factors = []
        distance = self.activated[-1] - self.activated[-2]
        new = [feature]
        for j in range(MAX_ORDER):
            if j < len(self.factors) and self.step > FIRST_ENHANCE - 2:
                new.append((new[j] - self.factors[j]) / distance)
            else:
                break
        self.factors = new

    def predict(self) -> torch.Tensor:
        x = self.step - self.activated[-1]
        out = 0
        for j, f in enumerate(self.factors):
            out = out + (1 / math.factorial(j)) * f * (x**j)
        return out

    def advance(self) -> None:
        self.step += 1
