"""Network isolation as data: the desired picture, rendered to nftables text. No I/O here.

How isolation works on one bridge (measured on this kernel; see architecture.md):

- Every env's host veth is a bridge port with `isolated on`, so the bridge never switches a
  frame from one env port to another. With `proxy_arp_pvlan` on the bridge, the host
  answers an env's ARP for a neighbour with the bridge's own MAC, so env-to-env traffic
  is *routed* through the host (in and out of the same bridge) and therefore crosses the
  `inet` forward hook, where conntrack works. This holds whether br_netfilter is on or
  off, and needs no stateful matching in the `bridge` family (not built on this kernel).
- Forwarding is enabled per bridge (`net.ipv4.conf.<bridge>.forwarding`), never globally;
  the forward chain then refuses everything that would leave the bridge it came from
  (uplink, other networks) and everything entering our bridges from elsewhere. No NAT.
- The `bridge` table drops, at the port, any IPv4 packet or ARP whose source address is
  not the env's own (anti-spoof), so rules keyed by source address can be trusted.

What `render` produces for one instance (tables owned whole, nothing else touched):

    table inet reconciler_<instance>
      set denied      dynamic (src . dst) -> counter: every policy drop, read as violations
      chain forward   base: dispatch by input bridge to fwd_<network>; drop entries from elsewhere
      chain input     base: from our bridges only replies (env -> host is refused)
      chain output    base: no ICMP redirects to envs (the detour via the host is deliberate)
      chain from_envs established/related only
      chain deny      count (src, dst) in @denied, then drop
      chain fwd_<net> stay on this bridge; replies; strict: the destination's ingress rules
                      (open: everything); else deny
    table bridge reconciler_<instance>
      set spoofed     dynamic port -> counter: frames dropped by anti-spoof
      chain prerouting base: quarantined ports dropped; member ports -> antispoof
      chain forward    base: nothing switched port to port (guards a port not isolated yet)
      chain output     base: nothing delivered to quarantined ports
      chain antispoof  (port . own IPv4) and (port . own ARP sender) pass; the rest drops

Every rule carries a comment ending in a hash of (family, chain, position, rule text).
Those comments are the fingerprint: listing the live table and comparing, chain by
chain, the comments found with the comments rendered tells a flushed chain, a deleted
table, a hand-added or hand-replaced rule apart from a table that is exactly ours,
without parsing nft's normalised rule syntax (which differs from what we write).

Updates are one `nft -f` transaction that adds what is missing, flushes and refills every
chain and deletes chains and stale `denied` elements we no longer want; the dynamic sets
are never flushed, so the counters survive policy edits. A table whose *structure* was
tampered with (a base chain's hook or priority, a foreign object, table flags) is
deleted and recreated in the same transaction, carrying the live counters over.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["inet", "bridge"]
Isolation = Literal["strict", "open"]
Protocol = Literal["tcp", "udp"]

TABLE_PREFIX = "reconciler_"
DENIED_SET = "denied"
SPOOFED_SET = "spoofed"
# Bounded: an env probing thousands of addresses must not grow kernel memory without end.
# When full, new pairs are no longer counted; the drop itself is a separate rule (below).
DENIED_SET_SIZE = 65536
SPOOFED_SET_SIZE = 4096
FAMILIES: tuple[Family, ...] = ("inet", "bridge")

_INSTANCE = re.compile(r"[a-z0-9][a-z0-9_]{0,31}")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_NETWORK = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9 ._:/,>-]")
_HASH_LEN = 12
_DESC_MAX = 100  # nft refuses comments over 128 bytes; leave room for the hash

# Priorities as numbers: nft lists them numerically in JSON, so the fingerprint compares
# like with like. 0 is "filter" in inet; -200 is "filter" in the bridge family.
_INET_PRIORITY = 0
_BRIDGE_PRIORITY = -200


# --------------------------------------------------------------------------- input model


@dataclass(frozen=True)
class Member:
    """One env attached to a network: its host-side veth (bridge port) and its address."""

    env: str
    host_port: str
    address: str  # IPv4, no prefix length


@dataclass(frozen=True)
class Allow:
    """One ingress rule of `dst_env`: who (an env or a CIDR) may open which ports."""

    dst_env: str
    src_env: str | None = None
    src_cidr: str | None = None
    ports: tuple[int, ...] = ()  # empty: every port
    protocol: Protocol = "tcp"

    def __post_init__(self) -> None:
        if (self.src_env is None) == (self.src_cidr is None):
            raise ValueError(f"ingress of {self.dst_env}: give exactly one of src_env, src_cidr")
        if self.protocol not in ("tcp", "udp"):
            raise ValueError(f"ingress of {self.dst_env}: protocol {self.protocol!r}")
        bad = [p for p in self.ports if not 1 <= p <= 65535]
        if bad:
            raise ValueError(f"ingress of {self.dst_env}: ports out of range {bad}")


@dataclass(frozen=True)
class NetworkRules:
    """One network: its bridge, members, isolation mode and the ingress rules of its envs."""

    name: str
    bridge: str
    subnet: str
    gateway: str
    isolation: Isolation = "strict"
    members: tuple[Member, ...] = ()
    ingress: tuple[Allow, ...] = ()


@dataclass(frozen=True)
class IsolationSpec:
    """The complete desired isolation of one instance; the engine builds it every reconcile."""

    instance: str
    networks: tuple[NetworkRules, ...] = ()
    quarantined: frozenset[str] = frozenset()  # env names whose traffic is cut entirely


# --------------------------------------------------------------------------- rendered model


@dataclass(frozen=True)
class BaseHook:
    """What makes a chain a base chain: attached to a netfilter hook."""

    hook: str
    priority: int
    type: str = "filter"
    policy: str = "accept"  # never drop by policy: other traffic of the host is not ours


@dataclass(frozen=True)
class Rule:
    """One rule: its nft text (without comment) and the fingerprint comment it carries."""

    body: str
    comment: str

    @property
    def text(self) -> str:
        return f'{self.body} comment "{self.comment}"'


@dataclass(frozen=True)
class Chain:
    """A chain and its rules, in order."""

    name: str
    rules: tuple[Rule, ...] = ()
    base: BaseHook | None = None

    @property
    def declaration(self) -> str:
        if self.base is None:
            return ""
        b = self.base
        return f" {{ type {b.type} hook {b.hook} priority {b.priority}; policy {b.policy}; }}"


@dataclass(frozen=True)
class DynamicSet:
    """A set the packet path adds to (`update @set`), each element with its own counter."""

    name: str
    key: tuple[str, ...]  # nft data types, concatenated
    size: int

    @property
    def declaration(self) -> str:
        return f"{{ type {' . '.join(self.key)}; size {self.size}; flags dynamic; counter; }}"


@dataclass(frozen=True)
class Table:
    """One table of ours, rendered."""

    family: Family
    name: str
    sets: tuple[DynamicSet, ...]
    chains: tuple[Chain, ...]

    @property
    def ref(self) -> str:
        return f"{self.family} {self.name}"

    def shape(self) -> TableShape:
        """The fingerprint a live listing of this table must match exactly."""
        return TableShape(
            chains=tuple(
                sorted(
                    (c.name, _hook_key(c.base), tuple(r.comment for r in c.rules))
                    for c in self.chains
                )
            ),
            sets=tuple(sorted((s.name, s.key) for s in self.sets)),
        )


@dataclass(frozen=True)
class Ruleset:
    """Both tables of an instance; empty `tables` means "no networks: remove them"."""

    instance: str
    tables: tuple[Table, ...]
    keep: frozenset[str] = frozenset()  # members' addresses and ports, gateways
    subnets: tuple[str, ...] = ()  # our networks: an address in one that is not kept is gone

    def stale(self, key: Key) -> bool:
        """True for a counter element that names a departed env, or no current one.

        Addresses outside our subnets (an uplink, the world) are neither: (a, 8.8.8.8)
        lives as long as a does.
        """
        if not self.keep.intersection(key):
            return True
        subnets = [ipaddress.IPv4Network(s) for s in self.subnets]
        for part in key:
            if part in self.keep or not _is_ip(part):
                continue
            address = ipaddress.ip_address(part)
            if any(address in subnet for subnet in subnets):
                return True
        return False


# --------------------------------------------------------------------------- live model


Key = tuple[str, ...]  # a dynamic set element: ("10.0.0.2", "10.0.0.3") or ("rcv1a2b...",)
_HookKey = tuple[str, str, int, str] | None  # (type, hook, priority, policy)
_ChainShape = tuple[str, _HookKey, tuple[str | None, ...]]


@dataclass(frozen=True)
class TableShape:
    """Chains (name, hook, rule comments) and sets (name, key), sorted; plus anything else.

    `extras` names what our renderer never makes (a foreign object, table flags): its
    presence alone means drift, and the table is rebuilt.
    """

    chains: tuple[_ChainShape, ...]
    sets: tuple[tuple[str, tuple[str, ...]], ...]
    extras: tuple[str, ...] = ()


@dataclass(frozen=True)
class LiveTable:
    """One of our tables as `nft -j list table` shows it."""

    shape: TableShape
    counters: Mapping[str, Mapping[Key, tuple[int, int]]] = field(default_factory=dict)
    # counters: set name -> element -> (packets, bytes)


def _hook_key(base: BaseHook | None) -> _HookKey:
    return None if base is None else (base.type, base.hook, base.priority, base.policy)


def parse_live(document: Mapping[str, Any], *, family: Family, name: str) -> LiveTable:
    """Read `nft -j list table <family> <name>` output into a `LiveTable` (pure).

    Set elements go to `counters` (the only sets we render are the dynamic ones, whose
    elements are data the packet path writes, not structure).
    """
    chains: dict[str, tuple[_HookKey, list[str | None]]] = {}
    sets: list[tuple[str, tuple[str, ...]]] = []
    counters: dict[str, dict[Key, tuple[int, int]]] = {}
    extras: list[str] = []
    rules: list[tuple[str, str | None]] = []
    for entry in document.get("nftables", []):
        (kind, body), *_ = entry.items()
        if kind == "metainfo":
            continue
        if body.get("family") != family:
            continue
        if kind == "table":
            if body.get("name") == name and body.get("flags"):
                # nft 1.0.6 prints garbage for table flags in JSON; presence is what counts.
                extras.append("table flags")
            continue
        if body.get("table") != name:
            continue
        if kind == "chain":
            hook = None
            if "hook" in body:
                hook = (
                    str(body.get("type")),
                    str(body["hook"]),
                    int(body.get("prio", 0)),
                    str(body.get("policy", "accept")),
                )
            chains[body["name"]] = (hook, [])
        elif kind == "rule":
            rules.append((body["chain"], body.get("comment")))
        elif kind == "set":
            key = body.get("type")
            sets.append((body["name"], tuple(key) if isinstance(key, list) else (str(key),)))
            counters[body["name"]] = _set_counters(body.get("elem", ()))
        else:
            extras.append(f"{kind} {body.get('name', '?')}")
    for chain, comment in rules:  # listed after their chains, in chain order
        if chain in chains:
            chains[chain][1].append(comment)
    shape = TableShape(
        chains=tuple(sorted((n, hook, tuple(cs)) for n, (hook, cs) in chains.items())),
        sets=tuple(sorted(sets)),
        extras=tuple(sorted(extras)),
    )
    return LiveTable(shape=shape, counters=counters)


def _set_counters(elements: Iterable[Any]) -> dict[Key, tuple[int, int]]:
    found: dict[Key, tuple[int, int]] = {}
    for item in elements:
        elem = item.get("elem", item) if isinstance(item, dict) else item
        if not isinstance(elem, dict):
            continue  # an element without counter: nothing to carry
        val = elem.get("val")
        key = tuple(val["concat"]) if isinstance(val, dict) else (str(val),)
        counter = elem.get("counter") or {}
        found[tuple(str(k) for k in key)] = (
            int(counter.get("packets", 0)),
            int(counter.get("bytes", 0)),
        )
    return found


# --------------------------------------------------------------------------- render


def table_name(instance: str) -> str:
    """`reconciler_<instance>`: the name of both of the instance's tables."""
    if not _INSTANCE.fullmatch(instance):
        raise ValueError(f"instance {instance!r} is not [a-z0-9][a-z0-9_]{{0,31}}")
    return TABLE_PREFIX + instance


