"""`hydra/launcher=vit_slurm`: the stock submitit Slurm launcher, changed where a 3-week run needs it.

* It returns once the jobs are queued (the stock one waits for results, i.e. for weeks) and prints
  each job's ID, run directory, logs and follow-up commands. `hydra.launcher.wait=true` waits.
* Every sweep point is validated on the login node before anything is submitted: a bad config, an
  impossible batch split or allocation, a missing dataset, an unsafe job name, a control character
  bound for the sbatch script, two points sharing a run directory, a run directory that a job still
  in the queue trains in, or one whose checkpoints would not resume with the installed versions and
  this config (`vit.engine.train.check_resumable`) stops the whole submission.
* Each point gets a run directory fixed at submission time, so every requeue finds it again.
* Each point's config is composed once, at submission: every start and requeue of its job runs that
  config (the stock one composes it again from conf/ at each start).
* A job whose task raised is reported as failed to Slurm and submitit (the stock one swallows it).
* Submitted from inside a job (a batch script, an salloc shell, a training rank), it leaves that
  job's own environment out of the new one.
"""

import contextlib
import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import DictConfig, OmegaConf, open_dict


@dataclass
class VitSlurmQueueConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.vit_slurm_launcher.vit_slurm_launcher.VitSlurmLauncher"
    wait: bool = False


ConfigStore.instance().store(group="hydra/launcher", name="vit_slurm", node=VitSlurmQueueConf(),
                             provider="vit_slurm_launcher")


