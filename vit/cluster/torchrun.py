"""torchrun as the node agent runs it, with its failure report cut to one line per failed rank.

The workers print why they failed themselves: a user error's one line, a crash's traceback. torchrun
then raised ChildFailedError, whose traceback and framed report (about 30 lines per node) only
repeat the exit codes, and buried that one line in every node's log.

    python -m vit.cluster.torchrun [torchrun options] SCRIPT [ARGS...]
"""
from __future__ import annotations

import socket
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main


def failure_lines(error: ChildFailedError) -> list[str]:
    host = socket.gethostname()
    lines = []
    for rank, failure in sorted(error.failures.items()):
        how = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        lines.append(f"torchrun: {error.name} failed on {host}: rank {rank} "
                     f"(local rank {failure.local_rank}, pid {failure.pid}), {how}")
    return lines


if __name__ == "__main__":
    try:
        main()
    except ChildFailedError as e:
        print("\n".join(failure_lines(e)), file=sys.stderr, flush=True)
        sys.exit(1)  # what torchrun exits with on a failed child