def network_chain(network: str) -> str:
    """The inet chain holding one network's forward policy."""
    return f"fwd_{network}"


class _ChainBuilder:
    """Collects a chain's rules and stamps each with its fingerprint comment."""

    def __init__(self, family: Family, name: str, base: BaseHook | None = None) -> None:
        self.family, self.name, self.base = family, name, base
        self.rules: list[Rule] = []

    def add(self, body: str, desc: str) -> None:
        index = len(self.rules)
        digest = hashlib.sha256(f"{self.family}\0{self.name}\0{index}\0{body}".encode())
        safe = _COMMENT_UNSAFE.sub("_", desc)[:_DESC_MAX]
        self.rules.append(Rule(body=body, comment=f"{safe} #{digest.hexdigest()[:_HASH_LEN]}"))

    def build(self) -> Chain:
        return Chain(name=self.name, rules=tuple(self.rules), base=self.base)


def _names(values: Iterable[str]) -> str:
    return "{ " + ", ".join(f'"{v}"' for v in sorted(set(values))) + " }"


def _check(spec: IsolationSpec) -> None:
    """Reject what would render to something unsafe or ambiguous (engine bugs, not users)."""
    table_name(spec.instance)
    seen_env: dict[str, str] = {}
    seen_addr: dict[str, str] = {}
    seen_if: set[str] = set()
    for net in spec.networks:
        if not _NETWORK.fullmatch(net.name) or len(net.name) > 63:
            raise ValueError(f"network name {net.name!r} is not a DNS-1123 label")
        if not _IFNAME.fullmatch(net.bridge):
            raise ValueError(f"network {net.name}: bridge name {net.bridge!r}")
        if net.isolation not in ("strict", "open"):
            raise ValueError(f"network {net.name}: isolation {net.isolation!r}")
        subnet = ipaddress.IPv4Network(net.subnet)
        ipaddress.IPv4Address(net.gateway)
        for ifname in (net.bridge, *(m.host_port for m in net.members)):
            if ifname in seen_if:
                raise ValueError(f"interface {ifname} appears twice")
            seen_if.add(ifname)
        for m in net.members:
            if not _IFNAME.fullmatch(m.host_port):
                raise ValueError(f"env {m.env}: host port name {m.host_port!r}")
            if ipaddress.IPv4Address(m.address) not in subnet:
                raise ValueError(f"env {m.env}: {m.address} is not in {net.subnet}")
            for seen, value, what in ((seen_env, m.env, "env"), (seen_addr, m.address, "address")):
                if value in seen:
                    raise ValueError(f"{what} {value} is on {seen[value]} and {net.name}")
                seen[value] = net.name
        for allow in net.ingress:
            if allow.src_cidr is not None:
                ipaddress.IPv4Network(allow.src_cidr, strict=False)


