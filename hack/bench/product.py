"""The product: `reconciler apply` / `destroy` as whole commands, and the no-op reconcile.

Per trial: N Environment manifests (one file each) and one Network in a temp dir, a
fresh instance and state dir; then, each timed around the whole subprocess (interpreter
start and imports included, as a user or a CI job pays them):

- `apply` (create), checked like the baselines afterwards (untimed);
- the lean observation floor (`observe.floor_pass`) over the same live objects;
- a second `apply`, the no-op reconcile, which must write nothing: the state file keeps
  its serial and mtime, the events log its size, and no rtnetlink change notification
  arrives on the host or in any env namespace while it runs. It runs once the kernel's
  own delayed notifications about the create have landed (`rtnl.Monitor.wait_quiet`:
  up to one bridge forward delay, 15 s, after `apply` returned), so it is measured in
  steady state, as a resync would meet it;
- the same no-op reconcile in-process (`inproc`: one interpreter that imports the CLI,
  then times only the click command), which separates the fixed start-up cost from the
  per-env cost the goal is about;
- `destroy` (delete), then the time until the kernel shows no link left (`delete_gone`).

Only what `--instance` scopes is touched: the manifests, state dir and every kernel
object carry the trial's unique instance name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hack.bench import observe, rtnl
from hack.bench.kernel import BenchError, host_links_gone, wait_until
from hack.bench.stats import Sample
from hack.bench.trial import Trial, check_envs

NAME = "reconciler"
QUIET_SECONDS = 1.5  # linkwatch delays operstate events by up to 1 s
FORWARD_DELAY_SECONDS = 15.0  # the bridge default; ports are re-announced after it
MESSAGE_NAMES = {0: "overrun", 16: "newlink", 17: "dellink", 20: "newaddr", 21: "deladdr"}
MESSAGE_NAMES |= {24: "newroute", 25: "delroute"}
ROOT = Path(__file__).resolve().parents[2]

# Imports the CLI, then runs one command through click without exiting: prints the two
# durations as the last line of stdout, so start-up and work can be told apart.
INPROC = """
import json, sys, time
t0 = time.perf_counter()
from reconciler.cli.main import cli
t1 = time.perf_counter()
def once():
    try:
        cli(sys.argv[1:], prog_name="reconciler", standalone_mode=False)
    except SystemExit as exc:
        return exc.code
    return 0
code = once()
t2 = time.perf_counter()
warm_code = once()
t3 = time.perf_counter()
print("BENCH " + json.dumps(
    {"import": t1 - t0, "command": t2 - t1, "warm": t3 - t2, "code": code or warm_code}
))
"""


@dataclass(frozen=True)
class Reconciler:
    """How to invoke the product for one instance."""

    python: str
    manifests: Path
    state_dir: Path
    instance: str

    def argv(self, *command: str) -> list[str]:
        """`python -m reconciler <globals> <command...>`."""
        return [self.python, "-m", "reconciler", *self.globals(), *command]

    def globals(self) -> list[str]:
        """The global options selecting this instance."""
        return [
            "--manifests", str(self.manifests), "--state-dir", str(self.state_dir),
            "--instance", self.instance, "--log-format", "json",
        ]  # fmt: skip

    def timed(self, *command: str) -> float:
        """Run a command to completion; its wall time in seconds, or BenchError."""
        started = time.perf_counter()
        done = subprocess.run(self.argv(*command), capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip()[-600:]
            raise BenchError(f"reconciler {' '.join(command)} exited {done.returncode}: {detail}")
        return elapsed

    def inproc(self, *command: str) -> dict[str, float]:
        """Import time and command time of one in-process run, and of the same command
        run again in that process ("warm": modules loaded, as a resync under `run` meets
        it; see INPROC)."""
        argv = [self.python, "-c", INPROC, *self.globals(), *command]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
        if not lines:
            raise BenchError(f"in-process reconciler {' '.join(command)}: {done.stderr[-600:]}")
        result: dict[str, Any] = json.loads(lines[-1][len("BENCH ") :])
        if result["code"] not in (0, None):
            raise BenchError(f"in-process reconciler {' '.join(command)} exited {result['code']}")
        return {key: float(result[key]) for key in ("import", "command", "warm")}

    @property
    def state_file(self) -> Path:
        """Where the product keeps this instance's state."""
        return self.state_dir / self.instance / "state.json"

    @property
    def events_file(self) -> Path:
        """The instance's events log."""
        return self.state_dir / self.instance / "events.jsonl"


