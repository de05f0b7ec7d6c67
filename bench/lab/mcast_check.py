#!/usr/bin/env python3
"""End-to-end checks of multicast and broadcast across weft hosts, on a lab brought up with
`lab.sh up --json` (its JSON is the first argument). Prints one "PASS: ..." or "FAIL: ..." line
per check (bench/lab/test.sh counts them) and exits 1 if any failed.

  mcast_check.py on LAB.json     a lab with --multicast --broadcast on every host, 3 hosts with
                                 2 containers each: groups reach exactly their members, once;
                                 leaves stop the traffic; mDNS and broadcast reach every host,
                                 the Network's broadcast address every container but the sender;
                                 a storm is rate-limited and counted; iperf 2 multicast.
  mcast_check.py off LAB.json    a default lab: nothing crosses, the drops are counted.
  mcast_check.py plain LAB.json  host 1 with --multicast, host 2 without: host 2 gets nothing.
"""
import atexit
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
MCAST_PY = os.path.join(HERE, "mcast.py")
ETCD = "http://198.18.0.1:2379"
RECORDS = "/weft.io/coreos.com/network/hosts/"
METRICS = "http://127.0.0.1:8286/metrics"
# The broadcast address of lab.sh's Network, 10.1.0.0/16.
NETWORK_BROADCAST = "10.1.255.255"

FAILED = []
# Every process started here, stopped on exit whatever happens.
PROCS = []


@atexit.register
def stop_all():
    for proc in PROCS:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(cmd, **kwargs):
    proc = subprocess.Popen(cmd, **kwargs)
    PROCS.append(proc)
    return proc


def check(ok, what, detail=""):
    print(f"{'PASS' if ok else 'FAIL'}: {what}" + (f" ({detail})" if detail and not ok else ""), flush=True)
    if not ok:
        FAILED.append(what)


def enter(ns):
    return ["ip", "netns", "exec", ns]