def _allow_rules(net: NetworkRules) -> list[tuple[str, str]]:
    """(body, description) of each ingress rule that resolves on this network, sorted.

    An env source resolves to its address on this same network; one that is elsewhere
    (or nowhere) could never reach the destination anyway, so the rule is left out.
    """
    address = {m.env: m.address for m in net.members}
    out: dict[str, tuple[int, str]] = {}  # body -> (destination as int, description)
    for allow in net.ingress:
        dst = address.get(allow.dst_env)
        if dst is None:
            continue
        if allow.src_env is not None:
            src = address.get(allow.src_env)
            if src is None:
                continue
            src_desc = allow.src_env
        else:
            src = str(ipaddress.IPv4Network(str(allow.src_cidr), strict=False))
            src_desc = src
        ports = tuple(sorted(set(allow.ports)))
        proto = allow.protocol
        match = (
            f"{proto} dport {{ {', '.join(map(str, ports))} }}"
            if ports
            else f"meta l4proto {proto}"
        )
        body = f"ip daddr {dst} ip saddr {src} {match} accept"
        port_desc = ",".join(map(str, ports)) if ports else "all"
        desc = f"allow {src_desc} to {allow.dst_env} {proto} {port_desc}"
        out.setdefault(body, (int(ipaddress.IPv4Address(dst)), desc))
    # By destination, then text: the order of manifests and rules never moves a rule.
    ordered = sorted(out.items(), key=lambda item: (item[1][0], item[0]))
    return [(body, desc) for body, (_, desc) in ordered]


