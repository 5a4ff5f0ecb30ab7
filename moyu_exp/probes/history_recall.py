"""History-related activation uncertainty: does a selection made from the prompt still cover the
neurons that later tokens need?

P_l = GRIFFIN's set from a prompt of T tokens; for the token at distance d after the prompt,
recall |P_l ∩ A_l(t)| / k and Jaccard(P_l, A_l(t)), on the text's own continuation
(teacher-forced) and on the model's greedy generation. Chance level is 1 - s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moyu_exp.lazy import lazy_import
from moyu_exp.probes import common, figures
from moyu_exp.probes.base import Probe, ProbeOutput, register

torch = lazy_import("torch")


@register("history_recall")
@dataclass(eq=False)
class HistoryRecall(Probe):
    name: str = "history_recall"
    prompt_tokens: list[int] = field(default_factory=lambda: [16, 64, 256])
    max_distance: int = 256
    starts: list[int] = field(default_factory=lambda: [0, 700])  # token offsets into the prose
    generate: bool = True

    question = "Does recall of prompt-selected neurons fall with distance from the prompt?"

    def run(self, loaded, cfg) -> ProbeOutput:
        longest = max(self.prompt_tokens) + self.max_distance + max(self.starts)
        text = common.prose_ids(loaded.tokenizer, longest)
        modes = ["teacher_forced"] + (["generated"] if self.generate else [])
        curves: dict[str, dict[int, torch.Tensor]] = {m: {} for m in modes}  # (layers, d)
        for prompt_len in self.prompt_tokens:
            per_mode: dict[str, list[torch.Tensor]] = {m: [] for m in modes}
            for start in self.starts:
                ids = text[:, start : start + prompt_len + self.max_distance]
                z = common.intermediates(loaded, ids)
                prompt = {i: zi[:prompt_len] for i, zi in z.items()}
                later = {i: zi[prompt_len:] for i, zi in z.items()}
                per_mode["teacher_forced"].append(self.recall_by_distance(prompt, later))
                if self.generate:
                    _, prefill, decode = common.generate(
                        loaded, ids[:, :prompt_len], self.max_distance
                    )
                    prompt = {i: prefill[(common.SITE, i)] for i in z}
                    later = {i: decode[(common.SITE, i)] for i in z}
                    per_mode["generated"].append(self.recall_by_distance(prompt, later))
            for mode in modes:
                curves[mode][prompt_len] = torch.stack(per_mode[mode]).mean(0)

        chance = 1 - self.sparsity
        numbers: dict = {"chance": chance, "distances": list(range(1, self.max_distance + 1))}
        for mode in modes:
            numbers[mode] = {}
            for prompt_len, recall in curves[mode].items():
                mean = recall.mean(0)  # over layers
                numbers[mode][str(prompt_len)] = {
                    "recall_by_distance": mean.tolist(),
                    "recall_first_16": float(mean[:16].mean()),
                    "recall_last_64": float(mean[-64:].mean()),
                    "recall_by_layer": recall.mean(1).tolist(),
                }
        return ProbeOutput(numbers, {"history_recall": self.plot(curves, chance)})

    def recall_by_distance(self, prompt, later) -> torch.Tensor:
        """(layers, distances): recall of the prompt set in each later token's top-k."""
        rows = []
        for layer in sorted(prompt):
            chosen = common.prompt_set(prompt[layer], self.sparsity)
            rows.append(common.recall(chosen, common.topk_sets(later[layer], self.sparsity)))
        return torch.stack(rows)

    def plot(self, curves, chance):
        fig, axes = figures.figure(2, width=5.4, height=4.0)
        distances = torch.arange(1, self.max_distance + 1)
        for mode, style in (("teacher_forced", "-"), ("generated", "--")):
            for prompt_len, recall in curves.get(mode, {}).items():
                axes[0].plot(distances, recall.mean(0), style, label=f"T={prompt_len}, {mode}")
        axes[0].axhline(chance, color="black", lw=1, ls=":", label="chance (1 - s)")
        axes[0].set(
            xlabel="distance d after the prompt",
            ylabel="recall of P_l in A_l(t)",
            xscale="log",
            title="recall vs distance (mean over layers)",
        )
        axes[0].legend(fontsize=7)
        mid = sorted(curves["teacher_forced"])[len(curves["teacher_forced"]) // 2]
        figures.heatmap(
            fig,
            axes[1],
            curves["teacher_forced"][mid].numpy(),
            "distance d",
            "layer",
            f"recall per layer (T={mid}, teacher-forced)",
        )
        return figures.finish(fig, self.question)
