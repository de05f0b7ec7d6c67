#!/usr/bin/env python3
"""Send and receive IPv4 multicast and broadcast datagrams, for the lab's demo and tests.

  mcast.py recv GROUP PORT SECONDS   join GROUP (or, for an address that is not multicast, such as
                                     255.255.255.255, just listen on PORT)
                                     and print one line per datagram received: "<source> <payload>";
                                     leaving (the kernel's IGMP leave) happens when it exits.
  mcast.py send GROUP PORT COUNT [--ttl N] [--rate PPS] [--tag TEXT]
                                     send COUNT datagrams "TEXT-<i>" with IP_MULTICAST_TTL N
                                     (default 1, the kernel's default), as broadcast to
                                     255.255.255.255, or to any other address as it is.
"""
import argparse
import socket
import struct
import sys
import time


def recv(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("", args.port))
    if 224 <= int(args.group.split(".")[0]) <= 239:
        mreq = struct.pack("4s4s", socket.inet_aton(args.group), socket.inet_aton("0.0.0.0"))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    print("joined", flush=True)
    end = time.monotonic() + args.seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            data, (src, _) = sock.recvfrom(65535)
        except socket.timeout:
            break
        print(src, data.decode(errors="replace"), flush=True)


def send(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if args.group == "255.255.255.255":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, args.ttl)
    gap = 1.0 / args.rate if args.rate > 0 else 0
    for i in range(args.count):
        sock.sendto(f"{args.tag}-{i}".encode(), (args.group, args.port))
        if gap:
            time.sleep(gap)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("group")
    r.add_argument("port", type=int)
    r.add_argument("seconds", type=float)
    s = sub.add_parser("send")
    s.add_argument("group")
    s.add_argument("port", type=int)
    s.add_argument("count", type=int)
    s.add_argument("--ttl", type=int, default=1)
    s.add_argument("--rate", type=float, default=100)
    s.add_argument("--tag", default="weft")
    args = parser.parse_args()
    recv(args) if args.cmd == "recv" else send(args)


if __name__ == "__main__":
    sys.exit(main())