def _inet_table(spec: IsolationSpec, networks: Sequence[NetworkRules]) -> Table:
    bridges = [n.bridge for n in networks]
    forward = _ChainBuilder("inet", "forward", BaseHook("forward", _INET_PRIORITY))
    dispatch = ", ".join(f'"{n.bridge}" : jump {network_chain(n.name)}' for n in networks)
    forward.add(f"iifname vmap {{ {dispatch} }}", "from an env bridge: its network policy")
    forward.add(f"oifname {_names(bridges)} jump deny", "nothing enters our networks")

    inp = _ChainBuilder("inet", "input", BaseHook("input", _INET_PRIORITY))
    inp.add(f"iifname {_names(bridges)} jump from_envs", "envs reach the host only with replies")

    out = _ChainBuilder("inet", "output", BaseHook("output", _INET_PRIORITY))
    # Env-to-env traffic leaves the bridge it came in on, so the kernel would tell the env
    # to go direct; the detour through the host is the point: keep envs' routes clean.
    out.add(f"oifname {_names(bridges)} icmp type redirect drop", "no redirects to envs")

    from_envs = _ChainBuilder("inet", "from_envs")
    from_envs.add("ct state established,related accept", "replies to the host")
    from_envs.add("jump deny", "nothing else")

    deny = _ChainBuilder("inet", "deny")
    # Count and drop in two rules: when the set is full, `update` ends its rule without a
    # verdict, and the drop must still happen.
    deny.add(
        f"meta nfproto ipv4 update @{DENIED_SET} {{ ip saddr . ip daddr }}",
        "count per source and destination",
    )
    deny.add("drop", "denied")

    chains = [forward.build(), inp.build(), out.build(), from_envs.build(), deny.build()]
    for net in networks:
        fwd = _ChainBuilder("inet", network_chain(net.name))
        fwd.add(f'oifname != "{net.bridge}" jump deny', f"{net.name} never leaves its bridge")
        fwd.add("ct state established,related accept", "replies")
        fwd.add("ct state invalid drop", "not part of any connection")
        if net.isolation == "open":
            fwd.add("accept", f"{net.name} is open")
        else:
            for body, desc in _allow_rules(net):
                fwd.add(body, desc)
            fwd.add("jump deny", f"{net.name} is strict")
        chains.append(fwd.build())
    sets = (DynamicSet(DENIED_SET, ("ipv4_addr", "ipv4_addr"), DENIED_SET_SIZE),)
    return Table("inet", table_name(spec.instance), sets, tuple(chains))


