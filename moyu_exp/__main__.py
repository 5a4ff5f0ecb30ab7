"""``python -m moyu_exp key=value ...`` (one run) and ``python -m moyu_exp -m ...`` (a sweep)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from moyu_exp import runner
from moyu_exp.config import ConfigError, register_configs

# conf/ sits beside the package in a checkout and inside it in a wheel.
CONF = "conf" if (Path(__file__).parent / "conf").is_dir() else "../conf"

register_configs()


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def hydra_entry(cfg: DictConfig) -> str:
    hc = HydraConfig.get()
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    try:
        payload = runner.run(cfg, Path(hc.runtime.output_dir), group=group)
    except ConfigError as err:
        print(f"moyu_exp: error: {err}", file=sys.stderr)
        sys.exit(2)
    return payload["status"]


def main() -> None:
    hydra_entry()


if __name__ == "__main__":
    main()
