"""MOYU: our method, a prompt-level MLP set shaped by what the probes measured.

The findings (docs/findings.md) say: a token's own top-k set is the most faithful but needs the
whole gate and up projections; a set chosen once from the prompt streams like a dense MLP (a
compact MLP: GRIFFIN 1.39x at s = 0.5 on SmolLM2, 0.98 of the bytes-bound ideal) but recalls
only 55-59% of a later token's top-k; hot neurons shared by unrelated inputs exist and deepen
with depth; how much a layer's dropped neurons cost (CETT, block error) differs between layers.
So the rule keeps GRIFFIN's streaming form, a neuron set per layer frozen after the prompt and
run as a compact MLP, and changes how big each layer's set is and what goes into it:

- **layer allocation** (``allocation=profile``): layers keep different numbers of neurons, the
  mean over layers meeting ``sparsity`` (so the bytes a kernel skips are GRIFFIN's at the same
  sparsity). Calibration builds each layer's cost curve at the levels 0, 0.05, ..., 0.95 of its
  neurons dropped, with only that layer running its own prompt set, on calibration segments of
  ``profile_tokens`` prompt tokens then as many continuation tokens: the *error energy* E_l(b),
  the squared norm of the change the dropped neurons make to the MLP branch (after Gemma's
  post-MLP norm) relative to the squared norm of the block output, averaged over the
  continuation tokens; and the layer's *gain* g_l = KL_l(0.5) / E_l(0.5), the end-to-end KL
  to the dense model's next-token distribution over the continuation when that layer alone
  drops half its neurons, per unit of energy (one forward per layer). The cost curve is
  E_l(b) g_l^gamma (``gain_power`` = gamma = 0.5). The allocation then greedily drops the band
  of 0.05 d_ff neurons whose cost increase is least, as TEAL's greedy search does for its
  levels, and takes the remainder (less than a band) from the layer it would go to next.
  ``uniform`` keeps k = round((1 - s) d_ff) everywhere (GRIFFIN's);
- **hot prior** (``prior_tokens`` = tau): semantic-irrelevant inertia as a prior. The
  calibration mean p_j of (z_tj / ||z_t||)^2 is added as tau pseudo-tokens of prompt,
  score_j = sum_t (z_tj / ||z_t||)^2 + tau p_j, so a short prompt (an lm-eval context of 10-40
  tokens) leans on the neurons that are hot everywhere and a long one on itself; tau = 0 is
  GRIFFIN's ranking (its score is the square root of the first term);
- **output weighting** (``output_weighted``): score_j times ||W_down[:, j]||^2, a neuron's share
  of the MLP output rather than of the intermediate (off by default: measured worse, below);
- **attention** (``attn_sparsity`` = 0.5): TEAL's magnitude thresholds on the attention input
  and the o_proj input at one level (quantiles of the dense model's |x| on the calibration
  rows), for the bytes a compact MLP cannot skip (about a fifth of SmolLM2's); 0 leaves
  attention dense, None (``null``) puts them at the target sparsity. Like GRIFFIN's set, the
  thresholds act where the protocol runs sparse (not on the prompt). At sparsity 0 every
  component is off: the dense model;
- **attention allocation** (``attn_allocation``): ``uniform`` puts that level on both sites of
  every layer; ``greedy`` takes the two sites' levels, per layer, from TEAL's greedy path
  (:mod:`moyu_exp.strategies.greedy`) at block sparsity ``attn_sparsity``, the row TEAL itself
  would use at that target (above its path's 0.9, the last row): the same search and cache as
  ``strategy=teal`` (hours on a CPU the first time on a model, then shared by both methods);
- **input thresholds on the compact MLP** (``mlp_input_sparsity``): TEAL's magnitude threshold
  on the MLP input (shared by gate and up) at this level, per token, over the frozen set: the
  kernel reads, of the compact gate/up rows, only the columns of kept input entries (2 k
  weights per dropped entry for a set of k neurons, which the cost model counts). The frozen
  set's floor is what the probes predict (a set from the prompt misses most of a token's own
  top-k), while per-token input thresholds cost little (TEAL's greedy search puts a level of
  0.2-0.3 on the MLP input at its lowest targets); so the bytes are bought per token rather than
  from a larger frozen drop. 0 (off) reads the compact MLP densely.

``prior_tokens=0 output_weighted=false allocation=uniform attn_sparsity=0`` is GRIFFIN's rule
exactly (tested). Protocol: GRIFFIN's (``prefill=last_token``): the prompt runs dense and
chooses the set, frozen for the scored position and every decode step.

How the defaults were chosen (SmolLM2, embedded KL with the first half of each window a dense
prompt, s = 0.3 / 0.5 / 0.7, 2026-11-30; the embedded text is also the frontier's, so these
choices were tuned on it; piqa and Gemma 3 were not used): GRIFFIN 0.277 / 0.647 / 1.392.
Allocation by error energy alone (gamma = 0) with the prior (tau = 64): 0.335 / 0.566 / 0.920;
by gain-scaled energy, gamma = 1: 0.237 / 0.547 / 1.137 (it empties layers 3-7 at 0.7); gamma =
0.5: 0.254 / 0.492 / 0.925 (the default). Bounding each layer within 0.15 or 0.3 of the target
(OWL's bound) did not help (1.198 / 1.230 at 0.7, gamma = 1). The prior, with the allocation
(energy alone) at 0.5 / 0.7: tau = 0 0.585 / 0.976, 16 0.582 / 0.958, 64 0.566 / 0.920, 256
0.573 / 0.950, 1024 0.609 / 0.947. Output weighting (tau = 16, uniform sizes) at 0.5: 0.700,
against 0.638 without it. Summing relative errors instead of energies (concave curves) emptied
whole layers and doubled the KL (1.108 at 0.5). The attention (same text, KL read at ideal speedups
1.2x / 1.4x / 1.7x of the frontier preset): uniform at 0.5 0.129 / 0.295 / 0.527; TEAL's greedy
levels at 0.5 0.116 / 0.292 / 0.551; at the target (null) 0.161 / 0.315 / 0.518 (greedy: 0.167 /
0.324 / 0.532); greedy at 0.6 0.130 / 0.300, at 0.7 0.191 / 0.347 / 0.534. ``mlp_input_sparsity``
(measured speedups, two runs averaged): 0 0.085 / 0.324 / 0.687; 0.5 0.126 / 0.255 / 0.579 (ideal:
0.129 / 0.295 / 0.527 against 0.090 / 0.181 / 0.387); 0.7 breaks the model (KL 1.30 at s = 0.1).
Off by default: it costs the lowest level on SmolLM2 and the highest on Gemma 3 (docs/findings.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

from tqdm.auto import tqdm

from moyu_exp.activations import ValueSample, observe, threshold_at
from moyu_exp.config import AT_LEAST_0, SPARSITY, Range, check_choice
from moyu_exp.errors import ConfigError
from moyu_exp.families import adapter_for, hooked
from moyu_exp.lazy import lazy_import
from moyu_exp.masking import KernelRule
from moyu_exp.strategies.base import Strategy, keep_count, register, topk_mask
from moyu_exp.strategies.greedy import paths_reach
from moyu_exp.strategies.sequence import SITE, SequenceLevel, prompt_energy
from moyu_exp.strategies.teal import TEAL_SITES, Teal, path_levels, published_paths

torch = lazy_import("torch")

ATTENTION_SITES = ("attn_input", "o_proj_input")
INPUT_SITE = "mlp_input"  # the compact MLP's input (gate and up), under mlp_input_sparsity
THRESHOLD_SITES = (*ATTENTION_SITES, INPUT_SITE)
ALLOCATIONS = ("profile", "uniform")
ATTENTION_ALLOCATIONS = ("uniform", "greedy")
BANDS = 20  # allocation levels 0, 0.05, ..., 0.95 of a layer's neurons
PROFILE_SEGMENTS = 32  # calibration segments (prompt + continuation) the profile reads
PROFILE_PASSES = 3.0  # what the profile costs, in passes over the calibration tokens (SmolLM2)
GAIN_LEVEL = 0.5  # where each layer's end-to-end KL scales its local error energies
GAIN_SEGMENTS = 4  # segments of that measurement (one forward per layer)
PROFILE_VERSION = 4  # 1: relative local error; 2: its square; 3: scaled to the KL; 4: apart


@register("moyu")
@dataclass(eq=False)
class Moyu(SequenceLevel):
    name: str = "moyu"
    # the attention sites act only while attn_sparsity > 0, mlp_input while mlp_input_sparsity > 0
    sites: list[str] = field(default_factory=lambda: [*THRESHOLD_SITES, SITE])
    prefill: str = "last_token"  # GRIFFIN's protocol: the set comes from the prompt
    # times ||W_down[:, j]||^2 (a neuron's output energy; measured worse)
    output_weighted: bool = False
    # the calibration-wide hot prior, as this many pseudo prompt tokens (0: off)
    prior_tokens: float = 64.0
    # per-layer set sizes from the calibrated cost profile, or uniform (GRIFFIN)
    allocation: str = "profile"
    gain_power: float = 0.5  # cost = error energy x (end-to-end gain)^this (0: energy alone)
    attn_sparsity: float | None = 0.5  # None: the target sparsity
    # or greedy: the two levels per layer from TEAL's greedy path there
    attn_allocation: str = "uniform"
    # TEAL thresholds on the compact MLP's input (gate/up columns; 0: off)
    mlp_input_sparsity: float = 0.0
    # prompt (and continuation) tokens of each calibration profile segment
    profile_tokens: int = 128
    RANGES: ClassVar[dict[str, Range]] = {
        **Strategy.RANGES,
        "prior_tokens": AT_LEAST_0,
        "attn_sparsity": SPARSITY,
        "mlp_input_sparsity": SPARSITY,
        "gain_power": AT_LEAST_0,
    }
    allowed_sites = (*THRESHOLD_SITES, SITE)
    needs_calibration = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("strategy.allocation", self.allocation, ALLOCATIONS)
        check_choice("strategy.attn_allocation", self.attn_allocation, ATTENTION_ALLOCATIONS)
        if SITE not in self.sites:
            raise ConfigError(f"strategy 'moyu' needs the site {SITE} (its neuron set)")
        off = (ATTENTION_SITES if self.attn_sparsity == 0.0 else ()) + (
            (INPUT_SITE,) if self.mlp_input_sparsity == 0.0 else ()
        )  # a component at 0 stays dense: no hooks, no kernel copies
        self.sites = [site for site in self.sites if site not in off]

    # ------------------------------------------------------------------- calibration
    def calibration_key(self) -> dict[str, Any]:
        return super().calibration_key() | {
            "output_weighted": self.output_weighted,
            "prior_tokens": self.prior_tokens,
            "profile_tokens": self.profile_tokens,
            "profile": PROFILE_VERSION if self.allocation == "profile" else None,
            "attn_path": self._teal_path_key(),
        }

    @property
    def reads_teal_path(self) -> bool:
        """Whether the attention levels come from TEAL's greedy path."""
        return self.attn_allocation == "greedy" and self.attn_sparsity != 0.0

    @property
    def attn_target(self) -> float:
        """The attention sites' target: ``attn_sparsity``, or the sparsity when it is None."""
        return self.sparsity if self.attn_sparsity is None else self.attn_sparsity

    def serves(self, calibration: dict) -> bool:
        """A stored state serves this configuration when TEAL's paths (if read) reach it."""
        return paths_reach(calibration, self.attn_target)

    def _teal_path_key(self) -> dict[str, Any] | None:
        """What TEAL's greedy path depends on, when it is read (else None)."""
        if not self.reads_teal_path:
            return None
        teal = Teal(layers=self.layers)
        return {"version": teal.calibration_version, **teal.greedy_params()}

    def _parts(self, layers: list[int]) -> dict[str, dict[str, Any]]:
        """The calibration parts this configuration reads: {label: parameters}."""
        parts = {"statistics": {"layers": layers, "tables": list(THRESHOLD_SITES)}}
        if self.allocation == "profile":
            parts["profile"] = {
                "layers": layers,
                "prior_tokens": self.prior_tokens,
                "output_weighted": self.output_weighted,
                "profile_tokens": self.profile_tokens,
                "version": PROFILE_VERSION,
            }
        return parts

    def calibrate(self, model, batches, cached) -> dict[str, torch.Tensor]:
        layers = self.layer_ids(model)
        parts = self._parts(layers)
        compute = {
            "statistics": lambda: statistics(model, batches, layers),
            "profile": lambda: self._profile(model, batches, layers, state),
        }
        state: dict[str, torch.Tensor] = {}
        for label, params in parts.items():
            state = state | cached(label, params, compute[label])
        if self.reads_teal_path:
            state = state | published_paths(model, batches, self.layers, self.attn_target, cached)
        return state

    def calibration_estimate(self, model, batches, cached) -> float:
        """The parts not stored yet: the statistics' pass, the profile's (about three passes:
        its segments run at every band); TEAL's search says its own cost."""
        from moyu_exp.activations import forward_seconds

        passes = {"statistics": 1.0, "profile": PROFILE_PASSES}
        parts = self._parts(self.layer_ids(model))
        todo = sum(passes[lb] for lb, params in parts.items() if cached.stored(lb, params) is None)
        return todo * forward_seconds(model, batches) if todo else 0.0

    def _profile(self, model, batches, layers, stats) -> dict[str, torch.Tensor]:
        """Per layer, what its cost curve needs (see the module docstring and :meth:`profile`):
        {"energy.<layer>": (BANDS,)}, its prompt set's error energy at each band, summed over
        the profile's forwards (a factor common to every layer), and {"gain.<layer>": (1,)},
        the end-to-end KL per unit of that energy at GAIN_LEVEL."""
        prompt = self.profile_tokens
        segment = 2 * prompt
        rows = torch.cat([b[:, : b.shape[1] // segment * segment] for b in batches], dim=1)
        segments = rows.reshape(-1, segment)[:PROFILE_SEGMENTS]
        if segments.shape[0] == 0:
            raise ConfigError(
                f"strategy.profile_tokens={self.profile_tokens}: the calibration rows are "
                f"shorter than {segment} tokens; lower it or raise calibration.seq_len"
            )
        adapter = adapter_for(model)
        blocks = adapter.layers(model)
        downs = {i: adapter.readers(blocks[i], SITE)[0] for i in layers}
        weights = {i: self._neuron_weights(stats, i, downs[i]) for i in layers}
        energy = {i: torch.zeros(BANDS, dtype=torch.float64) for i in layers}
        delta: dict[int, torch.Tensor] = {}

        def on_z(_site: str, layer: int, z: torch.Tensor) -> None:
            score = self.score(z[:, :prompt], None, weights[layer])
            post = adapter.post_norm(blocks[layer], "mlp")
            delta[layer] = band_errors(z[:, prompt:], score, downs[layer], post)

        def on_output(layer: int):
            def hook(_module, _args, output):
                h = output[0] if isinstance(output, tuple) else output
                norm = h[:, prompt:].float().norm(dim=-1).clamp_min(1e-12).cpu()
                energy[layer] += (delta.pop(layer) / norm[..., None]).square().mean(dim=(0, 1))

            return hook

        handles = [blocks[i].register_forward_hook(on_output(i)) for i in layers]
        try:
            observe(
                model, list(segments.split(8)), [(SITE, i) for i in layers], on_z, "moyu profile"
            )
        finally:
            for handle in handles:
                handle.remove()
        # each layer's gain: the end-to-end KL of its prompt set at GAIN_LEVEL, per unit energy
        ids = segments[:GAIN_SEGMENTS]
        reference = continuation_logprobs(model, ids, prompt)
        band = round(GAIN_LEVEL * BANDS)
        profiles = {}
        for layer in tqdm(layers, desc="moyu layer gains", leave=False):
            keeps = {layer: keep_count(GAIN_LEVEL, downs[layer].in_features)}
            state = SimpleNamespace(weights=weights, keeps=keeps)

            def frozen(z: torch.Tensor, state=state, layer=layer) -> torch.Tensor:
                kept = self.select(z[:, :prompt], None, state, layer)
                return torch.cat([z[:, :prompt], z[:, prompt:] * kept[:, None]], dim=1)

            with hooked(model, [((SITE, layer), frozen)]):
                logp = continuation_logprobs(model, ids, prompt)
            kl = float((reference.exp() * (reference - logp)).sum(-1).mean())
            profiles[f"energy.{layer}"] = energy[layer].float()
            profiles[f"gain.{layer}"] = torch.tensor([kl / max(float(energy[layer][band]), 1e-30)])
        return profiles

    # ---------------------------------------------------------------------- decisions
    def prepare(self, model, adapter, layers, calibration) -> SimpleNamespace:
        d_ff = adapter.dim(model, SITE)
        if self.allocation == "profile":
            profiles = torch.stack([self.profile(calibration, i) for i in layers])
            keeps = dict(zip(layers, allocate(profiles, self.sparsity, d_ff), strict=True))
        else:
            keeps = dict.fromkeys(layers, keep_count(self.sparsity, d_ff))
        blocks = adapter.layers(model)
        weights = {
            i: self._neuron_weights(calibration, i, adapter.readers(blocks[i], SITE)[0])
            for i in layers
        }
        rules = {
            (site, i): KernelRule(threshold=threshold_at(calibration[f"table.{site}.{i}"], level))
            for i in layers
            for site, level in self.threshold_levels(calibration, i).items()
        }
        return SimpleNamespace(frozen={}, keeps=keeps, weights=weights, rules=rules)

    def threshold_levels(self, calibration: dict, layer: int) -> dict[str, float]:
        """The level of each magnitude-threshold site in ``layer``: the attention's and, while
        ``mlp_input_sparsity`` > 0, the compact MLP input's. Sparsity 0: all 0 (dense)."""
        levels = self.attention_levels(calibration, layer)
        if INPUT_SITE in self.sites:
            levels[INPUT_SITE] = self.mlp_input_sparsity if self.sparsity > 0 else 0.0
        return levels

    def entry_weights(self, state) -> dict[tuple[str, int], int]:
        """A dropped compact-MLP input entry skips its column of the kept gate and up rows only
        (2 k weights, not 2 d_ff)."""
        if INPUT_SITE not in self.sites:
            return {}
        return {(INPUT_SITE, i): 2 * keep for i, keep in state.keeps.items()}

    def attention_levels(self, calibration: dict, layer: int) -> dict[str, float]:
        """The level of each attention site in ``layer``: ``attn_sparsity`` (or, if None, the
        target sparsity) on both, or with ``attn_allocation=greedy`` the levels TEAL's greedy
        path gives the two at that block sparsity. Sparsity 0: the dense model."""
        sites = [site for site in self.sites if site in ATTENTION_SITES]
        target = self.attn_target
        if self.sparsity == 0.0 or target == 0.0:
            return dict.fromkeys(sites, 0.0)
        if self.attn_allocation == "uniform":
            return dict.fromkeys(sites, target)
        levels = path_levels(calibration[f"greedy.{layer}"], target, list(TEAL_SITES))
        return {site: levels[site] for site in sites}

    def profile(self, calibration: dict, layer: int) -> torch.Tensor:
        """A layer's estimated KL at each of the BANDS levels: its error energies times its
        gain to the power ``gain_power`` (0: the energies alone)."""
        gain = float(calibration[f"gain.{layer}"][0]) ** self.gain_power
        return calibration[f"energy.{layer}"] * gain

    def kernel_rule(self, state, site: str, layer: int) -> KernelRule | None:
        return state.rules.get((site, layer))

    def select(self, z: torch.Tensor, prompt: torch.Tensor | None, state=None, layer: int = 0):
        return topk_mask(self.score(z, prompt, state.weights[layer]), state.keeps[layer])

    def score(self, z: torch.Tensor, prompt: torch.Tensor | None, weights) -> torch.Tensor:
        """Per row of ``z`` (batch, tokens, d_ff), each neuron's score from the ``prompt``
        positions (None: all): (sum_t (z_tj / ||z_t||)^2 + tau p_j) w_j, (batch, d_ff)."""
        prior, weight = (t.to(z.device) for t in weights)
        energy = prompt_energy(z, prompt, normalize_tokens=True)
        return (energy + self.prior_tokens * prior) * weight

    def _neuron_weights(self, calibration: dict, layer: int, down) -> tuple:
        """(the hot prior p, the output weight w = ||W_down[:, j]||^2 or 1), per neuron."""
        prior = calibration[f"prior.{layer}"]
        if not self.output_weighted:
            return prior, torch.ones_like(prior)
        return prior, down.weight.detach().float().square().sum(dim=0).cpu()


def statistics(model, batches, layers: list[int]) -> dict[str, torch.Tensor]:
    """The dense model's hot prior per layer (mean of (z_tj / ||z_t||)^2 over every calibration
    token) and quantile tables of |x| at the threshold sites (attention and MLP input)."""
    sums = {i: 0.0 for i in layers}
    count = {i: 0 for i in layers}
    sample = ValueSample(calls=len(batches))

    def tap(site: str, layer: int, x: torch.Tensor) -> None:
        if site == SITE:
            energy = prompt_energy(x, None, normalize_tokens=True).sum(dim=0).cpu()
            sums[layer] = sums[layer] + energy
            count[layer] += x.shape[0] * x.shape[1]
        else:
            sample.add((site, layer), x.abs())

    keys = [(s, i) for s in (*THRESHOLD_SITES, SITE) for i in layers]
    observe(model, batches, keys, tap, desc="moyu statistics")
    state = {f"prior.{i}": sums[i] / max(count[i], 1) for i in layers}
    return state | {f"table.{s}.{i}": sample.table((s, i)) for s in THRESHOLD_SITES for i in layers}


def band_errors(z: torch.Tensor, score: torch.Tensor, down, post) -> torch.Tensor:
    """||change of the MLP branch|| per continuation token when the neurons below each level
    of ``score`` are dropped: (segments, tokens, BANDS) on the CPU, level b dropping
    round(b d_ff / BANDS) of the lowest-scored neurons (level 0: none). ``down``: the down
    projection; ``post``: the norm on the branch's output (Gemma), or None."""
    z = z.float()
    weight = down.weight.float()
    d_ff = z.shape[-1]
    order = score.argsort(dim=-1)  # lowest first: dropped first
    full = torch.nn.functional.linear(z, weight)
    branch = full if post is None else post(full.to(down.weight.dtype)).float()
    out = torch.zeros(*z.shape[:2], BANDS, dtype=torch.float64)
    dropped = torch.zeros_like(full)
    edges = [round(b * d_ff / BANDS) for b in range(BANDS)]
    for b in range(1, BANDS):
        for row in range(z.shape[0]):
            band = order[row, edges[b - 1] : edges[b]]
            dropped[row] += z[row][:, band] @ weight[:, band].t()
        sparse = full - dropped
        if post is not None:
            sparse = post(sparse.to(down.weight.dtype)).float()
        out[..., b] = (sparse - branch).norm(dim=-1).cpu()
    return out


def continuation_logprobs(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Next-token log-probabilities at the positions after the first ``prompt`` of ``ids``."""
    logits = model(ids, use_cache=False).logits[:, prompt:]
    return logits.float().log_softmax(dim=-1)


def allocate(profiles: torch.Tensor, sparsity: float, d_ff: int) -> list[int]:
    """Neurons kept per layer: round((1 - s) d_ff) on average (exactly, in total), where the
    summed profile error is greedily the least.

    ``profiles`` (layers, BANDS): each layer's error with b bands of its neurons dropped. Whole
    bands go, one at a time, to the layer whose next band adds the least error (up to 0.95 of
    a layer); the remainder (less than that band) comes off that layer. Above 0.95 mean
    sparsity no band is left to spread: every layer keeps the same."""
    layers = profiles.shape[0]
    uniform = keep_count(sparsity, d_ff)
    if sparsity > (BANDS - 1) / BANDS:
        return [uniform] * layers
    curve = torch.cummax(profiles.double(), dim=1).values  # more dropped never costs less
    edges = [round(b * d_ff / BANDS) for b in range(BANDS)]
    bands, remainder = [0] * layers, layers * (d_ff - uniform)

    def increase(layer: int) -> float:
        b = bands[layer]
        return math.inf if b + 1 >= BANDS else float(curve[layer, b + 1] - curve[layer, b])

    while remainder > 0:
        layer = min(range(layers), key=increase)
        if increase(layer) == math.inf:
            break
        size = edges[bands[layer] + 1] - edges[bands[layer]]
        if size > remainder:
            break
        bands[layer] += 1
        remainder -= size
    keeps = [d_ff - edges[b] for b in bands]
    if remainder:
        keeps[layer] -= remainder
    return keeps