class Lab:
    def __init__(self, path):
        self.lab = json.load(open(path))
        self.hosts = self.lab["hosts"]

    def host_ns(self, n):
        return self.hosts[n - 1]["namespace"]

    def container(self, n, j=1):
        return self.hosts[n - 1]["containers"][j - 1]

    def records(self):
        """The host records in etcd, by key name, as read from host 1."""
        out = subprocess.run(enter(self.host_ns(1)) + ["etcdctl", "--endpoints", ETCD, "get", "--prefix", RECORDS,
                                                       "-w", "json"],
                             capture_output=True, text=True, env=dict(os.environ, ETCDCTL_API="3")).stdout
        import base64
        kvs = json.loads(out or "{}").get("kvs", [])
        return {base64.b64decode(kv["key"]).decode()[len(RECORDS):]: json.loads(base64.b64decode(kv["value"]))
                for kv in kvs}

    def groups_of(self, n):
        subnet = self.hosts[n - 1]["subnet"].replace("/", "-")
        return self.records().get(subnet, {}).get("MulticastGroups")

    def wait_groups(self, n, ok, timeout=15):
        """Wait until host n's record's groups satisfy ok; then a moment for the peers' watches."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            groups = self.groups_of(n)
            if groups is not None and ok(groups):
                time.sleep(0.5)
                return True
            time.sleep(0.2)
        return False

    def metrics(self, n):
        code = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"
        out = subprocess.run(enter(self.host_ns(n)) + ["python3", "-c", code, METRICS], capture_output=True,
                             text=True).stdout
        values = {}
        for line in out.splitlines():
            m = re.match(r'^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+]+)$', line)
            if m:
                values[m.group(1)] = float(m.group(2))
        return values


class Receiver:
    """mcast.py recv in a container, until stopped."""

    def __init__(self, lab, n, j, group, port):
        self.proc = start(enter(lab.container(n, j)["namespace"]) +
                                     ["python3", MCAST_PY, "recv", group, str(port), "120"],
                                     stdout=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline()
        assert first.strip() == "joined", first

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        out = self.proc.communicate(timeout=10)[0]
        return [line for line in out.splitlines() if line]


class Capture:
    """tcpdump on a host's underlay device: weft datagrams whose inner destination is `inner`
    (an address, or 'multicast' for 224.0.0.0/4 and broadcast)."""

    def __init__(self, lab, n, inner):
        host = lab.hosts[n - 1]
        if inner == "multicast":
            inner_filter = "(udp[24] >= 224 or udp[24:4] = 0xffffffff)"
        else:
            inner_filter = "udp[24:4] = 0x%08x" % int.from_bytes(bytes(int(x) for x in inner.split(".")), "big")
        self.proc = start(enter(host["namespace"]) +
                                     ["tcpdump", "-i", host["underlay_dev"], "-n", "-l", "--immediate-mode",
                                      f"udp dst port 8285 and {inner_filter}"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = ""
        while "listening" not in line:
            line = self.proc.stderr.readline()
            assert line, "tcpdump did not start"

    def stop(self):
        time.sleep(0.5)
        self.proc.send_signal(signal.SIGINT)
        out = self.proc.communicate(timeout=10)[0]
        return len([line for line in out.splitlines() if line])


def send(lab, n, j, group, port, count, rate=200, tag="weft"):
    start = time.monotonic()
    subprocess.run(enter(lab.container(n, j)["namespace"]) +
                   ["python3", MCAST_PY, "send", group, str(port), str(count), "--ttl", "1", "--rate", str(rate),
                    "--tag", tag], check=True)
    return time.monotonic() - start


def copies(lines, tag):
    """How many datagrams with `tag` arrived, and how many distinct ones."""
    got = [line.split(" ", 1)[1] for line in lines if f" {tag}-" in line]
    return len(got), len(set(got))


def check_on(lab):
    g1, g2 = "239.1.1.1", "239.2.2.2"
    # c2 and c3 join g1, c1-2 (the sender's neighbour) joins g1, c2-2 joins g2.
    r2 = Receiver(lab, 2, 1, g1, 5000)
    r3 = Receiver(lab, 3, 1, g1, 5000)
    r1b = Receiver(lab, 1, 2, g1, 5000)
    r2b = Receiver(lab, 2, 2, g2, 5002)
    joined = lab.wait_groups(2, lambda g: g1 in g and g2 in g) and lab.wait_groups(3, lambda g: g1 in g)
    check(joined, "the joins reach etcd: host 2's record lists 239.1.1.1 and 239.2.2.2, host 3's 239.1.1.1",
          json.dumps(lab.records()))
    caps = [Capture(lab, 2, g1), Capture(lab, 3, g1), Capture(lab, 3, g2)]
    send(lab, 1, 1, g1, 5000, 20, tag="g1")
    send(lab, 1, 1, g2, 5002, 20, tag="g2")
    under2, under3, under3_g2 = (c.stop() for c in caps)
    got2, got3, got1b, got2b = (r.stop() for r in (r2, r3, r1b, r2b))
    for who, lines, group, tag in (("c2 (host 2)", got2, g1, "g1"), ("c3 (host 3)", got3, g1, "g1"),
                                   ("c1-2, the sender's neighbour on host 1", got1b, g1, "g1"),
                                   ("c2-2 (host 2)", got2b, g2, "g2")):
        total, distinct = copies(lines, tag)
        check(total == 20 and distinct == 20, f"TTL 1 to {group}: {who} receives each of 20 datagrams exactly once",
              f"{total} received, {distinct} distinct")
    check(under2 == 20 and under3 == 20, "host 2's and host 3's underlays carry exactly 20 datagrams for 239.1.1.1",
          f"{under2}, {under3}")
    check(under3_g2 == 0, "host 3, without members of 239.2.2.2, receives none on its underlay", f"{under3_g2}")

    # A leave: c3 stops listening (its kernel sends the IGMP leave); traffic to host 3 stops.
    r2 = Receiver(lab, 2, 1, g1, 5000)
    r3 = Receiver(lab, 3, 1, g1, 5000)
    lab.wait_groups(3, lambda g: g1 in g)
    r3.stop()
    left = lab.wait_groups(3, lambda g: g1 not in g)
    check(left, "a leave reaches etcd: host 3's record no longer lists 239.1.1.1", json.dumps(lab.records()))
    caps = [Capture(lab, 2, g1), Capture(lab, 3, g1)]
    send(lab, 1, 1, g1, 5000, 20, tag="after-leave")
    under2, under3 = (c.stop() for c in caps)
    total, _ = copies(r2.stop(), "after-leave")
    check(under3 == 0 and under2 == 20 and total == 20,
          "after host 3's leave: nothing for 239.1.1.1 on its underlay, host 2 still gets all 20",
          f"host 3 underlay {under3}, host 2 underlay {under2}, c2 received {total}")

    # Link-local: mDNS reaches every host without any join being advertised.
    rs = [Receiver(lab, n, 1, "224.0.0.251", 5353) for n in (2, 3)]
    send(lab, 1, 1, "224.0.0.251", 5353, 10, tag="mdns")
    for n, r in zip((2, 3), rs):
        total, distinct = copies(r.stop(), "mdns")
        check(total == 10 and distinct == 10, f"224.0.0.251:5353 reaches c{n} (host {n}) exactly once each",
              f"{total} received")

    # Broadcast.
    rs = [Receiver(lab, n, 1, "255.255.255.255", 5001) for n in (2, 3)]
    send(lab, 1, 1, "255.255.255.255", 5001, 10, tag="bcast")
    for n, r in zip((2, 3), rs):
        total, distinct = copies(r.stop(), "bcast")
        check(total == 10 and distinct == 10, f"broadcast to 255.255.255.255 reaches c{n} (host {n}) exactly once each",
              f"{total} received")

    # The Network's broadcast address: host 1 routes it into the TUN; weftd carries it as
    # 255.255.255.255 to every container of hosts 2 and 3 and to the sender's neighbour, once
    # each; the sender's own kernel drops the copy from its own address.
    rs = {(n, j): Receiver(lab, n, j, NETWORK_BROADCAST, 5003) for n in (1, 2, 3) for j in (1, 2)}
    caps = [Capture(lab, n, "255.255.255.255") for n in (2, 3)]
    before = lab.metrics(1)
    send(lab, 1, 1, NETWORK_BROADCAST, 5003, 10, tag="netbcast")
    under2, under3 = (c.stop() for c in caps)
    after = lab.metrics(1)
    for (n, j), r in rs.items():
        total, distinct = copies(r.stop(), "netbcast")
        who = f"c{n}-{j} (host {n})"
        if (n, j) == (1, 1):
            check(total == 0, f"to {NETWORK_BROADCAST}: the sender {who} gets no copy of its own", f"{total} received")
        else:
            check(total == 10 and distinct == 10,
                  f"UDP to the Network's broadcast address {NETWORK_BROADCAST} reaches {who} exactly once each",
                  f"{total} received, {distinct} distinct")
    check(under2 == 10 and under3 == 10,
          f"host 2's and host 3's underlays carry exactly 10 datagrams for {NETWORK_BROADCAST}, as 255.255.255.255",
          f"{under2}, {under3}")
    no_route = after.get('weft_drops_total{reason="no_route"}', 0) - before.get('weft_drops_total{reason="no_route"}', 0)
    check(no_route == 0, f"with --broadcast, host 1's weftd no longer drops {NETWORK_BROADCAST} as no_route",
          f"{no_route:.0f} no_route drops")

    # A storm: as fast as the sender can to a group with a member; the relay's token bucket
    # (10000 copies/s, bursts of 1000) holds it, and the excess is counted.
    r2 = Receiver(lab, 2, 1, g1, 5000)
    lab.wait_groups(2, lambda g: g1 in g)
    before = lab.metrics(1)
    seconds = send(lab, 1, 1, g1, 5000, 40000, rate=0, tag="storm")
    time.sleep(1)
    after = lab.metrics(1)
    got, _ = copies(r2.stop(), "storm")
    key_r = 'weft_multicast_packets_total{event="replicated"}'
    key_d = 'weft_multicast_drops_total{reason="rate_limited"}'
    replicated = after.get(key_r, 0) - before.get(key_r, 0)
    limited = after.get(key_d, 0) - before.get(key_d, 0)
    bound = 10000 * (seconds + 1) + 1000
    check(limited > 0 and replicated <= bound and got <= replicated,
          f"a storm of 40000 datagrams in {seconds:.2f} s is rate-limited: {replicated:.0f} replicated, "
          f"{limited:.0f} counted as rate_limited, {got} received",
          f"bound {bound:.0f}")
    time.sleep(1.5)  # let the bucket fill again

    # iperf 2, a real multicast application: one sender on host 1, receivers on hosts 2 and 3.
    servers = [start(enter(lab.container(n)["namespace"]) +
                                ["iperf", "-s", "-u", "-B", g1, "-i", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (2, 3)]
    lab.wait_groups(2, lambda g: g1 in g) and lab.wait_groups(3, lambda g: g1 in g)
    client = subprocess.run(enter(lab.container(1)["namespace"]) +
                            ["iperf", "-c", g1, "-u", "-T", "1", "-t", "3", "-b", "10M", "-l", "1200"],
                            capture_output=True, text=True)
    time.sleep(1)
    for n, server in zip((2, 3), servers):
        server.send_signal(signal.SIGTERM)
        out = server.communicate(timeout=10)[0]
        # The summary: "[  3]  0.0- 3.0 sec  3.58 MBytes  10.0 Mbits/sec   0.010 ms    0/ 3125 (0%)"
        totals = re.findall(r"0\.0+-\s*[0-9.]+ sec\s+([0-9.]+ \w?Bytes)\s+([0-9.]+ \w?bits/sec).*?(\d+)/\s*(\d+) \(([0-9.e+-]+)%\)",
                            out)
        if totals:
            size, rate, lost, total, pct = totals[-1]
            check(int(total) > 0 and float(pct) < 5,
                  f"iperf 2 multicast c1 -> 239.1.1.1 -> c{n} (host {n}), 3 s at 10 Mbit/s: {size}, {rate}, "
                  f"lost {lost}/{total} ({pct}%)")
        else:
            check(False, f"iperf 2 multicast reaches c{n} (host {n})", out[-600:] + client.stdout[-300:])


def group_features(record):
    """What a host record says about multicast and broadcast: capabilities and groups."""
    caps = {"multicast", "broadcast"} & set(record.get("Capabilities", []))
    return sorted(caps) + record.get("MulticastGroups", [])


def check_off(lab):
    r2 = Receiver(lab, 2, 1, "239.1.1.1", 5000)
    rb = Receiver(lab, 2, 2, "255.255.255.255", 5001)
    cap = Capture(lab, 2, "multicast")
    before = lab.metrics(1)
    send(lab, 1, 1, "239.1.1.1", 5000, 10, tag="off")
    send(lab, 1, 1, "255.255.255.255", 5001, 10, tag="off")
    # The overlay Network's broadcast address is routed into the TUN like any overlay address.
    send(lab, 1, 1, NETWORK_BROADCAST, 5001, 10, tag="off")
    under = cap.stop()
    got = copies(r2.stop(), "off")[0] + copies(rb.stop(), "off")[0]
    after = lab.metrics(1)
    # Multicast and 255.255.255.255 stay on the sender's bridge (no TAP, the host does not
    # forward them); the Network's broadcast address is routed into the TUN, where weftd drops
    # it as an address no lease holds (answering net unreachable, as flanneld does).
    keys = ['weft_drops_total{reason="multicast"}', 'weft_drops_total{reason="no_route"}']
    dropped = sum(after.get(k, 0) - before.get(k, 0) for k in keys)
    check(under == 0 and got == 0, "default lab: no multicast or broadcast crosses to host 2",
          f"underlay {under}, received {got}")
    check(dropped >= 10, f"default lab: weftd counts the 10 datagrams to the Network's broadcast address "
          f"10.1.255.255 as drops ({dropped:.0f} multicast + no_route)",
          json.dumps({k: v for k, v in after.items() if "drops" in k}))
    check('weft_multicast_packets_total{event="replicated"}' not in after,
          "default lab: weftd runs no multicast relay (no weft_multicast_* metrics)")
    # A default weftd writes a record for what is on by default (partial inner checksums, the
    # GSO check between weft hosts), but never a multicast or broadcast capability or a group.
    records = lab.records()
    check(not any(group_features(r) for r in records.values()),
          "default lab: no record under /weft.io offers multicast or broadcast or lists a group",
          json.dumps(records))


def check_plain(lab):
    records = lab.records()
    check(sum(1 for r in records.values() if "multicast" in r.get("Capabilities", [])) == 1,
          "only the host with --multicast offers multicast in its record", json.dumps(records))
    rs = [Receiver(lab, 2, 1, "239.1.1.1", 5000), Receiver(lab, 2, 1, "224.0.0.251", 5353)]
    time.sleep(2)
    cap = Capture(lab, 2, "multicast")
    send(lab, 1, 1, "239.1.1.1", 5000, 10, tag="plain")
    send(lab, 1, 1, "224.0.0.251", 5353, 10, tag="plain")
    under = cap.stop()
    got = sum(copies(r.stop(), "plain")[0] for r in rs)
    check(under == 0 and got == 0, "a peer without --multicast receives no multicast, not even mDNS",
          f"underlay {under}, received {got}")


def main():
    mode, path = sys.argv[1], sys.argv[2]
    lab = Lab(path)
    {"on": check_on, "off": check_off, "plain": check_plain}[mode](lab)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
