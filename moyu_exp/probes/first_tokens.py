"""TDA's premise ("first activations matter"): how much of a prompt does a selection need?

The set is built from only the first m prompt tokens (m = 1, 2, 4, ..., T): its recall of the
later tokens' top-k sets, and the fidelity (KL to dense, top-1 agreement) on the embedded text
when that set is used as the strategy (GRIFFIN's selection with ``prompt_limit=m``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moyu_exp import datasets
from moyu_exp.lazy import lazy_import
from moyu_exp.probes import common, figures
from moyu_exp.probes.base import Probe, ProbeOutput, register
from moyu_exp.strategies.griffin import Griffin

torch = lazy_import("torch")


@register("first_tokens")
@dataclass(eq=False)
class FirstTokens(Probe):
    name: str = "first_tokens"
    prompt_tokens: int = 128
    later_tokens: int = 128
    starts: list[int] = field(default_factory=lambda: [0, 400, 800])
    evaluate: bool = True
    eval_documents: int = 6  # of the embedded evaluation text, for the fidelity column

    question = "How many first prompt tokens does a prompt-based selection need?"

    def run(self, loaded, cfg) -> ProbeOutput:
        ms = [2**i for i in range(self.prompt_tokens.bit_length()) if 2**i <= self.prompt_tokens]
        text = common.prose_ids(
            loaded.tokenizer, max(self.starts) + self.prompt_tokens + self.later_tokens
        )
        recall = torch.zeros(len(ms))
        for start in self.starts:
            ids = text[:, start : start + self.prompt_tokens + self.later_tokens]
            z = common.intermediates(loaded, ids)
            for i, m in enumerate(ms):
                per_layer = [
                    common.recall(
                        common.prompt_set(zl[:m], self.sparsity),
                        common.topk_sets(zl[self.prompt_tokens :], self.sparsity),
                    ).mean()
                    for zl in z.values()
                ]
                recall[i] += torch.stack(per_layer).mean() / len(self.starts)
        numbers: dict = {"m": ms, "recall": recall.tolist(), "chance": 1 - self.sparsity}
        if self.evaluate:
            from moyu_exp.evaluation import fidelity

            documents = datasets.embedded(split="evaluation")[: self.eval_documents]
            rows = []
            for m in [*ms, None]:
                # the prompt-selected set applied to the later half of each window
                strategy = Griffin(sparsity=self.sparsity, prompt_limit=m, prefill="dense")
                with strategy.attach(loaded.model) as live:
                    rows.append(fidelity.measure(loaded, live, documents, cfg.eval.prompt_fraction))
            numbers["kl"] = [r["kl"] for r in rows[:-1]]
            numbers["top1_agreement"] = [r["top1_agreement"] for r in rows[:-1]]
            numbers["full_prompt"] = rows[-1]
        fig, axes = figures.figure(2 if self.evaluate else 1, width=5.2, height=4.0)
        axes[0].plot(ms, numbers["recall"], marker="o")
        axes[0].axhline(numbers["chance"], color="black", lw=1, ls=":", label="chance")
        axes[0].set(
            xscale="log",
            xlabel="first m prompt tokens",
            ylabel="recall of later top-k",
            title=f"T={self.prompt_tokens}, next {self.later_tokens} tokens",
        )
        axes[0].legend()
        if self.evaluate:
            axes[1].plot(ms, numbers["kl"], marker="o", label="selection from first m")
            axes[1].axhline(
                numbers["full_prompt"]["kl"], color="black", ls="--", label="whole prompt"
            )
            axes[1].set(
                xscale="log",
                yscale="log",
                xlabel="first m prompt tokens",
                ylabel="KL(dense || sparse), nats",
                title="fidelity as a strategy",
            )
            axes[1].legend()
        return ProbeOutput(numbers, {"first_tokens": figures.finish(fig, self.question)})
