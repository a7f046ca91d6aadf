"""Human renderings: the Terraform-like plan, status tables, events."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from reconciler.engine.plan import Action, Plan

SYMBOLS = {
    Action.CREATE: "+",
    Action.UPDATE: "~",
    Action.RECREATE: "-/+",
    Action.DELETE: "-",
}
WORDS = {
    Action.CREATE: "will be created",
    Action.UPDATE: "will be updated in place",
    Action.RECREATE: "must be replaced",
    Action.DELETE: "will be destroyed",
}


def plan_text(plan: Plan) -> str:
    """Terraform-style: one block per change, then a summary line."""
    lines: list[str] = []
    for change in plan.changes:
        if change.action is Action.NOOP:
            continue
        lines.append(
            f"{SYMBOLS[change.action]:>3} {change.kind}/{change.name} {WORDS[change.action]}"
        )
        lines.extend(f"      {reason}" for reason in change.reasons)
    if not lines:
        return "No changes. The host matches the manifests."
    counts = plan.summary()
    lines.append("")
    lines.append(
        f"Plan: {counts['create']} to create, {counts['update']} to update, "
        f"{counts['recreate']} to replace, {counts['delete']} to destroy."
    )
    return "\n".join(lines)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain aligned table, kubectl style."""
    cells = [[str(h) for h in headers]] + [
        ["" if v is None else str(v) for v in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "   ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def status_tables(doc: dict[str, Any], *, wide: bool) -> str:
    """Networks and environments as tables."""
    out: list[str] = []
    if doc["networks"]:
        out.append(
            table(
                ["NETWORK", "BRIDGE", "SUBNET", "GATEWAY", "PHASE"],
                [
                    [n["name"], n["bridge"], n["subnet"], n["gateway"], n["phase"]]
                    for n in doc["networks"]
                ],
            )
        )
    if doc["environments"]:
        headers = ["ENVIRONMENT", "PHASE", "ADDRESS", "MEMORY", "PIDS", "RECONCILED"]
        if wide:
            headers += ["NETNS", "VETH", "HOLDER", "CGROUP", "REASON"]
        rows = []
        for env in doc["environments"]:
            iface = env["interfaces"][0] if env["interfaces"] else {}
            usage, limits = env["cgroup"]["usage"], env["cgroup"]["limits"]
            row = [
                env["name"],
                env["phase"],
                iface.get("address", "-"),
                _usage(usage["memoryBytes"], limits["memoryBytes"]),
                f"{usage['pids']}/{limits['pids'] or 'max'}",
                env["lastReconciled"] or "-",
            ]
            if wide:
                holder = env.get("holder") or {}
                ready: dict[str, Any] = next(
                    (c for c in env["conditions"] if c["type"] == "Ready"), {}
                )
                row += [
                    env["netns"],
                    iface.get("host", "-"),
                    holder.get("pid", "-"),
                    env["cgroup"]["driver"],
                    ready.get("reason", "-"),
                ]
            rows.append(row)
        out.append(table(headers, rows))
    if not out:
        return "No environments. Add manifests and run `reconciler apply`."
    return "\n\n".join(out)


def _usage(used: int, limit: int | None) -> str:
    from reconciler.manifests.quantities import format_bytes

    mib = f"{used / 2**20:.0f}Mi"
    return f"{mib}/{format_bytes(limit)}" if limit else mib
