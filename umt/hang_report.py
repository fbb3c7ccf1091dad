"""What a hung rank leaves behind: its report (`OUTPUT_DIR/hangs/step{N}/rank{R}.txt`) and, from
the first rank that can, the incident's one-screen `summary.txt`.

A rank's report: a header of `key: value` lines (host, pid, step, phase, the collective it is in
or last left), then the Python stack of every thread (`sys._current_frames`, read from the
watchdog's thread: a main thread blocked inside a gloo or NCCL call cannot run Python code, but
its frames can be read), the last collectives of torch's flight recorder (`TORCH_FR_BUFFER_SIZE`,
which the trainer turns on), then native frames from `py-spy dump --native` where py-spy is
installed. Reports and the summary are files on the run folder's file system, not messages
through the process group: the group is what hangs, and a dead rank cannot answer a collective.
Rank 0 writes the summary once every rank's report is there (or after `SUMMARY_WAIT_S`); the
others wait for it a little longer and, if it does not come (rank 0 dead or stuck), the first
that claims it writes it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

HANGS = "hangs"
SUMMARY = "summary.txt"
SUMMARY_WAIT_S = 20.0  # rank 0 waits this long for the other ranks' reports
CLAIM_AFTER_S = 5.0  # the others wait this much longer, then write the summary themselves
PY_SPY_TIMEOUT_S = 30.0
FLIGHT_RECORDS = 20
PR_SET_PTRACER, PR_SET_PTRACER_ANY = 0x59616D61, ctypes.c_ulong(-1).value


def incidents(out: Path) -> list[str]:
    """Names of the hang folders a run folder holds already (earlier hangs, earlier runs)."""
    root = out / HANGS
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def incident_folder(out: Path, step: int, existing: set[str]) -> Path:
    """`hangs/step{N}`, or `step{N}-2`, `-3`... when a hang at that step was recorded before.
    `existing` is the same on every rank (rank 0's listing at start-up), so all ranks pick the
    same folder without talking to each other."""
    name, k = f"step{step}", 1
    while name in existing:
        k += 1
        name = f"step{step}-{k}"
    return out / HANGS / name


def python_stacks() -> str:
    """Every thread's Python stack, the main thread first, innermost call last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    frames = sorted(
        sys._current_frames().items(),
        key=lambda item: (names.get(item[0]) != "MainThread", str(names.get(item[0]))),
    )
    parts = []
    for ident, frame in frames:
        if ident == me:
            continue  # the watchdog writing this report
        stack = "".join(traceback.format_stack(frame))
        parts.append(f'Thread "{names.get(ident, ident)}" ({ident}):\n{stack}')
    return "\n".join(parts)


def native_stacks() -> str:
    """`py-spy dump --native` of this process (all threads, C/C++ frames included), or why not."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return "py-spy is not installed (pip install py-spy): no native frames"
    try:  # Yama's ptrace_scope=1 lets a process be traced only by its ancestors: allow py-spy
        ctypes.CDLL(None).prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    try:
        proc = subprocess.run(
            [py_spy, "dump", "--native", "--pid", str(os.getpid())],
            capture_output=True,
            text=True,
            timeout=PY_SPY_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return f"py-spy dump did not finish in {PY_SPY_TIMEOUT_S:.0f} s"
    if proc.returncode != 0:
        return f"py-spy dump failed: {(proc.stderr or proc.stdout).strip()[-500:]}"
    return proc.stdout


def flight_recorder(last: int = FLIGHT_RECORDS) -> str:
    """The last collectives torch's flight recorder saw this process enqueue (every group, the
    DeepSpeed ones included): sequence number, group, operation, sizes, whether it finished."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json

        entries = json.loads(_dump_fr_trace_json(onlyActive=False)).get("entries", [])
    except Exception as exc:  # noqa: BLE001 - evidence is best effort; the stacks come anyway
        return f"unavailable: {type(exc).__name__}: {exc}"
    if not entries:
        return "empty (TORCH_FR_BUFFER_SIZE=0 turns it off)"
    lines = []
    for e in entries[-last:]:
        done = "finished" if e.get("retired") or e.get("state") == "completed" else e.get("state")
        lines.append(
            f"#{e.get('collective_seq_id')} group {e.get('process_group', ['', '?'])[-1]} "
            f"{e.get('profiling_name')} in {e.get('input_sizes')} out {e.get('output_sizes')}: {done}"
        )
    return "\n".join(lines) + "\n"


