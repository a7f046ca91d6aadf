"""The state file: what this instance owns, what it allocated, and what it last saw.

Persisted as JSON at `<state-dir>/<instance>/state.json` (mode 0600), written atomically
by `reconciler.state.store`. Fields, top level:

- `version`: schema version of this file (`STATE_VERSION`); a newer one is refused.
- `lineage`: a UUID chosen when the file is first written; never changes afterwards.
  A file with another lineage is another instance's history, not ours.
- `serial`: incremented on every write, so a reader can tell which copy is newer.
- `instance`: the `--instance` this file belongs to.
- `bootId`: `/proc/sys/kernel/random/boot_id` at the last write. A different boot id on
  load means every runtime object (netns pins, links, processes) is gone; allocations
  (addresses) are kept so environments come back with the same address.
- `source`: where the desired state came from (`kind`, `path`, `revision`; for git also
  `url` without credentials, `ref`, `lastAttemptedRevision`, `lastFetchTime`,
  `lastError`), and `suspended`: syncing is paused (`reconciler suspend`).
- `networks`: by name, one `NetworkRecord` per network we created: the spec last applied,
  the bridge name, phase and conditions.
- conditions (networks and environments): `Ready` (converged as last applied),
  `Reconciling` (True while a failed object waits for its retry; False, reason `Idle`,
  once converged), `Stalled` (True, reason `RetriesExhausted`, message = the last error,
  after `consecutiveFailures` reached 5; reset on success). `lastTransitionTime` moves
  only when a condition's status flips.
- `consecutiveFailures` (networks and environments): failed reconciles in a row; 0 after
  a success.
- `environments`: by name, one `EnvironmentRecord` per environment we created: the spec
  last applied (with its hash), the names of every kernel object (netns, host veth,
  cgroup paths), the holder process (pid + start time), phase and conditions. This is the
  inventory: pruning deletes recorded - desired, never names re-derived from YAML.
- health (environments; written by `reconciler.health` through the controller):
  `probes` (probe name → `healthy`, `consecutiveFailures`, `lastResult` success|failure,
  `lastTime`, `lastMessage`), `violations` (the last `VIOLATION_HISTORY` policy violations:
  `time`, `type`, `detail`, `action`), `quarantine` (`since`, `reason`, and the `specHash`
  the environment had when it was quarantined: a manifest change of the environment lifts
  it, and so does `reconciler release NAME`; absent when not quarantined).
- `allocations`: network name → environment name → address. Outlives the environment
  record while the network exists, so a recreated environment gets its old address back.
- `history`: the last `HISTORY_LIMIT` writes: serial, time, and a one-line summary.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from reconciler.kernel.types import ProcessRef

STATE_VERSION = 1
HISTORY_LIMIT = 50
VIOLATION_HISTORY = 20  # violations kept per environment, newest last

Phase = Literal["Pending", "Ready", "Degraded", "Failed", "Terminating"]


class _Record(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")


class Condition(_Record):
    """A Kubernetes-style condition; `lastTransitionTime` changes only when `status` flips."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str = Field(default="", alias="lastTransitionTime")


class ProcessRecord(_Record):
    """A process we started, identified by pid plus start time (clock ticks since boot)."""

    pid: int
    start_time: int = Field(alias="startTime")

    @property
    def ref(self) -> ProcessRef:
        """The identity drivers check and signal by."""
        return ProcessRef(pid=self.pid, start_time=self.start_time)


WorkloadState = Literal["Pending", "Running", "Exited", "Backoff"]


class WorkloadRecord(_Record):
    """One `spec.processes[]` entry as it runs: identity, restarts, crash-loop backoff."""

    pid: int | None = None
    start_time: int | None = Field(default=None, alias="startTime")
    spec_hash: str = Field(default="", alias="specHash")
    state: WorkloadState = "Pending"
    restarts: int = 0
    exit_code: int | None = Field(default=None, alias="exitCode")
    started_at: float | None = Field(default=None, alias="startedAt")  # epoch seconds
    backoff_until: float | None = Field(default=None, alias="backoffUntil")
    crash_loop: int = Field(default=0, alias="crashLoop")  # consecutive quick failures


class ProbeRecord(_Record):
    """One probe's health as the health monitor last recorded it."""

    healthy: bool = True
    consecutive_failures: int = Field(default=0, alias="consecutiveFailures")
    last_result: Literal["success", "failure"] | None = Field(default=None, alias="lastResult")
    last_time: str | None = Field(default=None, alias="lastTime")  # RFC3339
    last_message: str = Field(default="", alias="lastMessage")