def _bridge_table(spec: IsolationSpec, networks: Sequence[NetworkRules]) -> Table:
    members = sorted((m for n in networks for m in n.members), key=lambda m: m.host_port)
    ports = [m.host_port for m in members]
    quarantined = [m.host_port for m in members if m.env in spec.quarantined]

    pre = _ChainBuilder("bridge", "prerouting", BaseHook("prerouting", _BRIDGE_PRIORITY))
    fwd = _ChainBuilder("bridge", "forward", BaseHook("forward", _BRIDGE_PRIORITY))
    out = _ChainBuilder("bridge", "output", BaseHook("output", _BRIDGE_PRIORITY))
    anti = _ChainBuilder("bridge", "antispoof")
    if quarantined:
        pre.add(f"iifname {_names(quarantined)} drop", "quarantined: nothing in")
        out.add(f"oifname {_names(quarantined)} drop", "quarantined: nothing out")
    if members:
        pre.add(f"iifname {_names(ports)} jump antispoof", "envs send only as themselves")
        # Our ports are isolated, so the bridge never switches between them; this guards
        # the moment a new port exists but is not isolated yet.
        fwd.add(f"iifname {_names(ports)} drop", "never switched from an env port")
        fwd.add(f"oifname {_names(ports)} drop", "never switched to an env port")
        pairs = ", ".join(f'"{m.host_port}" . {m.address}' for m in members)
        anti.add(f"iifname . ip saddr {{ {pairs} }} accept", "own IPv4 source")
        anti.add(f"iifname . arp saddr ip {{ {pairs} }} accept", "own ARP sender")
    anti.add("arp saddr ip 0.0.0.0 drop", "ARP probes: dropped, not counted")
    anti.add(f"meta protocol {{ ip, arp }} update @{SPOOFED_SET} {{ iifname }}", "count spoofing")
    anti.add("drop", "other sources and protocols")
    sets = (DynamicSet(SPOOFED_SET, ("ifname",), SPOOFED_SET_SIZE),)
    chains = (pre.build(), fwd.build(), out.build(), anti.build())
    return Table("bridge", table_name(spec.instance), sets, chains)


