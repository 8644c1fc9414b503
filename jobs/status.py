"""Progress, restarts and goodput of a run, from its journal: `python jobs/status.py RUN_DIR [--json]
[--plot out.png] [--tensorboard]`, or `-m MULTIRUN_DIR` for every run below it. See vit/cluster/status.py."""
import sys

from vit.cluster.status import main

if __name__ == "__main__":
    sys.exit(main())