class VitSlurmLauncher(SlurmLauncher):
    def __call__(self, overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict, cfg: DictConfig) -> JobReturn:
        """A task of a submitted job (one per node), at each of its starts: this node's agent, which runs
        torchrun over the workers and decides on the requeue. It runs the config composed at
        submission, so that an edit of conf/ while a 3-week run is queued or requeued does not change
        that run."""
        import submitit

        from vit.cluster.launch import run_slurm_node

        Singleton.set_state(singleton_state)
        setup_globals()
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.id = submitit.JobEnvironment().job_id
            cfg.hydra.job.num = job_num
        result = run_job(hydra_context=self.hydra_context, task_function=run_slurm_node, config=cfg,
                         job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")
        if result.status == JobStatus.FAILED:
            raise result._return_value  # the exception: the Slurm job must end FAILED, not COMPLETED
        return result

    def _sweep_point(self, overrides: list[str], swept: set[str]):
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        if swept and "run_dir" not in swept:
            # one directory per point, named by its swept values, fixed now so that requeues find it
            point = "_".join(o.replace("=", "-") for o in overrides if o.split("=", 1)[0] in swept)
            point = re.sub(r"[^A-Za-z0-9._-]+", "_", point)
            # quoted: a bare value with ',' or '=' would be read by Hydra as a sweep or a syntax error
            quoted = str(Path(cfg.run_dir) / point).replace("'", "\\'").replace("${", "\\${")
            overrides = [*overrides, f"run_dir='{quoted}'"]
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        return overrides, cfg

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        from vit.cluster.slurm import jobs_of_run, submitit_python
        from vit.config import validate, validate_submission
        from vit.engine.checkpoint import allow_classes
        from vit.engine.train import check_resumable
        from vit.errors import USER_ERRORS, ConfigError, fail
        from vit.journal import Journal
        from vit.run_dir import slurm_dir

        values: dict[str, set[str]] = {}
        for overrides in job_overrides:
            for o in filter_overrides(overrides):
                key, _, value = o.partition("=")
                values.setdefault(key, set()).add(value)
        swept = {k for k, v in values.items() if len(v) > 1}
        points = [self._sweep_point(list(o), swept) for o in job_overrides]
        run_dirs = [str(Path(cfg.run_dir).resolve()) for _, cfg in points]
        for _, cfg in points:
            try:
                validate_submission(cfg)
                validate(cfg, world_size=cfg.cluster.nodes * cfg.cluster.procs_per_node)
                if run_dirs.count(str(Path(cfg.run_dir).resolve())) > 1:
                    raise ConfigError("run_dir", f"{cfg.run_dir} is shared by several sweep points",
                                      "give each point its own run_dir (sweep values that differ after "
                                      "replacing characters other than letters, digits, '.', '_' and '-')")
                # Two jobs on one run directory would train over each other's checkpoints (e.g. the
                # same command again while its requeued job waits in the queue).
                if live := jobs_of_run(cfg.run_dir):
                    job_id, state = min(live.items())
                    raise ConfigError("run_dir", f"{cfg.run_dir} is in use by job {job_id} ({state})",
                                      f"wait for it to end or scancel {job_id} (a run resubmitted later "
                                      "resumes from its checkpoints), or choose another run_dir")
                # A checkpoint refused after an upgrade fails here, not after hours in the queue.
                allow_classes(cfg.checkpoint.allowed_classes)
                check_resumable(cfg.run_dir, cfg)
            except USER_ERRORS as e:
                fail(e)  # before anything is queued

        jobs = []
        for idx, (overrides, cfg) in enumerate(points, start=initial_job_idx):
            params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
            params.pop("_target_", None)
            wait = params.pop("wait", False)
            folder = slurm_dir(cfg.run_dir)
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_python=submitit_python(),
                                             slurm_max_num_timeout=params.pop("max_num_timeout"))
            params.pop("submitit_folder", None)
            params.pop("array_parallelism", None)
            # sbatch has no "--flag=False": a false or null extra flag means "leave it out" (0 is a value)
            params["additional_parameters"] = {k: v for k, v in (params.get("additional_parameters") or {}).items()
                                               if v is not None and v is not False}
            executor.update_parameters(**{k if k in _BASE_KEYS else f"slurm_{k}": v for k, v in params.items()})
            with _outside_the_current_job():
                job = executor.submit(self, overrides, "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                                      Singleton.get_state(), cfg)
            jobs.append((job, overrides, cfg))
            Journal(cfg.run_dir).write("submit", job_id=job.job_id, restart=None, nodes=None,
                                       num_nodes=cfg.cluster.nodes, procs_per_node=cfg.cluster.procs_per_node,
                                       time_limit_min=cfg.cluster.time_min, overrides=list(overrides))
            _print_submission(job, cfg, folder)
        if wait:
            return [job.results()[0] for job, _, _ in jobs]
        # The sweeper reads every return value; here the "result" of a job is its queued submission.
        return [JobReturn(overrides=o, cfg=c, status=JobStatus.COMPLETED,
                          _return_value={"job_id": j.job_id, "state": "queued"}) for j, o, c in jobs]


# What a job or torchrun sets for its own processes. sbatch would export it into the new job: an old
# SLURM_MEM_PER_CPU clashes with --mem, RANK makes the new job's tasks train without their node
# agent, and SLURM_RESTART_COUNT mislabels its restarts. SLURM_CONF names the cluster: it stays.
_JOB_ENV_PREFIXES = ("SLURM_", "SUBMITIT_", "TORCHELASTIC_")
_JOB_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"}


@contextlib.contextmanager
def _outside_the_current_job():
    saved = {k: os.environ.pop(k) for k in list(os.environ)
             if (k.startswith(_JOB_ENV_PREFIXES) and k != "SLURM_CONF") or k in _JOB_ENV}
    try:
        yield
    finally:
        os.environ.update(saved)


_BASE_KEYS = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
              "stderr_to_stdout"}


def _print_submission(job, cfg, folder: Path) -> None:
    run_dir = Path(cfg.run_dir).resolve()
    print(f"submitted job {job.job_id}: {cfg.name} on {cfg.cluster.nodes} node(s)\n"
          f"  run dir : {run_dir}\n"
          f"  logs    : {folder.resolve()}/{job.job_id}_<node>_log.out (and .err)\n"
          f"  follow  : squeue -j {job.job_id}; tail -f {folder.resolve()}/{job.job_id}_0_log.out\n"
          f"  status  : python jobs/status.py {run_dir}; python jobs/checkpoint.py ls {run_dir}", flush=True)


def register() -> None:
    """Called by the entry points in jobs/: Hydra's plugin scan cannot see this namespace package
    through the import hook of an editable install. Importing this module registers the config; this
    registers the class. Not at import: the scan itself imports this module."""
    Plugins.instance().register(VitSlurmLauncher)
