#!/usr/bin/env python3
"""Split ping round trips into hops from packet captures taken along the path.

Each capture point is a pcap file (nanosecond timestamps, as written by
`tcpdump --time-stamp-precision=nano -w FILE`) named in the order the echo request
passes it. The same echo (ICMP id and sequence number) is found at every point, bare or
inside the overlay's encapsulation (UDP to port 8285, flannel's udp backend; or VXLAN on
port 8472), and the time between consecutive points is one hop. The echo reply passes the
points in reverse order.

    hops.py table --point c1=c1.pcap --point h1-tun=h1-tun.pcap ... [--json OUT]

Every capture runs on the same machine, so the timestamps share one clock.
"""

import argparse
import json
import statistics
import struct
import sys

PCAP_MAGIC_NANO = 0xA1B23C4D
PCAP_MAGIC_MICRO = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276

FLANNEL_UDP_PORT = 8285
VXLAN_PORT = 8472

ECHO_REPLY = 0
ECHO_REQUEST = 8


def read_pcap(path):
    """Yield (timestamp in ns, link type, frame bytes) for every record of a pcap file."""
    with open(path, "rb") as f:
        header = f.read(24)
        if len(header) < 24:
            return
        magic_le = struct.unpack("<I", header[:4])[0]
        magic_be = struct.unpack(">I", header[:4])[0]
        if magic_le in (PCAP_MAGIC_NANO, PCAP_MAGIC_MICRO):
            endian, magic = "<", magic_le
        elif magic_be in (PCAP_MAGIC_NANO, PCAP_MAGIC_MICRO):
            endian, magic = ">", magic_be
        else:
            raise ValueError(f"{path}: not a pcap file")
        scale = 1 if magic == PCAP_MAGIC_NANO else 1000
        linktype = struct.unpack(endian + "I", header[20:24])[0] & 0x0FFFFFFF
        while True:
            record = f.read(16)
            if len(record) < 16:
                return
            sec, frac, caplen, _ = struct.unpack(endian + "IIII", record)
            data = f.read(caplen)
            if len(data) < caplen:
                return
            yield sec * 1_000_000_000 + frac * scale, linktype, data


def ip_payload(linktype, frame):
    """The IPv4 packet a frame carries, or None."""
    if linktype == LINKTYPE_RAW:
        return frame
    if linktype == LINKTYPE_ETHERNET:
        offset = 12
    elif linktype == LINKTYPE_LINUX_SLL:
        offset = 14
    elif linktype == LINKTYPE_LINUX_SLL2:
        offset = 0
    else:
        return None
    if linktype == LINKTYPE_LINUX_SLL2:
        if len(frame) < 20 or frame[0:2] != b"\x08\x00":
            return None
        return frame[20:]
    if len(frame) < offset + 2 or frame[offset : offset + 2] != b"\x08\x00":
        return None
    return frame[offset + 2 :]


def find_echo(packet, depth=0):
    """(kind, id, seq) of the ICMP echo in an IPv4 packet, looking inside flannel's UDP
    encapsulation and VXLAN; None when there is none."""
    if depth > 2 or len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    protocol = packet[9]
    body = packet[ihl:]
    if protocol == 1:
        if len(body) < 8 or body[0] not in (ECHO_REQUEST, ECHO_REPLY):
            return None
        ident, seq = struct.unpack(">HH", body[4:8])
        return ("request" if body[0] == ECHO_REQUEST else "reply", ident, seq)
    if protocol == 17 and len(body) >= 8:
        sport, dport = struct.unpack(">HH", body[0:4])
        if FLANNEL_UDP_PORT in (sport, dport):
            return find_echo(body[8:], depth + 1)
        if VXLAN_PORT in (sport, dport) and len(body) >= 8 + 8 + 14:
            inner = ip_payload(LINKTYPE_ETHERNET, body[16:])
            return find_echo(inner, depth + 1) if inner else None
    return None


def echo_times(path):
    """{(kind, id, seq): first timestamp seen} for one capture point."""
    seen = {}
    for ts, linktype, frame in read_pcap(path):
        packet = ip_payload(linktype, frame)
        echo = find_echo(packet) if packet else None
        if echo is not None and echo not in seen:
            seen[echo] = ts
    return seen


def hops(points):
    """Per-hop samples in µs, in path order: the request through the points, then the reply
    back through them in reverse. `points` is a list of (name, {echo: ts})."""
    names = [name for name, _ in points]
    legs = [("request", names[i], names[i + 1], i, i + 1) for i in range(len(names) - 1)]
    legs.append(("turn", names[-1], names[-1], len(names) - 1, len(names) - 1))
    legs += [
        ("reply", names[i + 1], names[i], i + 1, i) for i in reversed(range(len(names) - 1))
    ]
    requests = {key[1:] for _, times in points for key in times if key[0] == "request"}
    samples = {leg[:3]: [] for leg in legs}
    totals = []
    for ident in sorted(requests):
        stamps = []
        for kind, _, _, a, b in legs:
            a_kind = "reply" if kind == "reply" else "request"
            b_kind = "request" if kind == "request" else "reply"
            ta = points[a][1].get((a_kind, *ident))
            tb = points[b][1].get((b_kind, *ident))
            stamps.append((ta, tb))
        if any(ta is None or tb is None for ta, tb in stamps):
            continue
        for leg, (ta, tb) in zip(legs, stamps):
            samples[leg[:3]].append((tb - ta) / 1000)
        first = points[0][1][("request", *ident)]
        last = points[0][1][("reply", *ident)]
        totals.append((last - first) / 1000)
    return legs, samples, totals


def summarize(values):
    if not values:
        return None
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "mean": statistics.fmean(ordered),
        "p10": ordered[len(ordered) // 10],
        "p90": ordered[(len(ordered) * 9) // 10],
    }


def cmd_table(args):
    points = []
    for spec in args.point:
        name, sep, path = spec.partition("=")
        if not sep:
            sys.exit(f"--point wants NAME=FILE, got {spec!r}")
        points.append((name, echo_times(path)))
    if len(points) < 2:
        sys.exit("at least two --point captures are needed")
    legs, samples, totals = hops(points)
    result = {
        "pings": len(totals),
        "hops": [
            {"direction": kind, "from": a, "to": b, "us": summarize(samples[(kind, a, b)])}
            for kind, a, b, _, _ in legs
        ],
        "total_us": summarize(totals),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    title = args.title or "hops"
    print(f"### {title}: {result['pings']} round trips seen at every point\n")
    print("| leg | hop | median µs | mean µs | p10–p90 µs |")
    print("|---|---|---:|---:|---|")
    for hop in result["hops"]:
        stats = hop["us"]
        if stats is None:
            continue
        label = f"{hop['from']} → {hop['to']}" if hop["direction"] != "turn" else hop["to"]
        print(
            f"| {hop['direction']} | {label} | {stats['median']:.1f} | {stats['mean']:.1f} "
            f"| {stats['p10']:.1f}–{stats['p90']:.1f} |"
        )
    total = result["total_us"]
    if total:
        print(
            f"| **total** | at {points[0][0]} | **{total['median']:.1f}** | {total['mean']:.1f} "
            f"| {total['p10']:.1f}–{total['p90']:.1f} |"
        )
    return 0 if result["pings"] else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="print the per-hop table")
    table.add_argument("--point", action="append", default=[], help="NAME=FILE, in path order")
    table.add_argument("--json", help="also write the numbers as JSON")
    table.add_argument("--title")
    args = parser.parse_args()
    return cmd_table(args)


if __name__ == "__main__":
    sys.exit(main())
