#!/usr/bin/env python3
"""Turn whole-machine perf samples taken during a TCP transfer into CPU time per 64 KiB
moved, by kind of work.

    cpu_profile.py table --mode weft=weft.report:8.43 --mode vxlan=vxlan.report:12.7 \\
        --seconds 6 --cpus 2 [--json OUT]

Each report is the text of `perf report --stdio --no-children --sort comm,dso,sym -g none
--percent-limit 0` over `perf record -a` for `--seconds`; the number after the colon is the
Gbit/s the transfer moved meanwhile. A sample is put in one bucket by its function (self time);
the buckets are coarse on purpose: they say where a mode spends what another does not.
"""

import argparse
import json
import os
import re
import sys

SUPER_PACKET = 65536

# (bucket, test on (comm, dso, symbol)), first match wins.
BUCKETS = [
    ("idle", lambda c, d, s: "safe_halt" in s or s.startswith(("default_idle", "cpuidle", "poll_idle"))),
    ("copies", lambda c, d, s: s.startswith(("_copy_from_iter", "_copy_to_iter", "copy_user", "rep_movs"))
     or ("kernel" in d and "memcpy" in s)),
    ("user-space checksums", lambda c, d, s: "kernel" not in d and "checksum" in s),
    ("other user space", lambda c, d, s: "kernel" not in d),
    ("scheduling, wake-ups, interrupts", lambda c, d, s: re.search(
        r"finish_task_switch|schedule|try_to_wake_up|ttwu|_raw_spin_unlock_irq|pick_next|"
        r"enqueue_|dequeue_|update_curr|select_task|__switch_to|switch_mm|sched_", s)),
    ("system calls (entry, exit, polling, fd and iovec handling)", lambda c, d, s: re.search(
        r"do_syscall|entry_SYSCALL|syscall_exit|__x64_sys|__sys_|fdget|fput|__check_object_size|"
        r"import_iovec|iov_iter|sock_poll|do_sys_poll|do_poll|ep_poll|rw_verify|vfs_|ksys_", s)),
    ("skb and page allocation", lambda c, d, s: re.search(
        r"alloc|free|kmem_cache|slab|page_frag|build_skb|skb_release|consume_skb|skb_defer", s)),
    ("network stack and the rest of the kernel", lambda c, d, s: True),
]

LINE = re.compile(r"^\s+([\d.]+)%\s+(\S+)\s+(\S+)\s+\[.\]\s+(.*?)\s*$")


def bucket(comm, dso, symbol):
    for name, test in BUCKETS:
        if test(comm, dso, symbol):
            return name
    raise AssertionError("the last bucket takes everything")


def parse_report(text):
    """{bucket: percent of all samples}, {process group: percent}."""
    buckets, processes = {}, {}
    for line in text.splitlines():
        match = LINE.match(line)
        if not match:
            continue
        percent = float(match.group(1))
        comm, dso, symbol = match.group(2), match.group(3), match.group(4)
        name = bucket(comm, dso, symbol)
        buckets[name] = buckets.get(name, 0.0) + percent
        if name == "idle":
            group = "idle"
        elif comm.startswith(("weft-worker", "weftd")):
            group = "weftd"
        elif comm.startswith("flanneld"):
            group = "flanneld"
        elif comm == "iperf3":
            group = "iperf3"
        else:
            group = "other"
        processes[group] = processes.get(group, 0.0) + percent
    return buckets, processes


def per_super_packet(buckets, gbits, seconds, cpus):
    """µs of CPU per 64 KiB moved, by bucket (idle left out)."""
    moved = gbits * 1e9 / 8 * seconds / SUPER_PACKET
    scale = cpus * seconds * 1e6 / moved / 100
    return {name: pct * scale for name, pct in buckets.items() if name != "idle"}