def rank_report(header: dict[str, object]) -> str:
    lines = [f"{key}: {value}" for key, value in header.items()]
    return (
        "\n".join(lines)
        + "\n\n--- Python stacks (every thread) ---\n"
        + python_stacks()
        + f"\n--- flight recorder (the last {FLIGHT_RECORDS} collectives entered) ---\n"
        + flight_recorder()
        + "\n--- native stacks (py-spy dump --native) ---\n"
        + native_stacks()
    )


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_header(path: Path) -> dict[str, str]:
    header = {}
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(": ")
        header[key] = value
    return header


def summarize(folder: Path, world: int, writer: int) -> str:
    """The one-screen account of an incident: where each rank is, and where to look first."""
    present = [r for r in range(world) if (folder / f"rank{r}.txt").is_file()]
    headers = {r: read_header(folder / f"rank{r}.txt") for r in present}
    missing = [r for r in range(world) if r not in headers]
    step = next((h["step"] for h in headers.values() if "step" in h), "?")
    reason = next((h["reason"] for r, h in sorted(headers.items()) if "reason" in h), "?")
    lines = [
        f"step {step}: {reason}",
        f"(summary by rank {writer} on {socket.gethostname()})",
        "",
        f"{'rank':>5}  {'host':<16} {'phase':<12} collective",
    ]
    for r in sorted(headers):
        h = headers[r]
        lines.append(
            f"{r:>5}  {h.get('host', '?')[:16]:<16} {h.get('phase', '?')[:12]:<12} "
            f"{h.get('collective', '?')}"
        )
    for r in missing:
        lines.append(f"{r:>5}  {'?':<16} {'?':<12} no report: dead, or its watchdog could not run")
    lines += ["", verdict(headers, missing), f"stacks: {folder}/rank{{R}}.txt"]
    return "\n".join(lines) + "\n"


def verdict(headers: dict[int, dict[str, str]], missing: list[int]) -> str:
    """Which ranks to look at first."""
    if missing:
        return f"look first at rank(s) {', '.join(map(str, missing))}: no report (dead?)"
    inside = {r for r, h in headers.items() if h.get("in_collective") == "yes"}
    outside = sorted(set(headers) - inside)
    if outside and inside:
        return (
            f"look first at rank(s) {', '.join(map(str, outside))}: not in a collective while "
            f"rank(s) {', '.join(map(str, sorted(inside)))} wait in one for them"
        )
    seqs = {r: int(h.get("collective_seq", 0)) for r, h in headers.items()}
    if inside and len(set(seqs.values())) > 1:
        low = min(seqs.values())
        behind = sorted(r for r, s in seqs.items() if s == low)
        return (
            f"look first at rank(s) {', '.join(map(str, behind))}: behind the others "
            f"(collective #{low} against up to #{max(seqs.values())})"
        )
    if inside:
        return "every rank waits in the same collective: the network, or a rank outside the run"
    return "no rank is in a collective: each rank's stack shows where it is stuck"


def wait_for(predicate, timeout_s: float, poll_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def settle_summary(folder: Path, rank: int, world: int, wait_s: float | None = None) -> str | None:
    """Rank 0: once every report is there (or after `wait_s`) write the summary. Others:
    wait for it; if none comes, claim it and write it. Returns the summary if this rank wrote it.
    A rank leaves only once the summary exists (or it gave up): an srun step or launcher that
    kills the others when the first rank exits must not cut rank 0's summary short."""
    summary = folder / SUMMARY
    wait_s = SUMMARY_WAIT_S if wait_s is None else wait_s
    if rank == 0:
        wait_for(lambda: all((folder / f"rank{r}.txt").is_file() for r in range(world)), wait_s)
    elif wait_for(summary.is_file, wait_s + CLAIM_AFTER_S):
        return None
    try:  # the first to create the claim writes the summary (O_EXCL works on shared file systems)
        os.close(os.open(folder / f".{SUMMARY}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        wait_for(summary.is_file, CLAIM_AFTER_S)
        return None
    text = summarize(folder, world, rank)
    write_atomic(summary, text)
    return text
