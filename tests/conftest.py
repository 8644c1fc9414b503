import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
# Child processes (torchrun workers, jobs/*.py) must import this checkout, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def slurm_env():
    """The two-node cluster of dev/minicluster.sh, started if needed; its client environment."""
    from slurm_cluster import ensure_cluster

    if not (os.environ.get("CI") == "true" or Path("/usr/sbin/slurmctld").exists()):
        pytest.skip("Slurm is not installed (CI installs it and never skips)")
    return ensure_cluster()
