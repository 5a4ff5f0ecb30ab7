"""Semantic or positional? Jaccard of sequence-level sets for pairs run apart vs run together.

For a pair (A, B): J_apart = J(M(A), M(B)) with each set from its own run; J_together =
J(M(A), M(B | A)), where M(B | A) is selected from B's positions when B follows A in one
sequence. Related sentence pairs share meaning; random-token pairs share nothing. If the
selection were semantic, only related pairs would overlap; inertia from the preceding tokens
makes B's set follow A's whatever the meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

from moyu_exp.lazy import lazy_import
from moyu_exp.probes import common, figures
from moyu_exp.probes.base import Probe, ProbeOutput, register

torch = lazy_import("torch")

RELATED = [
    (
        "The river flooded the low fields after a week of heavy rain.",
        "After days of rain, water from the swollen river covered the farmland.",
    ),
    (
        "She tuned the old piano before the evening concert.",
        "Before the concert that night, the aging piano was brought back into tune.",
    ),
    (
        "The bakery sells fresh bread every morning at six.",
        "Every day at dawn the baker puts warm loaves on the shelves.",
    ),
    (
        "Bees carry pollen from flower to flower across the meadow.",
        "In the meadow, insects move pollen between the blossoms they visit.",
    ),
    (
        "The train was delayed because of snow on the tracks.",
        "Heavy snow covering the rails held up the railway service.",
    ),
    (
        "He repaired the bicycle's flat tyre with a patch kit.",
        "Using a small kit, he patched the punctured tyre of his bike.",
    ),
    (
        "The museum opened a new exhibition about ancient coins.",
        "A display of old coins from antiquity has just opened at the museum.",
    ),
    (
        "Children played football in the park until it grew dark.",
        "The kids kicked a ball around the park until night fell.",
    ),
    (
        "The doctor advised him to drink more water and rest.",
        "His physician told him to rest and stay well hydrated.",
    ),
    (
        "A strong wind knocked down several trees on our street.",
        "Gusts brought down a number of trees along the road where we live.",
    ),
    (
        "The committee approved the budget after a long debate.",
        "Following lengthy discussion, the panel voted to accept the spending plan.",
    ),
    (
        "Our cat sleeps on the windowsill in the afternoon sun.",
        "In the afternoon, the cat naps in the sunshine by the window.",
    ),
]


@register("semantic_vs_positional")
@dataclass(eq=False)
class SemanticVsPositional(Probe):
    name: str = "semantic_vs_positional"
    pairs: int = 12
    seed: int = 0

    question = "Is the prompt set driven by meaning, or by the tokens that came before?"

    def run(self, loaded, cfg) -> ProbeOutput:
        tok = loaded.tokenizer
        related = [
            (tok(a, add_special_tokens=False).input_ids, tok(b, add_special_tokens=False).input_ids)
            for a, b in RELATED[: self.pairs]
        ]
        generator = torch.Generator().manual_seed(self.seed)
        vocab = common.vocab(loaded)
        random = [
            (
                torch.randint(vocab, (len(a),), generator=generator).tolist(),
                torch.randint(vocab, (len(b),), generator=generator).tolist(),
            )
            for a, b in related
        ]
        numbers: dict = {}
        curves = {}
        for group, pairs in (("related", related), ("random", random)):
            apart, together, self_kept = [], [], []
            for a, b in pairs:
                za = common.intermediates(loaded, torch.tensor([a]))
                zb = common.intermediates(loaded, torch.tensor([b]))
                zab = common.intermediates(loaded, torch.tensor([a + b]))
                row_apart, row_together, row_self = [], [], []
                for layer in sorted(za):
                    ma = common.prompt_set(za[layer], self.sparsity)
                    mb = common.prompt_set(zb[layer], self.sparsity)
                    mb_after_a = common.prompt_set(zab[layer][len(a) :], self.sparsity)
                    row_apart.append(common.jaccard(ma, mb))
                    row_together.append(common.jaccard(ma, mb_after_a))
                    row_self.append(common.jaccard(mb, mb_after_a))
                apart.append(torch.stack(row_apart))
                together.append(torch.stack(row_together))
                self_kept.append(torch.stack(row_self))
            stats = {
                "apart": torch.stack(apart).mean(0),
                "together": torch.stack(together).mean(0),
                "own_set_kept": torch.stack(self_kept).mean(0),
            }
            curves[group] = stats
            numbers[group] = {
                name: {"per_layer": v.tolist(), "mean": float(v.mean())}
                for name, v in stats.items()
            }
        numbers["chance"] = (1 - self.sparsity) / (1 + self.sparsity)
        fig, axes = figures.figure(2, width=5.4, height=4.0)
        for ax, group in zip(axes, ("related", "random"), strict=True):
            for name, values in curves[group].items():
                ax.plot(values, label=name)
            ax.axhline(numbers["chance"], color="black", lw=1, ls=":", label="independent")
            ax.set(
                xlabel="layer",
                ylabel="Jaccard of sequence-level sets",
                ylim=(0, 1),
                title=f"{group} pairs",
            )
            ax.legend(fontsize=7)
        return ProbeOutput(numbers, {"semantic_vs_positional": figures.finish(fig, self.question)})
