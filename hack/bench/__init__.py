"""The performance benchmark of issue 8: the product against the kernel floor and CNI.

Run it with one command from a clean checkout (root; it builds its own sandbox):

    hack/bench.sh --sizes 10,50,200 --rounds 3 --json bench-results.json

In one process and one throwaway network namespace it builds and tears down N
environments (netns + veth with its peer in the netns + bridge port + address + default
route + memory/cpu/pids cgroup limits) three ways, interleaved over rounds:

- `floor`: hand-rolled `ip -batch` and cgroup writes (`floor.py`), the kernel's speed as
  reachable from a shell;
- `cni`: Debian's CNI `bridge` plugin with `host-local` IPAM (`cni.py`), what container
  runtimes do;
- `reconciler`: `reconciler apply` / `destroy` as whole commands (`product.py`), plus the
  no-op reconcile against a lean observation floor (`observe.py`, `rtnl.py`).

Optional: `--run-metrics` (Ready latency, idle CPU and RSS of `reconciler run`,
`runmetrics.py`) and `--profile FILE` (one apply under pyinstrument, `profiling.py`).
Everything printed derives from the raw samples (`stats.py`, `report.py`), which the
`--json` file keeps.
"""
