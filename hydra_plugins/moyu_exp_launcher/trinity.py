"""The trinity sweeper (``+sweep=trinity``, ``hydra/sweeper=trinity``): accuracy x speed x
generality of every method, each at the sparsities where its own measured speed curve crosses
the given speedup levels (:mod:`moyu_exp.trinity`).

It launches two batches through whichever launcher is configured (basic, joblib, SLURM: one
job array each):

1. the **speed pass**: every combination of the sweep's axes (``model``, ``strategy`` and any
   other) at each sparsity of ``grid``, bench only (``eval=none``'s name, no tasks);
2. the **evaluation pass**: each combination at the sparsity where its curve crosses each of
   ``levels`` (interpolated, from the dense model's 1x), and the dense model once per model,
   with the evaluation (and a bench at that sparsity: the measured speed the report shows). A
   method whose grid points are one point (one key: its sparsity only switches it on, as
   CETT's, whose ``strategy.target`` sets how much it skips) is evaluated at that point where
   it reaches the level, without interpolation.

Both passes' points are ordinary points: cached, so a rerun serves them (the speed pass's
speedups, hence the crossings and the evaluation pass's keys, come back identical), and an
interrupted sweep resumes where it stopped. The report is written when the sweep ends
(:class:`moyu_exp.sweep.AggregateCallback`).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("moyu_exp.trinity")

# the speed pass's points: no evaluation (``eval.name`` puts them in a folder of their own)
SPEED_PASS = ["eval.name=none", "eval.tasks=[]", "eval.fidelity=false", "eval.generation=false"]


class TrinitySweeper(Sweeper):
    def __init__(
        self,
        levels: Sequence[float],
        grid: Sequence[float],
        axis: str = "speedup",
        target: float = 0.95,
        report_dir: str | None = None,
        params: dict[str, str] | None = None,
    ) -> None:
        from moyu_exp.config import FRACTION, Range, check_choice, check_range
        from moyu_exp.trinity import AXES

        check_choice("hydra.sweeper.axis", axis, AXES)
        for key, values, accepted in (
            ("hydra.sweeper.levels", levels, Range(1, low_open=True)),
            ("hydra.sweeper.grid", grid, FRACTION),
        ):
            if not values:
                raise _error(f"{key} is empty: give at least one value")
            for value in values:
                check_range(key, value, accepted)
        check_range("hydra.sweeper.target", target, Range(0, low_open=True))
        self.levels = sorted(float(v) for v in levels)
        self.grid = sorted(float(v) for v in grid)
        self.axis, self.target, self.report_dir = axis, float(target), report_dir
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self._varying: set[str] = set()

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None
        if self.axis == "speedup" and not (
            self.config.bench.enabled and str(self.config.bench.mode) == "kernel"
        ):
            raise _error(
                "the trinity sweep reads each method's measured speed: it needs bench.mode=kernel "
                "(or hydra.sweeper.axis=ideal_speedup for the bytes-bound ideal)"
            )
        combos = self._combinations(arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        methods = [c for c in combos if self._strategy(c) != "dense"]
        speed_jobs = [[*c, f"sparsity={s:g}", *SPEED_PASS] for c in methods for s in self.grid]
        log.info("trinity: speed pass, %d point(s)", len(speed_jobs))
        speed = self._launch(speed_jobs, 0)
        curves = [self._curve(speed[i * len(self.grid) : (i + 1) * len(self.grid)]) for i in
                  range(len(methods))]  # fmt: skip

        from moyu_exp.trinity import crossing, is_switch

        dense = {tuple(o for o in c if not _key(o).startswith("strategy")): None for c in combos}
        eval_jobs = [[*c, "strategy=dense", "bench.enabled=false"] for c in dense]
        plan = []
        for combo, (curve, keys) in zip(methods, curves, strict=True):
            at = {level: crossing(curve, level, is_switch(keys)) for level in self.levels}
            shown = " ".join(o for o in combo if _key(o) in self._varying)
            plan.append(f"  {shown}: " + ", ".join(
                f"{lv:g}x at s={s}" if s is not None else f"{lv:g}x not reached"
                for lv, s in at.items()
            ))  # fmt: skip
            eval_jobs += [[*combo, f"sparsity={s:g}"] for s in dict.fromkeys(at.values()) if s]
        log.info("trinity: crossings (on %s)\n%s", self.axis, "\n".join(plan))
        log.info("trinity: evaluation pass, %d point(s)", len(eval_jobs))
        return [speed, self._launch(eval_jobs, len(speed_jobs))]

    def _combinations(self, arguments: list[str]) -> list[list[str]]:
        """Every combination of the preset's axes and the command line's (a key given on the
        command line replaces the preset's)."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        axes: dict[str, list[str]] = {}
        given = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        for override in parser.parse_overrides(given):
            key = override.get_key_element()
            if override.is_sweep_override():
                if not override.is_discrete_sweep():
                    raise _error(f"{key}: the trinity sweeper takes lists (a,b,c), not ranges")
                axes[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
            else:
                axes[key] = [f"{key}={override.get_value_element_as_str()}"]
        if "sparsity" in axes:
            raise _error(
                "sparsity is chosen by the trinity sweep (where each method's speed curve crosses "
                "hydra.sweeper.levels); set the speed pass's sparsities with hydra.sweeper.grid"
            )
        self._varying = {k for k, values in axes.items() if len(values) > 1} | {"strategy"}
        return [list(c) for c in itertools.product(*axes.values())]

    def _strategy(self, combo: list[str]) -> str:
        for override in combo:
            if _key(override) == "strategy":
                return override.split("=", 1)[1]
        return str(self.config.strategy.name)

    def _launch(self, jobs: list[list[str]], first: int) -> Sequence[JobReturn]:
        if not jobs:
            return []
        self.validate_batch_is_legal(jobs)
        return self.launcher.launch(jobs, initial_job_idx=first)

    def _curve(self, returns: Sequence[JobReturn]) -> tuple[list[tuple[float, float]], list[str]]:
        """(sparsity, speed) of the speed pass's finished points of one combination, and their
        point keys (one key for every sparsity: the sparsity only switches the method on)."""
        from moyu_exp.trinity import speed_of

        curve, keys = [], []
        for ret in returns:
            payload = _results(ret)
            speed = speed_of(payload, self.axis) if payload.get("status") == "ok" else None
            if speed is not None:
                curve.append((float(payload["sparsity"]), speed))
                keys.append(str(payload.get("point_key")))
        return curve, keys


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _results(ret: JobReturn) -> dict[str, Any]:
    """The point's results.json (its run dir: the job's output dir; ``working_dir`` is the
    process's cwd, which Hydra no longer changes)."""
    try:
        hydra = ret.hydra_cfg.hydra
        folder = OmegaConf.select(hydra, "runtime.output_dir", throw_on_missing=False)
        folder = folder or Path(str(hydra.sweep.dir)) / str(hydra.sweep.subdir)
        return json.loads((Path(str(folder)) / "results.json").read_text())
    except Exception:  # no config, no folder, no file: the point has no speed
        return {}


def _error(message: str) -> Exception:
    from moyu_exp.errors import ConfigError

    return ConfigError(message)
