"""Test-only hook: make a checkpoint save slow so a test can kill a rank in the middle of it.

Python imports `sitecustomize` at start-up from the first directory on its path that has one; the
tests put `tests/hooks` first on PYTHONPATH for the one run that needs it. Inert unless
`VIT_TEST_SLOW_SAVE_AT_STEP=N` is set: then `FileSystemWriter.write_data` sleeps
`VIT_TEST_SLOW_SAVE_SECONDS` (default 30) before writing the shards of `.../step-N`, on the ranks
listed in `VIT_TEST_SLOW_SAVE_RANKS` (comma-separated; default: every rank).
"""
import os

_STEP = os.environ.get("VIT_TEST_SLOW_SAVE_AT_STEP")

if _STEP:
    import sys
    import time

    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    _seconds = float(os.environ.get("VIT_TEST_SLOW_SAVE_SECONDS", "30"))
    _ranks = os.environ.get("VIT_TEST_SLOW_SAVE_RANKS")
    _original = FileSystemWriter.write_data

    def _slow_write_data(self, plan, planner):
        rank = os.environ.get("RANK", "0")
        if str(self.path).rstrip("/").endswith(f"step-{_STEP}") and (not _ranks or rank in _ranks.split(",")):
            print(f"[slow-save hook] rank {rank}: sleeping {_seconds:g}s before writing {self.path}",
                  file=sys.stderr, flush=True)
            time.sleep(_seconds)
        return _original(self, plan, planner)

    FileSystemWriter.write_data = _slow_write_data
