import getpass
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


@pytest.fixture(autouse=True)
def _slurm_left_idle(request):
    """After a Slurm test, cancel whatever it left (a test that failed part-way leaves its job
    training) and wait for idle nodes: one failure must not make the next tests fail too."""
    yield
    if "slurm_env" in request.fixturenames:
        from slurm_cluster import slurm, wait_nodes_idle

        env = request.getfixturevalue("slurm_env")
        slurm(["scancel", "-u", getpass.getuser()], env)
        wait_nodes_idle(env, timeout=300)
