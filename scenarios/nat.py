"""Several hosts on one machine: network namespaces, one node behind a NAT (issue 13).

Linux network namespaces stand in for hosts, veth pairs and a bridge for the wires, and
iptables masquerade for a home router:

    BOOT  10.77.0.1   the bootstrap, `--bind 0.0.0.0:5555`
    OPEN  10.77.0.3   two nodes that anyone can dial: a strong one that also volunteers as
                      a relay (`--relay 7100`), and a weak one that needs a helper for its
                      later blocks
    NAT   10.77.0.2   the router: a bridge for the public side, 10.78.0.1 to the home side,
                      masquerade for what leaves the home side
    HOME  10.78.0.2   a strong node behind the NAT: it dials out, nobody can dial in

Every process is `ip netns exec NS python -m tools.cli ...` and follows the README's
"Several hosts" section as written: the bootstrap binds 0.0.0.0, the open nodes bind
0.0.0.0:7000/7001 and `--advertise` their address, the home node binds 0.0.0.0:7000 and
advertises nothing (so it advertises its own address on the route to the bootstrap, which
nobody outside can dial). The bootstrap's check finds that out, the home node takes a slot on
the relay and is reached through it from then on (`--relay-via none`: no relay, the home node
then dials out for everything and nobody can push to it). All three data nodes hold the same
synthetic task (one cluster) and merge by gossip (every member pushes its contribution to
every member, so the home node has inbound traffic: through the relay). While they train, the peer table is read every half second for
every verdict and every (owner, helper) it names. The JSON: `reachable` (node -> bool, the
bootstrap's check of the address the node advertised itself), `relayed` (node -> the relay it
was reached through, or None; the relay leaves when its own node is done, and the home node
then advertises its own address again),
`unreachable_as_helper` (planned pairings naming a node nobody can dial: must be 0),
`unreachable_as_provisional_helper` (the same for the helper a weak node gets for its
fingerprint: must be 0 too), `lost_updates`, `finished` (node -> bool), `relay_bytes` (what
went through relays both ways, as the relayed nodes counted it; None without a relay),
`relay_bytes_served` (the same as each volunteer node counted it), `relay_rtt_ms` (the median round trip the home
node measured to its relay: the latency the detour adds to each exchange), `helpers` (owner ->
every helper it was given), `advertised` (the address the swarm dialled at the end).

Needs root, `ip` and `iptables`; otherwise `unavailable()` says why and the script exits 0
after printing it (the test skips).

    .venv/bin/python scenarios/nat.py --workdir /tmp/atlas-nat --json nat.json   # as root
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO_ROOT = Path(__file__).resolve().parents[1]
BOOT_IP, OPEN_IP, ROUTER_IP, ROUTER_HOME_IP, HOME_IP = "10.77.0.1", "10.77.0.3", "10.77.0.2", "10.78.0.1", "10.78.0.2"
BOOT_PORT = 5555
RELAY_PORT = 7100  # open-strong's --relay: the firewall would open 7100..7104
NODES = {  # name -> (namespace role, --bind, --advertise or None, --memory)
    "open-strong": ("open", "0.0.0.0:7000", f"{OPEN_IP}:7000", "32MB"),
    "home": ("home", "0.0.0.0:7000", None, "32MB"),
    "open-weak": ("open", "0.0.0.0:7001", f"{OPEN_IP}:7001", "3MB"),
}


def unavailable() -> str | None:
    """Why the namespaces cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iptables: apt-get install iptables)"
    probe = f"atlasprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"this machine does not allow network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Network:
    """The four namespaces and their wires (module doc); `close()` deletes them all."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns = {role: f"atlas-{role}-{tag}" for role in ("boot", "open", "nat", "home")}
        self._tag = tag

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def _in(self, role: str, *args: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns[role], *args], check=True, capture_output=True, text=True)

    def build(self) -> Network:
        t = self._tag
        for name in self.ns.values():
            self._ip("netns", "add", name)
        for role in self.ns:
            self._in(role, "ip", "link", "set", "lo", "up")
        self._in("nat", "ip", "link", "add", "br0", "type", "bridge")
        self._in("nat", "ip", "addr", "add", f"{ROUTER_IP}/24", "dev", "br0")
        self._in("nat", "ip", "link", "set", "br0", "up")
        for role, ip in (("boot", BOOT_IP), ("open", OPEN_IP)):  # the public side: one bridge
            here, there = f"ab{role[0]}{t}", f"ar{role[0]}{t}"
            self._ip("link", "add", here, "type", "veth", "peer", "name", there)
            self._ip("link", "set", here, "netns", self.ns[role])
            self._ip("link", "set", there, "netns", self.ns["nat"])
            self._in(role, "ip", "addr", "add", f"{ip}/24", "dev", here)
            self._in(role, "ip", "link", "set", here, "up")
            self._in("nat", "ip", "link", "set", there, "master", "br0")
            self._in("nat", "ip", "link", "set", there, "up")
        home, router = f"abh{t}", f"arh{t}"  # the home side, behind the masquerade
        self._ip("link", "add", home, "type", "veth", "peer", "name", router)
        self._ip("link", "set", home, "netns", self.ns["home"])
        self._ip("link", "set", router, "netns", self.ns["nat"])
        self._in("home", "ip", "addr", "add", f"{HOME_IP}/24", "dev", home)
        self._in("home", "ip", "link", "set", home, "up")
        self._in("home", "ip", "route", "add", "default", "via", ROUTER_HOME_IP)
        self._in("nat", "ip", "addr", "add", f"{ROUTER_HOME_IP}/24", "dev", router)
        self._in("nat", "ip", "link", "set", router, "up")
        self._in("nat", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        self._in(
            "nat", "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.78.0.0/24", "-o", "br0", "-j", "MASQUERADE"
        )
        return self

    def close(self) -> None:
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def __enter__(self) -> Network:
        try:
            return self.build()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def _spawn(net: Network, role: str, name: str, args: list[str], workdir: Path) -> subprocess.Popen[bytes]:
    """`atlas-node ARGS` inside namespace `role` (scenarios.swarm.Swarm starts its children on
    127.0.0.1 and reads the bootstrap's address from its state; here the addresses are fixed)."""
    from scenarios.swarm import die_with_parent

    log = (workdir / "logs" / f"{name}.log").open("wb")
    cmd = ["ip", "netns", "exec", net.ns[role], sys.executable, "-m", "tools.cli", "--log-level", "info", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,
        preexec_fn=die_with_parent,  # scenarios.swarm's rule: no child outlives a killed scenario
    )


def _rows(table: Path) -> list[dict[str, Any]]:
    try:
        with sqlite3.connect(f"file:{table}?mode=ro", uri=True, timeout=1.0) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM peers")]
    except sqlite3.Error:
        return []


RELAY_VIA = ("peer", "bootstrap", "none")


class _Watch:
    """What the peer table showed over the run: the first verdict on each node's own address,
    and every (owner, helper, planned) pairing."""

    def __init__(self, table: Path) -> None:
        self.table = table
        self.direct: dict[int, bool] = {}  # node -> the check of the address it advertised itself
        self.paired: set[tuple[int, int, bool]] = set()  # (owner, helper, planned: in a cluster)
        self.via: dict[int, str] = {}  # node -> the first relay it was reached through

    def look(self) -> list[dict[str, Any]]:
        rows = _rows(self.table)
        for r in rows:
            if r.get("helper") is not None:
                self.paired.add((r["id"], r["helper"], r.get("cluster") is not None))
            if r.get("reachable") is not None and not r.get("via"):
                self.direct.setdefault(r["id"], bool(r["reachable"]))
            if r.get("via"):
                self.via.setdefault(r["id"], r["via"])
        return rows

    def wait_relayed(self, procs: dict[str, subprocess.Popen[bytes]], workdir: Path, timeout_s: float = 60.0) -> None:
        """Until a row says its node is dialled back through a relay."""
        deadline = time.time() + timeout_s
        while not any(r.get("via") and r.get("reachable") for r in self.look()):
            if time.time() > deadline or any(p.poll() is not None for p in procs.values()):
                raise RuntimeError(f"the home node was not reached through its relay: logs in {workdir / 'logs'}")
            time.sleep(0.2)


def run(workdir: Path, rounds: int = 3, timeout_s: float = 300.0, relay_via: str = "peer") -> dict[str, Any]:
    """Build the network, run the swarm to the end, return the JSON's dict (module doc).
    `relay_via`: who volunteers as the relay (open-strong, the bootstrap, or nobody)."""
    if relay_via not in RELAY_VIA:
        raise ValueError(f"relay_via must be one of {RELAY_VIA}, got {relay_via!r}")
    from atlas_p2p.synthetic import write_synthetic_jsonl
    from tools import report

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    boot_state = workdir / "boot"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    started = time.time()
    with Network() as net:
        try:
            procs["bootstrap"] = _spawn(
                net,
                "boot",
                "bootstrap",
                ["bootstrap", "--bind", f"0.0.0.0:{BOOT_PORT}", "--state", str(boot_state), "--model", "tiny-gpt2"]
                + ["--task", "seq_cls", "--num-labels", "4", "--min-nodes", "3", "--clusters", "1"]
                + ["--heartbeat-s", "0.5"]
                + (["--relay", str(RELAY_PORT)] if relay_via == "bootstrap" else []),
                workdir,
            )
            token = boot_state / "join-token"
            deadline = time.time() + 60
            while not token.exists():
                if time.time() > deadline or procs["bootstrap"].poll() is not None:
                    raise RuntimeError(f"the bootstrap did not start: see {workdir / 'logs' / 'bootstrap.log'}")
                time.sleep(0.1)
            watch = _Watch(boot_state / "peers.sqlite3")
            for i, (name, (role, bind, advertise, memory)) in enumerate(NODES.items()):
                if name == "open-weak" and relay_via != "none":
                    # the swarm trains once all three have joined (--min-nodes 3): the last one
                    # comes once the home node is reached through its relay, so that it trains
                    # through it from the first step (a real run is long enough not to need this)
                    watch.wait_relayed(procs, workdir)
                data = write_synthetic_jsonl(workdir / f"{name}.jsonl", 0, 48, seed=i)
                args = ["join", "--bootstrap", f"{BOOT_IP}:{BOOT_PORT}", "--token", f"@{token}", "--bind", bind]
                args += ["--advertise", advertise] if advertise else []
                args += ["--memory", memory, "--bandwidth", "50Mbps", "--data", str(data), "--out", str(workdir / name)]
                args += ["--rounds", str(rounds), "--local-steps", "2", "--batch-size", "8", "--max-seq-len", "16"]
                args += ["--merge", "gossip"]  # every member pushes to every member: the home node's inbound
                args += ["--relay", str(RELAY_PORT)] if (name == "open-strong" and relay_via == "peer") else []
                procs[name] = _spawn(net, role, name, args, workdir)
            deadline = time.time() + timeout_s
            while any(procs[n].poll() is None for n in NODES):
                if time.time() > deadline:
                    raise RuntimeError(f"the swarm did not finish in {timeout_s:g} s: logs in {workdir / 'logs'}")
                watch.look()
                time.sleep(0.5)
            rows = {r["id"]: r for r in watch.look()}
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs.values():
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    ids = {name: json.loads((workdir / name / "node.json").read_text())["node_id"] for name in NODES}
    runs = [report.read_node_dir(workdir / name) for name in NODES]
    by_id = {v: k for k, v in ids.items()}
    direct, paired = watch.direct, watch.paired
    closed = {n for n, ok in direct.items() if not ok}
    served = [r.summary.relay.get("served") for r in runs if r.summary.relay.get("served")]
    used = {r.name: r.summary.relay.get("used") for r in runs}
    return {
        "reachable": {name: direct.get(ids[name]) for name in NODES},
        "relayed": {name: watch.via.get(ids[name]) for name in NODES},
        # pairings naming a node nobody can dial: planned ones, and provisional ones (the helper a
        # weak node gets for its fingerprint); both must be 0: no node hosts before its check
        "unreachable_as_helper": sum(1 for _, h, planned in paired if planned and h in closed),
        "unreachable_as_provisional_helper": sum(1 for _, h, planned in paired if not planned and h in closed),
        "lost_updates": len(report.lost_updates(runs)),
        "relay_bytes": sum(u["bytes_in"] + u["bytes_out"] for u in used.values() if u) if any(used.values()) else None,
        "relay_bytes_served": [s["bytes"] for s in served],
        "relay_rtt_ms": {name: u["rtt_ms_median"] for name, u in used.items() if u},
        "finished": {r.name: bool(r.finished) for r in runs},
        "exit_codes": {name: procs[name].returncode for name in NODES},
        "helpers": {
            by_id[o]: sorted({by_id.get(h, str(h)) for o2, h, _ in paired if o2 == o})
            for o in {o for o, _, _ in paired}
        },
        "advertised": {name: rows[ids[name]]["address"] for name in NODES},
        "rounds": rounds,
        "wall_s": round(time.time() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/nat"))
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--relay-via", choices=RELAY_VIA, default="peer", help="who volunteers as the home node's relay"
    )
    args = parser.parse_args(argv)
    why = unavailable()
    if why is not None:
        print(f"skipped: {why}")
        return 0
    result = run(args.workdir, args.rounds, relay_via=args.relay_via)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    ok = result["unreachable_as_helper"] == 0 and result["lost_updates"] == 0 and all(result["finished"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
