"""How even is the sparsity a method achieves, token by token?

Top-k drops exactly the same fraction from every token; a calibrated threshold meets its target
only on average. Per token, the fraction of zeroed entries over all the method's sites (each
weighted by the weights it gates, as in ``achieved_sparsity``), for prompt (prefill) tokens and
generated (decode) tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moyu_exp.decode import ModelStepper, greedy
from moyu_exp.families import hooked
from moyu_exp.lazy import lazy_import
from moyu_exp.probes import common, figures
from moyu_exp.probes.base import Probe, ProbeOutput, register
from moyu_exp.strategies import STRATEGIES

torch = lazy_import("torch")


@register("sparsity_variance")
@dataclass(eq=False)
class SparsityVariance(Probe):
    name: str = "sparsity_variance"
    prompt_tokens: int = 256
    decode_tokens: int = 64
    strategies: list[str] = field(default_factory=lambda: ["topk", "cats", "chess", "teal"])

    question = "Is the achieved sparsity the same for every token, prefill and decode?"

    def run(self, loaded, cfg) -> ProbeOutput:
        prompt = common.prose_ids(loaded.tokenizer, self.prompt_tokens)
        per_token = {name: self.per_token(loaded, cfg, name, prompt) for name in self.strategies}
        numbers: dict = {"sparsity": self.sparsity, "strategies": {}}
        for name, phases in per_token.items():
            numbers["strategies"][name] = {
                phase: describe(values) for phase, values in phases.items()
            }
        fig, axes = figures.figure(1, width=7.0, height=4.2)
        data, labels = [], []
        for name, phases in per_token.items():
            for phase in ("prefill", "decode"):
                data.append(phases[phase].numpy())
                labels.append(f"{name}\n{phase}")
        axes[0].boxplot(data, tick_labels=labels, showfliers=True)
        axes[0].axhline(self.sparsity, color="black", lw=1, ls=":", label="target")
        axes[0].set(ylabel="achieved sparsity of the token", title="per-token sparsity")
        axes[0].tick_params(axis="x", labelsize=7)
        axes[0].legend()
        return ProbeOutput(numbers, {"sparsity_variance": figures.finish(fig, self.question)})

    def per_token(self, loaded, cfg, name: str, prompt) -> dict[str, torch.Tensor]:
        from moyu_exp import calibration

        strategy = STRATEGIES[name](sparsity=self.sparsity)
        state, _ = calibration.prepare(strategy, loaded, cfg)
        current: dict[str, torch.Tensor] = {}
        phases: dict[str, list[torch.Tensor]] = {"prefill": [], "decode": []}

        def observer(weight: int):
            def fn(x: torch.Tensor) -> torch.Tensor:  # after the strategy's own hook
                z = (x[0] == 0).float().sum(-1) * weight
                n = torch.full_like(z, x.shape[-1] * weight)
                current["zeros"] = current.get("zeros", 0) + z.cpu()
                current["entries"] = current.get("entries", 0) + n.cpu()
                return x

            return fn

        def collect(forward: int) -> None:
            phase = "prefill" if forward == 0 else "decode"
            phases[phase].append(current.pop("zeros") / current.pop("entries"))

        with strategy.attach(loaded.model, state) as live:
            weights = live.cost.weights_per_entry
            fns = [(key, observer(weights[key])) for key in weights]
            with hooked(loaded.model, fns):
                greedy(ModelStepper(loaded.model), prompt, self.decode_tokens + 1, collect)
        return {phase: torch.cat(values) for phase, values in phases.items()}


def describe(values: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(values, torch.tensor([0.05, 0.5, 0.95]))
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "p5": float(q[0]),
        "median": float(q[1]),
        "p95": float(q[2]),
        "tokens": int(values.numel()),
    }
