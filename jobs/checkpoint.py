"""A run's checkpoints: `python jobs/checkpoint.py ls RUN_DIR [--json]`, `check RUN_DIR [--config CFG]`
(would a start resume? exit 2 and one line if not) and `export RUN_OR_CHECKPOINT OUT` (for timm)."""
import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from vit.engine.checkpoint import allow_classes, describe, versions_text
from vit.errors import CheckpointError, ConfigError
from vit.run_dir import checkpoints_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python jobs/checkpoint.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="consolidate a checkpoint's model for timm (vit/engine/export.py)")
    ex.add_argument("checkpoint", help="a step-N directory, or a run directory (newest valid checkpoint)")
    ex.add_argument("out", help="a folder timm loads as local-dir:OUT, or one .safetensors file")
    ls = sub.add_parser("ls", help="list a run's checkpoints with step, time, size, versions and validity")
    ls.add_argument("run_dir")
    ls.add_argument("--json", action="store_true")
    check = sub.add_parser("check", help="check, changing nothing, that the run resumes with the installed "
                                         "versions (and CONFIG, else the checkpoint's own config)")
    check.add_argument("run_dir")
    check.add_argument("--config", help="a resolved config (YAML) to resume with")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            from vit.engine.export import export
            print(export(args.checkpoint, args.out))
            return 0
        if args.command == "check":
            from vit.engine.train import check_resumable
            cfg = OmegaConf.load(args.config) if args.config else None
            if cfg is not None:
                allow_classes(cfg.checkpoint.get("allowed_classes"))
            print(check_resumable(args.run_dir, cfg))
            return 0
        root = Path(args.run_dir)
        rows = describe(checkpoints_dir(root) if checkpoints_dir(root).is_dir() else root)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if args.command == "check" else 1
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'step':>10}  {'time':19}  {'size':>10}  {'written with':40}  status")
        for r in rows:
            print(f"{r['step']:>10}  {r['time'] or '-':19}  {r['size_bytes'] / 1e6:>8.1f}MB  "
                  f"{versions_text(r['versions']) if r['versions'] else '-':40}  {r['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