def cmd_table(args):
    modes = []
    for spec in args.mode:
        name, _, rest = spec.partition("=")
        path, _, gbits = rest.rpartition(":")
        if not name or not path or not gbits:
            sys.exit(f"--mode wants NAME=REPORT:GBITS, got {spec!r}")
        with open(path) as f:
            buckets, processes = parse_report(f.read())
        if not buckets:
            sys.exit(f"{path}: no samples in the report")
        costs = per_super_packet(buckets, float(gbits), args.seconds, args.cpus)
        modes.append({"mode": name, "gbits": float(gbits), "busy_percent": 100 - buckets.get("idle", 0.0),
                      "us_per_64k": costs, "processes_percent": processes})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(modes, f, indent=2)
    names = [name for name, _ in BUCKETS if name != "idle"]
    header = " | ".join(m["mode"] for m in modes)
    print(f"| CPU per 64 KiB moved (µs) | {header} |")
    print("|---|" + "---:|" * len(modes))
    for name in names:
        cells = " | ".join(f"{m['us_per_64k'].get(name, 0.0):.1f}" for m in modes)
        print(f"| {name} | {cells} |")
    totals = " | ".join(f"**{sum(m['us_per_64k'].values()):.1f}**" for m in modes)
    print(f"| **total** | {totals} |")
    gbits = " | ".join(f"{m['gbits']:.2f}" for m in modes)
    busy = " | ".join(f"{m['busy_percent']:.0f}" for m in modes)
    print(f"| Gbit/s during the profile | {gbits} |")
    print(f"| machine busy (%) | {busy} |")
    groups = sorted({g for m in modes for g in m["processes_percent"]} - {"idle"})
    for group in groups:
        cells = " | ".join(f"{m['processes_percent'].get(group, 0.0):.0f}" for m in modes)
        print(f"| {group} (% of the machine) | {cells} |")
    return 0


PATHS = ("tun_rx", "udp_tx", "udp_rx", "tun_tx")
METRIC = re.compile(r'^(weft_packets_total|weft_io_operations_total)\{path="(\w+)"\} (\d+)$')


def read_threads(path):
    """{(host, thread name): CPU ticks}; threads of one name on one host are summed."""
    ticks = {}
    with open(path) as f:
        for line in f:
            host, *name, value = line.split()
            key = (host, " ".join(name))
            ticks[key] = ticks.get(key, 0) + int(value)
    return ticks


def read_metrics(path):
    """{(metric, path): value} of the per-path packet and operation counters."""
    values = {}
    try:
        with open(path) as f:
            for line in f:
                match = METRIC.match(line.strip())
                if match:
                    values[(match.group(1), match.group(2))] = int(match.group(3))
    except FileNotFoundError:
        pass
    return values


def cmd_daemon(args):
    """Each daemon thread's share of one CPU, and packets per operation on each path, over the
    sampled window."""
    hz = os.sysconf("SC_CLK_TCK")
    before, after = read_threads(args.before + ".threads"), read_threads(args.after + ".threads")
    print("| host | thread | % of one CPU |")
    print("|---|---|---:|")
    for key in sorted(after):
        used = (after[key] - before.get(key, 0)) / hz / args.seconds * 100
        print(f"| h{key[0]} | {key[1]} | {used:.0f} |")
    print()
    print("| host | " + " | ".join(f"{p}: packets, per operation" for p in PATHS) + " |")
    print("|---|" + "---:|" * len(PATHS))
    for host in ("1", "2"):
        m0, m1 = read_metrics(f"{args.before}.h{host}.prom"), read_metrics(f"{args.after}.h{host}.prom")
        if not m1:
            continue
        cells = []
        for path in PATHS:
            packets = m1.get(("weft_packets_total", path), 0) - m0.get(("weft_packets_total", path), 0)
            ops = m1.get(("weft_io_operations_total", path), 0) - m0.get(("weft_io_operations_total", path), 0)
            cells.append(f"{packets}, {packets / ops:.1f}" if ops else f"{packets}, -")
        print(f"| h{host} | " + " | ".join(cells) + " |")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table")
    table.add_argument("--mode", action="append", default=[], help="NAME=REPORT:GBITS")
    table.add_argument("--seconds", type=float, required=True)
    table.add_argument("--cpus", type=int, required=True)
    table.add_argument("--json")
    daemon = sub.add_parser("daemon")
    daemon.add_argument("--before", required=True, help="snapshot prefix before sampling")
    daemon.add_argument("--after", required=True, help="snapshot prefix after sampling")
    daemon.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    if args.command == "daemon":
        return cmd_daemon(args)
    return cmd_table(args)


if __name__ == "__main__":
    sys.exit(main())
