"""Where the time of one `apply` goes: pyinstrument on the whole command, cProfile on
the network driver's calls.

The profiled `apply` runs under a small harness (`HARNESS`, run as `python -c`) that

- starts pyinstrument (1 ms sampling) before importing anything, so imports count;
- wraps `NetlinkDriver._call` (the function every driver call runs in) with a
  `cProfile.Profile` enabled for the duration of each call (exact counts for the
  netlink work, which sampling alone blurs);
- runs `python -m reconciler ... apply` through runpy, exactly as the command would.

The product's code is not changed; only the benchmark's process wraps one method. The
pyinstrument session is saved (`.pyisession`, reloadable with `pyinstrument --load`) and
rendered as a text call tree; both profiles become pstats, ranked by cumulative time
(where the wall time goes, callees included) and by own time (what burns it).
"""

from __future__ import annotations

import pstats
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hack.bench.kernel import BenchError, host_links_gone, wait_until
from hack.bench.product import prepare
from hack.bench.trial import Trial

TOP = 15

HARNESS = """
import cProfile, runpy, sys
from pyinstrument import Profiler
session_path, worker_path = sys.argv[1], sys.argv[2]
profiler = Profiler(interval=0.001)
profiler.start()
worker = cProfile.Profile()
import reconciler.kernel.netlink as netlink
original = netlink.NetlinkDriver._call
def call(self, fn, *args, **kwargs):
    worker.enable()
    try:
        return original(self, fn, *args, **kwargs)
    finally:
        worker.disable()
netlink.NetlinkDriver._call = call
sys.argv = ["reconciler", *sys.argv[3:]]
code = 0
try:
    runpy.run_module("reconciler", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
profiler.stop()
profiler.last_session.save(session_path)
worker.dump_stats(worker_path)
sys.exit(code)
"""


def pyinstrument_missing(python: str) -> str | None:
    """None when `python` can import pyinstrument, else how to get it."""
    done = subprocess.run([python, "-c", "import pyinstrument"], capture_output=True, check=False)
    if done.returncode == 0:
        return None
    return f"pyinstrument is not installed: {python} -m pip install pyinstrument"


def profile_apply(
    trial: Trial, *, python: str, namespaces: Sequence[str], output: Path
) -> dict[str, Any]:
    """`apply` of N (create), then the no-op `apply`, each under the harness.

    `output` gets the create's call tree, `<output stem>.noop.txt` the no-op's; sessions
    and pstats go beside them. Returns {"create": summary, "noop": summary}.
    """
    rec, _, work = prepare(trial, prefix="p", python=python, namespaces=namespaces)
    output.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    try:
        for label, text in (("create", output), ("noop", output.with_suffix(".noop.txt"))):
            session = text.with_suffix(".pyisession")
            worker = text.with_suffix(".worker.pstats")
            started = time.perf_counter()
            argv = [python, "-c", HARNESS, str(session), str(worker), *rec.globals(), "apply"]
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            elapsed = time.perf_counter() - started
            if done.returncode != 0:
                raise BenchError(f"profiled apply exited {done.returncode}: {done.stderr[-600:]}")
            result[label] = summarise(
                python=python, session=session, worker=worker, text=text, elapsed=elapsed
            )
            result[label]["n"] = trial.n
    finally:
        subprocess.run(rec.argv("destroy"), capture_output=True, check=False, timeout=300)
        shutil.rmtree(work, ignore_errors=True)
    wait_until(host_links_gone, timeout=60, what="the profiled instance's links to go")
    return result


def _render(python: str, session: Path, renderer: str, output: Path) -> None:
    argv = [python, "-m", "pyinstrument", "--load", str(session), "-r", renderer]
    subprocess.run([*argv, "-o", str(output)], capture_output=True, check=True)


def _frames(stats: pstats.Stats, *, key: int) -> list[dict[str, Any]]:
    # stats.stats: (file, line, function) -> (primitive calls, calls, own, cumulative, callers)
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    ranked = sorted(raw.items(), key=lambda item: item[1][key], reverse=True)[:TOP]
    return [
        {
            "function": function,
            "where": f"{_short(file)}:{line}",
            "calls": int(values[1]),
            "cumulative_s": round(values[3], 4),
            "own_s": round(values[2], 4),
        }
        for (file, line, function), values in ranked
    ]


def _short(path: str) -> str:
    for marker in ("site-packages/", "/reconciler/", "/lib/python3"):
        if marker in path:
            return path[path.index(marker) + (0 if marker.startswith("/") else len(marker)) :]
    return path


def summarise(
    *, python: str, session: Path, worker: Path, text: Path, elapsed: float
) -> dict[str, Any]:
    """Text tree to `text`, pstats beside it; top frames of main thread and worker."""
    _render(python, session, "text", text)
    main_pstats = session.with_suffix(".pstats")
    _render(python, session, "pstats", main_pstats)
    main = pstats.Stats(str(main_pstats))
    netlink = pstats.Stats(str(worker))
    return {
        "wall_s": elapsed,
        "session": str(session),
        "text": str(text),
        "pstats": str(main_pstats),
        "worker_pstats": str(worker),
        "worker_total_s": netlink.total_tt,  # type: ignore[attr-defined]
        "top_cumulative": _frames(main, key=3),
        "top_own": _frames(main, key=2),
        "worker_top_cumulative": _frames(netlink, key=3),
        "worker_top_own": _frames(netlink, key=2),
    }
