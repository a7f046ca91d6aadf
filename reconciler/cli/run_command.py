"""`reconciler run`: the long-running controller (contract section 3).

Runs in the foreground until SIGTERM or SIGINT, then exits 0; environments keep running.
The work itself is `reconciler.controller.loop.Controller`; this module only parses the
options, refuses the ones a later version adds (the git source), checks the metrics
address (loopback only, unless `--metrics-allow-remote`), and sets the log level: a
daemon's log is its record, so `run` logs at info level even without `-v`. The controller,
the git source and the metrics server are imported when `run` runs, not when the command
line starts (every other command would pay for them).
"""

from __future__ import annotations

from pathlib import Path

import click

from reconciler.cli.common import user_errors
from reconciler.cli.runtime import Runtime, configure_logging


@click.command()
@click.option(
    "--resync",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Re-read everything and repair drift this often (+-10% jitter).",
)
@click.option(
    "--recover",
    is_flag=True,
    help="If the state file is missing or corrupt, rebuild it from live owned objects.",
)
@click.option("--git-url", metavar="URL", help="Sync manifests from this git repository.")
@click.option("--git-ref", metavar="REF", help="Branch, tag or commit of --git-url.")
@click.option("--git-path", metavar="DIR", help="Manifests directory inside the repository.")
@click.option(
    "--git-interval",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Poll the repository this often.",
)
@click.option(
    "--git-verify-keyring",
    metavar="FILE",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Require each commit to be signed by a key in this exported public keyring.",
)
@click.option(
    "--metrics-addr",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics on /metrics here (off by default; loopback only).",
)
@click.option(
    "--metrics-allow-remote",
    is_flag=True,
    help="Allow a --metrics-addr that is not a loopback address.",
)
@click.pass_obj
@user_errors
def run(
    runtime: Runtime,
    resync: float,
    recover: bool,
    git_url: str | None,
    git_ref: str | None,
    git_path: str | None,
    git_interval: float | None,
    git_verify_keyring: Path | None,
    metrics_addr: str | None,
    metrics_allow_remote: bool,
) -> None:
    """The controller: watch the manifests, resync, repair drift, until SIGTERM/SIGINT."""
    from reconciler.controller.loop import Controller, Settings
    from reconciler.controller.metrics import parse_listen_address
    from reconciler.sources.git import GitSource
    from reconciler.sources.sync import CHECKOUT_DIR

    git = None
    if git_url is not None:
        git = GitSource(
            url=git_url,
            checkout_dir=runtime.store.dir / CHECKOUT_DIR,
            ref=git_ref,
            path=git_path or ".",
            keyring=git_verify_keyring.absolute() if git_verify_keyring else None,
        )
    else:
        given = {
            "--git-ref": git_ref,
            "--git-path": git_path,
            "--git-interval": git_interval,
            "--git-verify-keyring": git_verify_keyring,
        }
        orphaned = [name for name, value in given.items() if value is not None]
        if orphaned:
            raise click.UsageError(f"{', '.join(orphaned)} needs --git-url")
    metrics = (
        parse_listen_address(metrics_addr, allow_remote=metrics_allow_remote)
        if metrics_addr is not None
        else None
    )
    options = runtime.options
    configure_logging(log_format=options.log_format, verbose=True)
    settings = Settings(
        instance=options.instance,
        manifests=options.manifests.absolute(),
        resync=resync,
        recover=recover,
        metrics_address=metrics,
        git=git,
        git_interval=git_interval or 60.0,
    )
    Controller(runtime, settings).run()
