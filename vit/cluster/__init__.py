"""Where a run executes: the Hydra entry point, the torchrun worker, the Slurm node agent and its
requeue policy, the journal, run status and the cost planner. The agent's modules import no torch."""