def render(spec: IsolationSpec) -> Ruleset:
    """The instance's tables for `spec`: deterministic, whatever the input order.

    Raises ValueError for a spec that is inconsistent (an env or address twice, an
    address outside its subnet, a name unsafe in nft syntax).
    """
    _check(spec)
    networks = sorted(spec.networks, key=lambda n: n.name)
    keep = frozenset(x for n in networks for m in n.members for x in (m.address, m.host_port))
    keep |= {n.gateway for n in networks}
    if not networks:
        return Ruleset(instance=spec.instance, tables=())
    tables = (_inet_table(spec, networks), _bridge_table(spec, networks))
    subnets = tuple(str(ipaddress.IPv4Network(n.subnet)) for n in networks)
    return Ruleset(instance=spec.instance, tables=tables, keep=keep, subnets=subnets)


# --------------------------------------------------------------------------- transactions


def structural_drift(table: Table, live: LiveTable) -> list[str]:
    """Why `live` cannot be repaired by refilling chains (empty: it can).

    Policy of a base chain and missing or extra chains are repairable in place; a base
    chain with another hook, type or priority, a set of another key type, or anything
    we never create is not.
    """
    reasons = [f"unexpected {extra}" for extra in live.shape.extras]
    wanted = {c.name: _hook_key(c.base) for c in table.chains}
    for name, hook, _ in live.shape.chains:
        if name not in wanted:
            if hook is not None:
                reasons.append(f"foreign base chain {name}")
            continue
        want = wanted[name]
        if (hook is None) != (want is None) or (
            hook is not None and want is not None and hook[:3] != want[:3]
        ):
            reasons.append(f"chain {name} hook is {hook}, want {want}")
    want_sets = dict((s.name, s.key) for s in table.sets)
    for set_name, key in live.shape.sets:
        if want_sets.get(set_name, key) != key:
            reasons.append(f"set {set_name} key is {key}")
    return reasons


def differences(table: Table, live: LiveTable | None) -> list[str]:
    """What differs between the rendered `table` and its live state, one line each.

    Empty means in sync. Rule bodies are compared through their fingerprint comments;
    the dynamic sets' elements are data and never count as a difference.
    """
    ref = f"nftables table {table.ref}"
    if live is None:
        return [f"{ref}: created"]
    drift = structural_drift(table, live)
    if drift:
        return [f"{ref}: rebuilt ({'; '.join(drift)})"]
    changes: list[str] = []
    have = {name: (hook, comments) for name, hook, comments in live.shape.chains}
    for chain in table.chains:
        want = tuple(r.comment for r in chain.rules)
        if chain.name not in have:
            changes.append(f"{ref}: chain {chain.name} created with {len(want)} rules")
            continue
        hook, comments = have[chain.name]
        if hook != _hook_key(chain.base):
            changes.append(f"{ref}: chain {chain.name} policy reset to accept")
        if comments != want:
            changes.append(
                f"{ref}: chain {chain.name} rules replaced ({len(comments)} -> {len(want)})"
            )
    wanted_chains = {c.name for c in table.chains}
    changes += [
        f"{ref}: chain {name} deleted"
        for name, _, _ in live.shape.chains
        if name not in wanted_chains
    ]
    want_sets = {s.name for s in table.sets}
    have_sets = {name for name, _ in live.shape.sets}
    changes += [f"{ref}: set {name} created" for name in sorted(want_sets - have_sets)]
    changes += [f"{ref}: set {name} deleted" for name in sorted(have_sets - want_sets)]
    return changes


