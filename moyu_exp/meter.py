"""What a strategy really kept, counted per (site, layer), and what it would cost a kernel.

A :class:`SparsityMeter` is handed to whatever runs the model (evaluation, the timing loop, the
lean decoder) and receives, per (site, layer), the entries dropped at positions that ran sparse,
how many positions ran sparse and how many ran dense (a prompt under a prompt-dense protocol).
With the :class:`CostModel` of the attached model (built by the site adapter) its summary turns
those counts into

- ``site_sparsity``: the fraction of the strategy's own site entries dropped, each entry weighted
  by the weights a kernel skips for it (what the ``sparsity`` target controls);
- ``model_sparsity``: per sparse token, the share of the decoder blocks' linear weights a kernel
  may skip (TEAL's and R-Sparse's denominator), whatever the sites, so that methods compare
  like with like;
- ``weight_bytes_per_token`` and ``ideal_speedup``: the weight bytes one sparse decode step reads
  (every block linear, the LM head and one embedding row, less what was skipped) and the
  bytes-bound speedup dense bytes / sparse bytes, a speed axis no machine noise moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Key = tuple[str, int]


@dataclass(frozen=True)
class CostModel:
    """Weight elements of one decode step of a model, and what one dropped entry saves."""

    element_bytes: int
    block_weights: int  # elements of every decoder block's linear weights
    head_weights: int  # elements of the LM head
    embedding_row: int  # elements of one embedding row (read per token)
    dims: dict[Key, int] = field(default_factory=dict)  # entries of each sparsified site
    weights_per_entry: dict[Key, int] = field(default_factory=dict)
    # weights read per sparse position besides the kept entries' (R-Sparse's low-rank factors)
    extra_weights: dict[Key, int] = field(default_factory=dict)

    @property
    def dense_elements(self) -> int:
        return self.block_weights + self.head_weights + self.embedding_row

    @property
    def dense_bytes(self) -> int:
        return self.element_bytes * self.dense_elements


def _number(value: Any) -> float:
    return float(value.item()) if hasattr(value, "item") else float(value)


class SparsityMeter:
    """Counts of one phase (evaluation, bench): dropped entries and sparse/dense positions."""

    def __init__(self, cost: CostModel | None = None):
        self.cost = cost
        self._counts: dict[Key, list[Any]] = {}  # dropped, sparse positions, dense positions

    def add(self, site: str, layer: int, dropped: Any, sparse: Any, dense: Any = 0) -> None:
        """Record one call: ``dropped`` entries over ``sparse`` positions that ran sparse, and
        ``dense`` positions that ran dense. Values may be ints or 0-d tensors (no sync)."""
        counts = self._counts.setdefault((site, layer), [0, 0, 0])
        # not +=: a tensor value may be shared with other keys (one count per forward)
        counts[0] = counts[0] + dropped
        counts[1] = counts[1] + sparse
        counts[2] = counts[2] + dense

    def counts(self) -> dict[Key, tuple[int, int, int]]:
        """(dropped entries, sparse positions, dense positions) per (site, layer)."""
        return {key: tuple(int(_number(v)) for v in c) for key, c in self._counts.items()}  # type: ignore[misc]

    def _dim(self, key: Key) -> int:
        return self.cost.dims[key] if self.cost else 1

    def _weight(self, key: Key) -> int:
        return self.cost.weights_per_entry.get(key, 1) if self.cost else 1

    def _extra(self, key: Key) -> int:
        return self.cost.extra_weights.get(key, 0) if self.cost else 0

    def _fraction(self, keys: list[Key], weighted: bool = True) -> float:
        counts = self.counts()
        dropped = total = 0.0
        for key in keys:
            w = self._weight(key) if weighted else 1
            dropped += counts[key][0] * w - (counts[key][1] * self._extra(key) if weighted else 0)
            total += counts[key][1] * self._dim(key) * w
        return dropped / total if total else 0.0

    @property
    def measured(self) -> bool:
        return any(c[1] for c in self.counts().values())

    @property
    def site_sparsity(self) -> float:
        """Dropped / sparsified entries over every (site, layer), weighted by the weights each
        entry gates (for a single site: the plain fraction)."""
        return self._fraction(list(self._counts))

    @property
    def entries(self) -> int:
        """Entries sparsified (positions that ran sparse x the site's dim)."""
        return sum(c[1] * self._dim(k) for k, c in self.counts().items())

    def by(self, index: int) -> dict[Any, float]:
        """Site sparsity grouped by site (``index`` 0) or by layer (1)."""
        groups: dict[Any, list[Key]] = {}
        for key in self._counts:
            groups.setdefault(key[index], []).append(key)
        return {g: self._fraction(keys) for g, keys in sorted(groups.items())}

    def skipped_per_token(self) -> float:
        """Weight elements a kernel skips per sparse token, summed over (site, layer), less the
        extra weights it reads instead (low-rank factors)."""
        counts = self.counts()
        return sum(
            c[0] / c[1] * self._weight(key) - self._extra(key) for key, c in counts.items() if c[1]
        )

    def summary(self) -> dict[str, Any]:
        """The phase's numbers, JSON-ready (see the module docstring)."""
        counts = self.counts()
        sparse = max((c[1] for c in counts.values()), default=0)
        dense = max((c[2] for c in counts.values()), default=0)
        out: dict[str, Any] = {
            "site_sparsity": self.site_sparsity,
            "entry_fraction": self._fraction(list(counts), weighted=False),
            "entries": self.entries,
            "dense_prompt_entries": sum(c[2] * self._dim(k) for k, c in counts.items()),
            "sparse_positions": sparse,
            "dense_positions": dense,
            "by_site": self.by(0),
            "by_layer": {str(k): v for k, v in self.by(1).items()},
        }
        if self.cost is not None:
            skipped = self.skipped_per_token()
            sparse_bytes = self.cost.element_bytes * (self.cost.dense_elements - skipped)
            out.update(
                model_sparsity=skipped / self.cost.block_weights,
                weight_bytes_per_token=sparse_bytes,
                dense_weight_bytes_per_token=self.cost.dense_bytes,
                lm_head_bytes_per_token=self.cost.element_bytes * self.cost.head_weights,
                ideal_speedup=self.cost.dense_bytes / sparse_bytes,
            )
        return out
