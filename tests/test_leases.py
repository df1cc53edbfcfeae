"""The journal's budget lock is a lease (forde.sweep.leases), tried with real processes: held while refreshed,
taken over only once expired, released only by its holder, and never held by two at once."""

import os
import signal
import subprocess
import sys
import time

TTL_S, REFRESH_S = 1.5, 0.2

HOLDER = f"""
import os, sys, time
from pathlib import Path
from forde.sweep.leases import FileLease

folder, hold_s, log, rounds = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])

def note(what):
    with open(log, "a") as fh:
        fh.write(f"{{what}} {{os.getpid()}} {{time.monotonic():.3f}}\\n")

for _ in range(rounds):
    lease = FileLease(folder, ttl_s={TTL_S}, refresh_s={REFRESH_S})
    with lease:
        note("in")
        time.sleep(hold_s)
        note("out" if lease.held() else "lost")
"""


def holder(tmp_path, hold_s: float, rounds: int = 1) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "lease"), str(hold_s), str(tmp_path / "log"), str(rounds)]
    )


def events(tmp_path) -> list[tuple[str, int, float]]:
    path = tmp_path / "log"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [(what, int(pid), float(t)) for what, pid, t in (line.split() for line in lines)]


def wait_for_event(tmp_path, what: str, pid: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(e[0] == what and e[1] == pid for e in events(tmp_path)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no '{what}' from {pid} in {timeout} s: {events(tmp_path)}")


def test_a_live_holder_slower_than_the_ttl_keeps_the_lease(tmp_path):
    """A critical section three times the TTL (a long journal replay, a stalled filesystem): it is refreshed, so
    the waiter gets the lease only once the holder is done."""
    slow = holder(tmp_path, hold_s=3 * TTL_S)
    wait_for_event(tmp_path, "in", slow.pid)
    waiter = holder(tmp_path, hold_s=0.1)
    assert slow.wait(30) == 0 and waiter.wait(30) == 0
    assert [(e[0], e[1]) for e in events(tmp_path)] == [
        ("in", slow.pid),
        ("out", slow.pid),
        ("in", waiter.pid),
        ("out", waiter.pid),
    ]


def test_a_suspended_holder_loses_the_lease_and_cannot_release_its_successors(tmp_path):
    """SIGSTOP (or a Slurm suspend) past the TTL: a waiter takes the lease over, not before it expired; when the
    suspended holder resumes, its release leaves the new holder's lease alone."""
    stopped = holder(tmp_path, hold_s=1.0)
    wait_for_event(tmp_path, "in", stopped.pid)
    os.kill(stopped.pid, signal.SIGSTOP)
    suspended_at = time.monotonic()
    successor = holder(tmp_path, hold_s=4.0)
    wait_for_event(tmp_path, "in", successor.pid)
    took_over_after = [e[2] for e in events(tmp_path) if e[1] == successor.pid][0] - suspended_at
    assert took_over_after >= TTL_S
    os.kill(stopped.pid, signal.SIGCONT)  # it wakes up inside its critical section, finishes and releases
    wait_for_event(tmp_path, "lost", stopped.pid)
    assert stopped.wait(30) == 0
    third = holder(tmp_path, hold_s=0.1)  # must still wait for the successor
    assert successor.wait(30) == 0 and third.wait(30) == 0
    order = [(e[0], e[1]) for e in events(tmp_path)]
    assert order.index(("out", successor.pid)) < order.index(("in", third.pid))
    assert ("out", successor.pid) in order  # the successor held it to the end


def test_waiters_taking_over_a_dead_holder_never_hold_it_together(tmp_path):
    """A holder killed with kill -9 leaves its file; three waiters, each taking the lease again and again, take it
    over one at a time: the log of who is inside never shows two at once."""
    dead = holder(tmp_path, hold_s=60)
    wait_for_event(tmp_path, "in", dead.pid)
    dead.kill()
    dead.wait()
    waiters = [holder(tmp_path, hold_s=0.05, rounds=15) for _ in range(3)]
    assert all(w.wait(120) == 0 for w in waiters)
    inside = None
    for what, pid, _ in events(tmp_path)[1:]:
        if what == "in":
            assert inside is None, f"{pid} entered while {inside} held the lease"
            inside = pid
        else:
            assert what == "out" and pid == inside
            inside = None
    assert sum(e[0] == "in" for e in events(tmp_path)) == 1 + 45
    assert len(list((tmp_path / "lease").iterdir())) <= 2  # the dead holder's file is gone; no pile of old ones
