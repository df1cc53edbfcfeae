"""What every benchmark result records: the machine, the software, the date, the command."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
LOAD_AT_START = os.getloadavg()  # other processes on the machine skew every timing: record how busy it was


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command() -> str:
    """The command line, absolute paths shown as <path>: results describe the run, not one machine's folders."""
    env = "".join(f"{k}={os.environ[k]} " for k in THREAD_VARIABLES if k in os.environ)
    args = ["<path>" if os.path.isabs(a) else a for a in sys.argv]
    args[0] = os.path.relpath(sys.argv[0]) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return f"{env}python {shlex.join(args)}"


def machine(software: str = "") -> list[str]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"

    def load(values):
        return ", ".join(f"{v:.1f}" for v in values)

    return [
        f"- machine: {_cpu_model()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}; GPU: {gpu}",
        f"- load average (1, 5, 15 min) at the start: {load(LOAD_AT_START)}; at the end: {load(os.getloadavg())}",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}{software}, "
        f"{platform.system()} {platform.release()}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{_command()}`",
    ]


def write_report(path: str | Path, title: str, body: list[str], software: str = "", echo: bool = True) -> None:
    """Print `body` (unless `echo` is false) and write it, under a header describing the run, to the Markdown file `path`."""
    if echo:
        print("\n".join(body))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([f"# {title}", "", *machine(software), "", *body]) + "\n")
    if echo:
        print(f"written to {path}")
