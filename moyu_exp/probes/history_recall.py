"""History-related activation uncertainty: does a selection made from the prompt still cover the
neurons that later tokens need?

P_l = GRIFFIN's set from a prompt of T tokens; for the token at distance d after the prompt,
recall |P_l ∩ A_l(t)| / k, Jaccard(P_l, A_l(t)) and the mass recall
sum_{j in P_l} |z_tj| / sum_{j in A_l(t)} |z_tj| (the magnitude the prompt set keeps, relative to
the token's own top-k: 1 is as good as an oracle), on the text's own continuation
(teacher-forced) and on the model's greedy generation. Chance level of the recall is 1 - s.
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
        curves: dict[str, dict[int, dict[str, torch.Tensor]]] = {m: {} for m in modes}
        for prompt_len in self.prompt_tokens:
            per_mode: dict[str, list[dict[str, torch.Tensor]]] = {m: [] for m in modes}
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
                runs = per_mode[mode]
                curves[mode][prompt_len] = {
                    m: torch.stack([r[m] for r in runs]).mean(0) for m in runs[0]
                }

        chance = 1 - self.sparsity
        numbers: dict = {"chance": chance, "distances": list(range(1, self.max_distance + 1))}
        for mode in modes:
            numbers[mode] = {}
            for prompt_len, measured in curves[mode].items():
                entry: dict = {}
                for metric, values in measured.items():
                    mean = values.mean(0)  # over layers
                    entry[f"{metric}_by_distance"] = mean.tolist()
                    entry[f"{metric}_first_16"] = float(mean[:16].mean())
                    entry[f"{metric}_last_64"] = float(mean[-64:].mean())
                    entry[f"{metric}_by_layer"] = values.mean(1).tolist()
                numbers[mode][str(prompt_len)] = entry
        return ProbeOutput(numbers, {"history_recall": self.plot(curves, chance)})

    def recall_by_distance(self, prompt, later) -> dict[str, torch.Tensor]:
        """``recall``, ``jaccard`` and ``mass_recall`` of the prompt set against each later
        token's top-k, each (layers, distances)."""
        rows: dict[str, list[torch.Tensor]] = {"recall": [], "jaccard": [], "mass_recall": []}
        for layer in sorted(prompt):
            chosen = common.prompt_set(prompt[layer], self.sparsity)
            sets = common.topk_sets(later[layer], self.sparsity)
            magnitude = later[layer].abs()
            oracle = (magnitude * sets).sum(-1).clamp_min(1e-12)
            rows["recall"].append(common.recall(chosen, sets))
            rows["jaccard"].append(common.jaccard(chosen, sets))
            rows["mass_recall"].append((magnitude * chosen).sum(-1) / oracle)
        return {metric: torch.stack(values) for metric, values in rows.items()}

    def plot(self, curves, chance):
        fig, axes = figures.figure(3, width=5.4, height=4.0)
        distances = torch.arange(1, self.max_distance + 1)
        for ax, metric, label in (
            (axes[0], "recall", "recall of P_l in A_l(t)"),
            (axes[1], "mass_recall", "|z_t| kept by P_l / by A_l(t)"),
        ):
            for mode, style in (("teacher_forced", "-"), ("generated", "--")):
                for prompt_len, measured in curves.get(mode, {}).items():
                    curve = measured[metric].mean(0)
                    ax.plot(distances, curve, style, label=f"T={prompt_len}, {mode}")
            ax.set(xlabel="distance d after the prompt", ylabel=label, xscale="log")
            ax.set_title(f"{metric} vs distance (mean over layers)")
        axes[0].axhline(chance, color="black", lw=1, ls=":", label="chance (1 - s)")
        axes[0].legend(fontsize=7)
        mid = sorted(curves["teacher_forced"])[len(curves["teacher_forced"]) // 2]
        figures.heatmap(
            fig,
            axes[2],
            curves["teacher_forced"][mid]["recall"].numpy(),
            "distance d",
            "layer",
            f"recall per layer (T={mid}, teacher-forced)",
        )
        return figures.finish(fig, self.question)
