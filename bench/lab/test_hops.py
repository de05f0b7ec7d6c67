#!/usr/bin/env python3
"""Tests of hops.py on captures written here, with known timestamps: bare echoes on
Ethernet and on a TUN (raw IP), inside flannel's UDP encapsulation and inside VXLAN.

    python3 bench/lab/test_hops.py
"""

import os
import struct
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hops  # noqa: E402


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


def ipv4(src, dst, protocol, payload):
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45, 0, 20 + len(payload), 1, 0x4000, 64, protocol, 0,
        bytes(src), bytes(dst),
    )
    header = header[:10] + struct.pack(">H", checksum(header)) + header[12:]
    return header + payload


def echo(kind, ident, seq):
    icmp_type = hops.ECHO_REQUEST if kind == "request" else hops.ECHO_REPLY
    src, dst = ([10, 1, 1, 2], [10, 1, 2, 2])
    if kind == "reply":
        src, dst = dst, src
    body = struct.pack(">BBHHH", icmp_type, 0, 0, ident, seq) + b"x" * 56
    return ipv4(src, dst, 1, body)


def udp(sport, dport, payload):
    return ipv4([198, 18, 0, 1], [198, 18, 0, 2], 17,
                struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload)


def ethernet(packet):
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + packet


def vxlan(packet):
    return ethernet(udp(40000, hops.VXLAN_PORT, b"\x08\0\0\0\0\0\x01\0" + ethernet(packet)))


def flannel(packet):
    return ethernet(udp(hops.FLANNEL_UDP_PORT, hops.FLANNEL_UDP_PORT, packet))


def write_pcap(path, linktype, records, nano=True):
    magic = hops.PCAP_MAGIC_NANO if nano else hops.PCAP_MAGIC_MICRO
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, 65535, linktype))
        for ts_ns, frame in records:
            frac = ts_ns % 1_000_000_000 if nano else (ts_ns % 1_000_000_000) // 1000
            f.write(struct.pack("<IIII", ts_ns // 1_000_000_000, frac, len(frame), len(frame)))
            f.write(frame)


class Hops(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()

    def tearDown(self):
        self.dir.cleanup()

    def path(self, name):
        return os.path.join(self.dir.name, name)

    def test_echoes_are_found_bare_and_encapsulated(self):
        packet = echo("request", 7, 3)
        self.assertEqual(hops.find_echo(packet), ("request", 7, 3))
        self.assertEqual(hops.find_echo(udp(8285, 8285, packet)), ("request", 7, 3))
        inner = hops.ip_payload(hops.LINKTYPE_ETHERNET, vxlan(echo("reply", 7, 4)))
        self.assertEqual(hops.find_echo(inner), ("reply", 7, 4))
        self.assertIsNone(hops.find_echo(udp(53, 5353, packet)))
        self.assertIsNone(hops.find_echo(b"\x45garbage"))
        self.assertIsNone(hops.find_echo(b""))

    def test_hops_tile_the_round_trip(self):
        # Three points: container (Ethernet), TUN (raw IP), underlay (flannel's UDP).
        # Echo n's request leaves c1 at base, reaches the TUN 30 µs later, the underlay 50 µs
        # after that; the reply comes back 100, 120, 130 µs after base.
        c1, tun, underlay = [], [], []
        for seq in range(1, 11):
            base = 1_000_000_000 * seq + 123_000
            c1 += [(base, ethernet(echo("request", 9, seq))),
                   (base + 130_000 + seq, ethernet(echo("reply", 9, seq)))]
            tun += [(base + 30_000, echo("request", 9, seq)),
                    (base + 120_000, echo("reply", 9, seq))]
            underlay += [(base + 80_000, flannel(echo("request", 9, seq))),
                         (base + 100_000, flannel(echo("reply", 9, seq)))]
        # An echo seen at one point only is left out.
        c1.append((99_000_000_000, ethernet(echo("request", 9, 500))))
        write_pcap(self.path("c1.pcap"), hops.LINKTYPE_ETHERNET, c1)
        write_pcap(self.path("tun.pcap"), hops.LINKTYPE_RAW, tun, nano=False)
        write_pcap(self.path("u.pcap"), hops.LINKTYPE_ETHERNET, underlay)
        points = [(name, hops.echo_times(self.path(f)))
                  for name, f in (("c1", "c1.pcap"), ("tun", "tun.pcap"), ("u", "u.pcap"))]
        legs, samples, totals = hops.hops(points)
        self.assertEqual([leg[:3] for leg in legs], [
            ("request", "c1", "tun"), ("request", "tun", "u"), ("turn", "u", "u"),
            ("reply", "u", "tun"), ("reply", "tun", "c1"),
        ])
        self.assertEqual(len(totals), 10)
        medians = {leg[:3]: hops.summarize(samples[leg[:3]])["median"] for leg in legs}
        self.assertAlmostEqual(medians[("request", "c1", "tun")], 30.0, places=3)
        self.assertAlmostEqual(medians[("request", "tun", "u")], 50.0, places=3)
        self.assertAlmostEqual(medians[("turn", "u", "u")], 20.0, places=3)
        self.assertAlmostEqual(medians[("reply", "u", "tun")], 20.0, places=3)
        self.assertAlmostEqual(medians[("reply", "tun", "c1")], 10.0055, places=3)
        for i, total in enumerate(totals):
            per_hop = sum(samples[leg[:3]][i] for leg in legs)
            self.assertAlmostEqual(per_hop, total, places=6)

    def test_a_file_that_is_not_a_capture_is_refused(self):
        with open(self.path("junk"), "wb") as f:
            f.write(b"not a pcap file at all, but long enough")
        with self.assertRaises(ValueError):
            hops.echo_times(self.path("junk"))


if __name__ == "__main__":
    unittest.main()