def write_manifests(
    directory: Path, *, network: str, subnet: str, envs: Sequence[str], namespaces: Sequence[str]
) -> None:
    """One Network and one file per Environment (memory/cpu/pids as the baselines)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "network.yaml").write_text(
        "apiVersion: reconciler/v1\nkind: Network\n"
        f"metadata: {{name: {network}}}\nspec: {{subnet: {subnet}}}\n"
    )
    for env in envs:
        (directory / f"{env}.yaml").write_text(env_manifest(env, network, namespaces))


def env_manifest(env: str, network: str, namespaces: Sequence[str]) -> str:
    """An Environment with the benchmark's limits and no processes."""
    return (
        "apiVersion: reconciler/v1\nkind: Environment\n"
        f"metadata: {{name: {env}}}\n"
        f"spec: {{namespaces: [{', '.join(namespaces)}], network: {{name: {network}}}, "
        "resources: {memory: 64Mi, cpu: 500m, pids: 128}}\n"
    )


def _by_name(counts: Counter[int]) -> dict[str, int]:
    return {MESSAGE_NAMES.get(kind, str(kind)): count for kind, count in sorted(counts.items())}


def _fingerprint(rec: Reconciler) -> tuple[int, int, int]:
    """(serial, mtime_ns) of the state file and the size of the events log."""
    serial = int(json.loads(rec.state_file.read_text()).get("serial", -1))
    events = rec.events_file.stat().st_size if rec.events_file.exists() else -1
    return serial, rec.state_file.stat().st_mtime_ns, events


def prepare(
    trial: Trial, *, prefix: str, python: str, namespaces: Sequence[str]
) -> tuple[Reconciler, list[str], Path]:
    """A fresh instance for `trial`: its manifests written in a new work directory.

    Returns the product's invocation, the env names and the work directory (the
    caller removes it)."""
    instance = trial.prefix(prefix)
    envs = [f"e{i}" for i in range(trial.n)]
    work = Path(tempfile.mkdtemp(prefix=f"{instance}-"))
    rec = Reconciler(python, work / "manifests", work / "state", instance)
    write_manifests(
        rec.manifests,
        network=f"n{trial.index}",
        subnet=str(trial.subnet),
        envs=envs,
        namespaces=namespaces,
    )
    return rec, envs, work


def run(
    trial: Trial, *, python: str, namespaces: Sequence[str], observe_reps: int
) -> tuple[list[Sample], dict[str, Any]]:
    """One trial of the product; samples, and the no-op checks for the JSON report."""
    rec, envs, work = prepare(trial, prefix="r", python=python, namespaces=namespaces)
    instance = rec.instance
    netns = [f"{instance}-{env}" for env in envs]
    samples: list[Sample] = []
    checks: dict[str, Any] = {"n": trial.n, "round": trial.round}

    def sample(metric: str, seconds: float) -> None:
        samples.append(Sample(NAME, metric, trial.n, trial.round, seconds))

    try:
        sample("create", rec.timed("apply"))
        created = time.perf_counter()
        check_envs(netns, subnet=trial.subnet)

        before = _fingerprint(rec)
        with rtnl.Monitor(netns) as monitor:
            # Let the kernel's delayed follow-ups of the create land first: they are
            # not the no-op's doing. The observation floor is measured in the same
            # steady state, right before the no-op.
            settled = monitor.wait_quiet(
                quiet=QUIET_SECONDS, until=created + FORWARD_DELAY_SECONDS + 1.0, timeout=60
            )
            checks["settle_notifications"] = _by_name(settled)
            passes = [observe.floor_pass(instance=instance, envs=envs) for _ in range(observe_reps)]
            samples.append(
                Sample("observe", "pass", trial.n, trial.round, sorted(passes)[len(passes) // 2])
            )
            sample("noop", rec.timed("apply"))
            inproc = rec.inproc("apply")
            changes = monitor.changes()
            checks["noop_netlink_changes"] = sum(changes.values())
            checks["noop_notifications"] = _by_name(changes)
        after = _fingerprint(rec)
        checks["noop_state_unchanged"] = before == after
        checks["state_before_after"] = [before, after]
        sample("noop_inproc", inproc["command"])
        sample("noop_warm", inproc["warm"])
        sample("import", inproc["import"])

        started = time.perf_counter()
        sample("delete", rec.timed("destroy"))
        gone = wait_until(host_links_gone, timeout=60, what="the reconciler's links to go")
        sample("delete_gone", gone - started)
    except BaseException:
        # Leave nothing behind even when a step failed: the product's own teardown first.
        subprocess.run(rec.argv("destroy"), capture_output=True, check=False, timeout=300)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return samples, checks
