"""Plan a run without training or submitting: `python jobs/plan.py [-m] [--config-name finetune] OVERRIDES`.

Composes the config that jobs/pretrain.py (with `--config-name finetune`: jobs/finetune.py) would run
with the same overrides, and prints steps, FLOPs, time, requeues and checkpoints; with -m, one plan
per sweep point. It is the only way to a plan: the training entry points always train or submit.
It creates no directory (Hydra's own entry would create the run's).
"""
import argparse
import itertools
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from hydra_plugins.vit_slurm_launcher.vit_slurm_launcher import register
from vit.cluster.plan import format_plan, plan
from vit.errors import USER_ERRORS, fail

register()  # hydra/launcher=vit_slurm, which the cluster configs select


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every combination of the swept values (`key=a,b`, `range(...)`, `glob(...)`), as Hydra's basic sweeper."""
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
            else [o.input_line] for o in parser.parse_overrides(overrides)]
    return [list(point) for point in itertools.product(*axes)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--multirun", action="store_true", help="one plan per sweep point")
    p.add_argument("--config-name", default="pretrain", choices=["pretrain", "finetune"])
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        try:
            points = sweep_points(args.overrides) if args.multirun else [args.overrides]
            for overrides in points:
                cfg = compose(args.config_name, overrides=overrides)
                if args.multirun:
                    print(f"# {' '.join(overrides) or cfg.name}")
                print(format_plan(plan(cfg)))
        except (*USER_ERRORS, HydraException) as e:
            fail(e)


if __name__ == "__main__":
    main()