class ViolationRecord(_Record):
    """One policy violation and what was done about it."""

    time: str  # RFC3339
    type: str  # oom | pids-limit | escape | denied-connection | cpu-throttled
    detail: str
    action: Literal["alert", "kill", "quarantine"]


class QuarantineRecord(_Record):
    """Why and since when an environment's network is cut off."""

    since: str  # RFC3339
    reason: str
    spec_hash: str = Field(alias="specHash")  # the env's spec hash then: a change lifts it


class NetworkRecord(_Record):
    """A network we own: its last-applied spec and its bridge."""

    spec: dict[str, Any]
    spec_hash: str = Field(alias="specHash")
    file: str | None = None  # manifest file it was declared in (protects it if that file breaks)
    bridge: str
    subnet: str
    gateway: str
    phase: Phase = "Pending"
    conditions: list[Condition] = Field(default_factory=list)
    last_reconciled: str = Field(default="", alias="lastReconciled")
    consecutive_failures: int = Field(default=0, alias="consecutiveFailures")


class EnvironmentRecord(_Record):
    """An environment we own: its last-applied spec and every kernel object it is made of."""

    spec: dict[str, Any]
    spec_hash: str = Field(alias="specHash")
    file: str | None = None  # manifest file it was declared in (protects it if that file breaks)
    labels: dict[str, str] = Field(default_factory=dict)
    netns: str
    host_veth: str | None = Field(default=None, alias="hostVeth")
    network: str | None = None
    address: str | None = None  # "a.b.c.d/len" on eth0
    cgroup_paths: list[str] = Field(default_factory=list, alias="cgroupPaths")
    holder: ProcessRecord | None = None
    processes: dict[str, WorkloadRecord] = Field(default_factory=dict)
    netns_inode: int | None = Field(default=None, alias="netnsInode")
    phase: Phase = "Pending"
    conditions: list[Condition] = Field(default_factory=list)
    last_reconciled: str = Field(default="", alias="lastReconciled")
    last_error: str | None = Field(default=None, alias="lastError")
    consecutive_failures: int = Field(default=0, alias="consecutiveFailures")
    probes: dict[str, ProbeRecord] = Field(default_factory=dict)
    violations: list[ViolationRecord] = Field(default_factory=list)
    quarantine: QuarantineRecord | None = None


class SourceRecord(_Record):
    """Where the desired state came from (`reconciler.sources`).

    For git: `url` never holds credentials, `path` is the folder inside the repository,
    `revision` is the commit last applied and `lastAttemptedRevision` the one last tried
    (they differ while a newer commit is refused); `suspended` pauses syncing.
    """

    kind: Literal["directory", "git"] = "directory"
    path: str = ""
    revision: str | None = None
    url: str | None = None
    ref: str | None = None
    last_attempted_revision: str | None = Field(default=None, alias="lastAttemptedRevision")
    last_fetch_time: str | None = Field(default=None, alias="lastFetchTime")
    last_error: str | None = Field(default=None, alias="lastError")
    suspended: bool = False
    conditions: list[Condition] = Field(default_factory=list)  # Stalled: the last sync failed


class HistoryEntry(_Record):
    """One write of the state file."""

    serial: int
    time: str
    summary: str


class StateDocument(_Record):
    """The whole state file (see the module docstring for every field)."""

    version: int = STATE_VERSION
    lineage: str = ""
    serial: int = 0
    instance: str = ""
    boot_id: str = Field(default="", alias="bootId")
    source: SourceRecord = Field(default_factory=SourceRecord)
    networks: dict[str, NetworkRecord] = Field(default_factory=dict)
    environments: dict[str, EnvironmentRecord] = Field(default_factory=dict)
    allocations: dict[str, dict[str, str]] = Field(default_factory=dict)
    history: list[HistoryEntry] = Field(default_factory=list)

    def to_json(self) -> str:
        """Serialise with the camelCase aliases, stable key order."""
        return self.model_dump_json(by_alias=True, indent=1)

    def clone(self) -> StateDocument:
        """An independent deep copy, about four times cheaper than `model_copy(deep=True)`
        (200 environments: ~5 ms against ~22 ms).

        It is rebuilt from a dump, so it is validated again: values assigned in place are
        normalised as a save and load would (a tuple becomes a list).
        """
        return StateDocument.model_validate(self.model_dump())
