"""`reconciler exec` and `reconciler logs`: into an environment, and what it printed.

`exec NAME [--] CMD...` finds the environment's holder in the state file (the inventory
records it as pid + start time), verifies it still runs, and runs CMD inside all of its
namespaces and its cgroup with this terminal's stdin/stdout/stderr (see
`reconciler.kernel.processes.run_in_env`); the exit code is CMD's. A command that cannot
start exits 127 (not found) or 126, like a shell.

`logs NAME [PROCESS] [-f]` prints the capture files the workloads write themselves
(`<state-dir>/<instance>/logs/<env>/<process>.log`, rotated part first). Without PROCESS
every process of the environment is shown, each line prefixed with its name.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import click

from reconciler.cli.common import user_errors
from reconciler.errors import ReconcilerError

if TYPE_CHECKING:  # imported by the commands themselves: start-up is paid by every command
    from reconciler.cli.runtime import Runtime
    from reconciler.state.model import EnvironmentRecord


def _environment(runtime: Runtime, name: str) -> EnvironmentRecord:
    record = runtime.load_state().environments.get(name)
    if record is None:
        raise ReconcilerError(
            f"unknown environment {name!r} in instance {runtime.options.instance!r}; "
            "see `reconciler status`"
        )
    return record


@click.command(
    name="exec",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="[--] CMD...")
@click.pass_obj
@user_errors
def exec_(runtime: Runtime, name: str, command: tuple[str, ...]) -> None:
    """Run CMD inside environment NAME (namespaces and cgroup), stdio attached."""
    if command[:1] == ("--",):
        # After NAME, click passes everything through verbatim, the separator too.
        command = command[1:]
    if not command:
        raise click.UsageError("missing CMD after --")
    if os.geteuid() != 0:
        raise ReconcilerError("exec enters an environment's namespaces: run it as root")
    from reconciler.kernel.processes import run_in_env

    record = _environment(runtime, name)
    if record.holder is None:
        raise ReconcilerError(
            f"environment {name!r} has no running holder (phase {record.phase}); "
            "run `reconciler apply` to start it"
        )
    code = run_in_env(
        env=name,
        holder=record.holder.ref,
        cgroup_procs=[os.path.join(path, "cgroup.procs") for path in record.cgroup_paths],
        command=list(command),
    )
    raise SystemExit(code)


@click.command()
@click.argument("name")
@click.argument("process", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output.")
@click.pass_obj
@user_errors
def logs(runtime: Runtime, name: str, process: str | None, follow: bool) -> None:
    """Captured stdout/stderr of PROCESS (default: every process) of environment NAME."""
    from reconciler.kernel.logfiles import env_log_dir, log_path, logged_processes, read_many

    record = _environment(runtime, name)
    directory = env_log_dir(runtime.store.dir, name)
    declared = [str(p.get("name")) for p in record.spec.get("processes", [])]
    known = sorted({*declared, *logged_processes(directory)})
    if process is not None and process not in known:
        listing = ", ".join(known) or "none"
        raise ReconcilerError(
            f"environment {name!r} has no process {process!r} (processes: {listing})"
        )
    names = [process] if process is not None else known
    width = max((len(n) for n in names), default=0)
    paths = {n: log_path(directory, n) for n in names}
    for source, line in read_many(paths, follow=follow):
        click.echo(line if process is not None else f"{source:<{width}} | {line}", nl=False)