def stale_keys(table: Table, live: LiveTable, ruleset: Ruleset) -> dict[str, list[Key]]:
    """Per dynamic set of `table`, the elements `ruleset` calls stale."""
    stale: dict[str, list[Key]] = {}
    for s in table.sets:
        found = sorted(k for k in live.counters.get(s.name, {}) if ruleset.stale(k))
        if found:
            stale[s.name] = found
    return stale


def _element(key: Key) -> str:
    return " . ".join(part if _is_ip(part) else f'"{part}"' for part in key)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def table_script(table: Table, live: LiveTable | None, *, ruleset: Ruleset) -> list[str]:
    """nft commands that make `table` exactly as rendered, given its live state.

    Absent: created. Structurally drifted: deleted and recreated, carrying the counters
    of the dynamic sets over. Otherwise: missing chains added, every chain flushed and
    refilled, unwanted chains and sets deleted, stale counter elements removed; the
    dynamic sets themselves are left alone so their counters keep counting. Counter
    elements of departed envs are dropped (`Ruleset.stale`).
    """
    ref = table.ref
    rebuild = live is not None and bool(structural_drift(table, live))
    lines = [f"add table {ref}"]
    if rebuild:
        lines += [f"delete table {ref}", f"add table {ref}"]
    lines += [f"add set {ref} {s.name} {s.declaration}" for s in table.sets]
    lines += [f"add chain {ref} {c.name}{c.declaration}" for c in table.chains]
    wanted_chains = {c.name for c in table.chains}
    wanted_sets = {s.name for s in table.sets}
    extra_chains: list[str] = []
    extra_sets: list[str] = []
    if live is not None and not rebuild:
        extra_chains = [n for n, _, _ in live.shape.chains if n not in wanted_chains]
        extra_sets = [n for n, _ in live.shape.sets if n not in wanted_sets]
    # Flush every chain before deleting any: a jump into a chain pins it until the rule
    # holding the jump is gone, and both happen in this one transaction.
    for name in [*(c.name for c in table.chains), *extra_chains]:
        lines.append(f"flush chain {ref} {name}")
    lines += [f"delete chain {ref} {name}" for name in extra_chains]
    lines += [f"delete set {ref} {name}" for name in extra_sets]
    if live is not None:
        stale = stale_keys(table, live, ruleset)
        for s in table.sets:
            counters = live.counters.get(s.name, {})
            if rebuild:
                gone = set(stale.get(s.name, ()))
                kept = sorted((k, v) for k, v in counters.items() if k not in gone)
                if kept:
                    items = ", ".join(
                        f"{_element(k)} counter packets {p} bytes {b}" for k, (p, b) in kept
                    )
                    lines.append(f"add element {ref} {s.name} {{ {items} }}")
            elif s.name in stale:
                items = ", ".join(_element(k) for k in stale[s.name])
                lines.append(f"delete element {ref} {s.name} {{ {items} }}")
    for c in table.chains:
        lines += [f"add rule {ref} {c.name} {r.text}" for r in c.rules]
    return lines


def remove_script(instance: str) -> list[str]:
    """Delete both tables of the instance; `add` first so a missing one is not an error."""
    name = table_name(instance)
    lines: list[str] = []
    for family in FAMILIES:
        lines += [f"add table {family} {name}", f"delete table {family} {name}"]
    return lines


def script(ruleset: Ruleset, live: Mapping[Family, LiveTable | None]) -> str:
    """The whole `nft -f` transaction for `ruleset` (both tables, or their removal)."""
    if not ruleset.tables:
        lines = remove_script(ruleset.instance)
    else:
        lines = []
        for table in ruleset.tables:
            lines += table_script(table, live.get(table.family), ruleset=ruleset)
    return "\n".join(lines) + "\n"
