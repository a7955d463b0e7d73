"""Start a multi-GPU phase under torchrun and exit with the code the phase chose.

    python -m app.launch --nproc-per-node 8 sft --preset abel-7b --store s3://bucket/gsm8k --run-id r1

runs `torchrun --standalone --nproc_per_node=8 -m app sft ...` (as `python -m torch.distributed.run`:
no PATH lookup). Why not torchrun alone: it exits 1 whatever its workers exit with, so a worker's
exit 3 (bad input data) or 2 (bad config) would reach Kubernetes as 1, and the Job's
podFailurePolicy would retry what no retry can fix. Each worker appends its exit code to
$PIPELINE_EXIT_CODE_FILE (app/cli.py); when torchrun failed and a worker recorded 2 or 3, we
exit with it, otherwise with torchrun's own code. If ranks disagree, 3 beats 2: both fail the
Job at once, so the order is arbitrary; the larger makes it independent of which rank was first.

SIGTERM and SIGINT are passed on to torchrun, which stops its workers: Kubernetes sends SIGTERM
to the container's PID 1 (this process) on preemption or deletion. torchrun gets its own session,
so a Ctrl-C in a terminal reaches it once, through us.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile

from app.errors import EXIT_CONFIG, EXIT_INPUT


def exit_code(torchrun_code: int, recorded: list[int]) -> int:
    """The launcher's exit code, from torchrun's and the codes its workers recorded."""
    fail_job = [code for code in recorded if code in (EXIT_CONFIG, EXIT_INPUT)]
    if torchrun_code != 0 and fail_job:
        return max(fail_job)
    return torchrun_code if torchrun_code >= 0 else 128 - torchrun_code  # killed by signal N: 128+N, as in a shell


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc-per-node", type=int, required=True, help="worker processes, one per GPU")
    parser.add_argument("command", help="the app command: sft or dpo")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="passed on to `python -m app <command>`")
    args = parser.parse_args(argv)
    if args.nproc_per_node < 1:
        parser.error(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fd, code_file = tempfile.mkstemp(prefix="pipeline-exit-codes-")
    os.close(fd)
    child: subprocess.Popen | None = None

    def forward(signum, _frame):
        if child is None:  # torchrun not started yet: nothing to stop
            sys.exit(128 + signum)
        child.send_signal(signum)

    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, forward)
        child = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={args.nproc_per_node}", "-m", "app", args.command, *args.flags],
                                 env={**os.environ, "PIPELINE_EXIT_CODE_FILE": code_file}, start_new_session=True)
        torchrun_code = child.wait()
        with open(code_file) as handle:
            recorded = [int(line) for line in handle if line.strip().isdigit()]
    finally:
        os.unlink(code_file)
    code = exit_code(torchrun_code, recorded)
    if code != torchrun_code and code in (EXIT_CONFIG, EXIT_INPUT):
        print(f"launch: torchrun exited {torchrun_code}, a worker {code}: exiting {code}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
