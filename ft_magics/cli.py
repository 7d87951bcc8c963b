"""The ``ft-magics`` command: run a training job written by ``%lora_export_job`` without a notebook.

    ft-magics train DIR/job.yaml                    # the processes the job was written for
    ft-magics train DIR/job.yaml --processes 4      # 4 local processes through accelerate launch
    ft-magics train DIR/job.yaml --launcher torchrun

One process runs in this process; several are started by accelerate's launcher (or torchrun) with
DIR/accelerate.yaml. For several machines, run ``accelerate launch`` on each (see README).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional

from .errors import FtUsageError


def _train(args: argparse.Namespace) -> int:
    from .core.jobs import LAUNCHERS, launch_command, load_job

    spec = load_job(args.job)
    processes = spec.processes if args.processes is None else args.processes  # (0 is no count: refused below)
    if processes < 1:
        raise FtUsageError(f"--processes must be at least 1 (got {processes}).")
    from .train import require_job_resumable, run_job

    if args.resume:
        require_job_resumable(spec)
    if processes == 1 and args.launcher is None:
        return run_job(str(spec.path), args.events, args.resume)
    launcher = args.launcher or "accelerate"
    if launcher not in LAUNCHERS[:2]:
        raise FtUsageError(f"--launcher must be accelerate or torchrun here (got {launcher!r}).")
    cmd = launch_command(spec.path, processes, launcher, args.events, resume=args.resume)
    print("running: " + " ".join(cmd), flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return _run_forwarding_signals(cmd, env)


def _run_forwarding_signals(cmd: list, env: dict) -> int:
    """Run the launcher in a process group of its own and pass SIGINT / SIGTERM sent to this process on to that
    group (what a terminal's Ctrl-C does to a foreground group), then wait for it: the workers stop at their next
    step and save. ``subprocess.call`` killed the launcher on an interrupt and left its workers training, orphaned,
    and a SIGTERM left both running."""
    import signal

    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="ft-magics", description="ft_magics from the command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a training job (job.yaml from %%lora_export_job)")
    train.add_argument("job", help="path to job.yaml (or its folder)")
    train.add_argument("--processes", type=int, default=None,
                       help="local processes (default: the job's 'processes'); several start through accelerate")
    train.add_argument("--launcher", choices=("accelerate", "torchrun"), default=None,
                       help="what starts several processes (default accelerate)")
    train.add_argument("--events", default=None, help="JSON-lines event file (default: next to the job)")
    train.add_argument("--resume", action="store_true",
                       help="continue the adapter from its latest complete checkpoint (same data and settings)")
    args = parser.parse_args(argv)
    try:
        return _train(args)
    except FtUsageError as exc:
        print(f"ft-magics: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
