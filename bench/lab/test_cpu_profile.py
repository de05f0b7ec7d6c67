#!/usr/bin/env python3
"""Tests of cpu_profile.py: which bucket a sample goes to, and the CPU time per 64 KiB.

    python3 bench/lab/test_cpu_profile.py
"""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_profile as lab_profile  # noqa: E402

REPORT = """\
# Samples: 40K of event 'cpu-clock:ppp'
#
    10.00%  swapper          [kernel.kallsyms]  [k] pv_native_safe_halt
    20.00%  iperf3           [kernel.kallsyms]  [k] _copy_from_iter
    15.00%  weft-worker-1    [kernel.kallsyms]  [k] _copy_to_iter
     5.00%  weft-worker-0    weftd              [.] weft_engine::offload::checksum::sum
     5.00%  weft-worker-0    weftd              [.] weft_engine::decide::from_peer
    10.00%  weft-worker-1    [kernel.kallsyms]  [k] finish_task_switch.isra.0
     5.00%  weft-worker-1    [kernel.kallsyms]  [k] do_syscall_64
     5.00%  iperf3           [kernel.kallsyms]  [k] kmem_cache_alloc_node_noprof
    25.00%  iperf3           [kernel.kallsyms]  [k] tcp_v4_rcv
"""


class Profile(unittest.TestCase):
    def test_samples_go_to_their_buckets(self):
        buckets, processes = lab_profile.parse_report(REPORT)
        self.assertEqual(buckets["idle"], 10.0)
        self.assertEqual(buckets["copies"], 35.0)
        self.assertEqual(buckets["user-space checksums"], 5.0)
        self.assertEqual(buckets["other user space"], 5.0)
        self.assertEqual(buckets["scheduling, wake-ups, interrupts"], 10.0)
        self.assertEqual(buckets["system calls (entry, exit, polling, fd and iovec handling)"], 5.0)
        self.assertEqual(buckets["skb and page allocation"], 5.0)
        self.assertEqual(buckets["network stack and the rest of the kernel"], 25.0)
        self.assertEqual(processes, {"idle": 10.0, "iperf3": 50.0, "weftd": 40.0})

    def test_cpu_time_per_64k(self):
        # 2 CPUs for 1 s fully busy while 8.388608 Gbit/s move: 16 000 times 64 KiB, so
        # 100 % of the samples are 2 s / 16 000 = 125 µs.
        costs = lab_profile.per_super_packet({"copies": 50.0, "idle": 50.0},
                                             8.388608, seconds=1, cpus=2)
        self.assertEqual(set(costs), {"copies"})
        self.assertAlmostEqual(costs["copies"], 62.5, places=6)


if __name__ == "__main__":
    unittest.main()
