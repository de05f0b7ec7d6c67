#!/usr/bin/env python3
"""Records and reports for the weft lab benchmark (bench/lab/lab.sh bench).

  report.py meta --out FILE ...          write the run's description (machine, options)
  report.py record --out FILE ...        parse one round of one mode (ping text, iperf3 JSON, CPU
                                          ticks) and append it as one JSON line
  report.py summarize DIR                read DIR/meta.json and DIR/raw.jsonl; write
                                          DIR/results.json, DIR/summary.md and DIR/chart.svg

Standard library only.
"""

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
from xml.sax.saxutils import escape

# Metrics in report order: key, label, unit, whether higher is better.
METRICS = [
    ("tcp1_gbps", "TCP 1 stream", "Gbit/s", True),
    ("tcp4_gbps", "TCP 4 streams", "Gbit/s", True),
    ("tcp1_gbit_per_cpu_s", "TCP 1 stream per CPU-second", "Gbit/CPU-s", True),
    ("tcp4_gbit_per_cpu_s", "TCP 4 streams per CPU-second", "Gbit/CPU-s", True),
    ("rtt_avg_us", "ping RTT avg", "µs", False),
    ("rtt_mdev_us", "ping RTT mdev", "µs", False),
    ("ping_loss_pct", "ping loss", "%", False),
    ("tcp1_retransmits", "TCP 1 stream retransmits", "", False),
    ("tcp4_retransmits", "TCP 4 streams retransmits", "", False),
    ("udp_gbps", "UDP received", "Gbit/s", True),
    ("udp_loss_pct", "UDP loss", "%", False),
    ("udp_gbit_per_cpu_s", "UDP per CPU-second", "Gbit/CPU-s", True),
    ("tcp1_cpu_s", "machine CPU-s, TCP 1 stream", "s", False),
    ("tcp1_daemon_cpu_s", "daemon CPU-s, TCP 1 stream", "s", False),
    ("tcp4_daemon_cpu_s", "daemon CPU-s, TCP 4 streams", "s", False),
    ("rr_udp_p50_us", "UDP request/response RTT median", "µs", False),
    ("rr_udp_p99_us", "UDP request/response RTT p99", "µs", False),
    ("rr_tcp_p50_us", "TCP request/response RTT median", "µs", False),
    ("rr_tcp_p99_us", "TCP request/response RTT p99", "µs", False),
    ("udp64_kpps", "UDP 64 B at full rate, received", "kpps", True),
    ("udp64_loss_pct", "UDP 64 B at full rate, loss", "%", False),
    ("tcp1_us_per_64k", "CPU per 64 KiB moved, TCP 1 stream", "µs", False),
]

# The floor of a TUN/UDP engine's cost: kernel VXLAN's CPU per 64 KiB moved plus this many cold
# 64 KiB copies (TUN read, UDP send, UDP receive, TUN write), which VXLAN never makes.
FLOOR_COPIES = 4
KIB64_GBIT = 64 * 1024 * 8 / 1e9

# The chart's panels.
CHART = ["tcp1_gbps", "tcp4_gbps", "tcp1_gbit_per_cpu_s", "rtt_avg_us"]

MODE_ORDER = ["weft", "encrypted", "flannel", "wireguard-go", "vxlan", "direct"]
MODE_COLOUR = {
    "weft": "#d9622b",
    "encrypted": "#8e3b9e",
    "flannel": "#8a8a8a",
    "wireguard-go": "#c9a227",
    "vxlan": "#3b75af",
    "direct": "#519e3e",
}
MODE_LABEL = {
    "weft": "weft",
    "encrypted": "weft encrypted",
    "wireguard-go": "wireguard-go",
    "flannel": "flannel udp",
    "vxlan": "kernel VXLAN",
    "direct": "direct routing",
}


class ReportError(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# Parsing


def parse_ping(path):
    """RTT avg/mdev in µs and loss in % from `ping -q` output."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    loss = re.search(r"([\d.]+)% packet loss", text)
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", text)
    if loss is None:
        raise ReportError(f"{path}: no ping summary")
    out = {"ping_loss_pct": float(loss.group(1)), "rtt_avg_us": None, "rtt_mdev_us": None}
    if rtt is not None:
        out["rtt_avg_us"] = float(rtt.group(2)) * 1000.0
        out["rtt_mdev_us"] = float(rtt.group(4)) * 1000.0
    return out


def load_iperf(path):
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: not iperf3 JSON: {e}") from e
    if doc.get("error"):
        raise ReportError(f"{path}: iperf3 reported: {doc['error']}")
    end = doc.get("end")
    if not isinstance(end, dict):
        raise ReportError(f"{path}: no 'end' section")
    return end


def parse_tcp(path):
    end = load_iperf(path)
    recv = end.get("sum_received") or {}
    sent = end.get("sum_sent") or {}
    if "bytes" not in recv or "seconds" not in recv:
        raise ReportError(f"{path}: no sum_received")
    return {
        "bytes": recv["bytes"],
        "gbps": recv["bits_per_second"] / 1e9,
        "retransmits": sent.get("retransmits"),
    }


def parse_udp(path):
    end = load_iperf(path)
    # iperf3 >= 3.13 reports the receiver side as sum_received; older releases only "sum", whose
    # packet counts come from the receiver.
    s = end.get("sum_received") or end.get("sum") or {}
    if "bytes" not in s or "lost_percent" not in end.get("sum", s):
        raise ReportError(f"{path}: no UDP sum")
    total = end.get("sum", s)
    loss = float(total.get("lost_percent", 0.0))
    if "sum_received" in end:
        rbytes = s["bytes"]
    else:
        # Received bytes = sent bytes less the lost share.
        rbytes = s["bytes"] * (1.0 - loss / 100.0)
    seconds = s.get("seconds") or 1.0
    return {"bytes": rbytes, "gbps": rbytes * 8 / seconds / 1e9, "loss_pct": loss}


def parse_udp_rate(path):
    """Packets received per second and loss from iperf3 UDP JSON (datagrams of one size)."""
    end = load_iperf(path)
    s = end.get("sum") or {}
    if "packets" not in s or "lost_packets" not in s or not s.get("seconds"):
        raise ReportError(f"{path}: no UDP packet counts")
    received = s["packets"] - s["lost_packets"]
    loss = 100.0 * s["lost_packets"] / s["packets"] if s["packets"] else None
    return {"pps": received / s["seconds"], "loss_pct": loss}


def parse_sockperf(path):
    """Round-trip median, p99 and mean in µs from `sockperf ping-pong --full-rtt` output.

    Without --full-rtt sockperf prints half the round trip ("Latency is"); only round trips are
    accepted here, so that the tables always mean the full round trip.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if "Summary: Latency is" in text:
        raise ReportError(f"{path}: one-way latency (sockperf without --full-rtt)")
    avg = re.search(r"Summary: Round trip is ([\d.]+) usec", text)
    p50 = re.search(r"percentile 50\.000 =\s*([\d.]+)", text)
    p99 = re.search(r"percentile 99\.000 =\s*([\d.]+)", text)
    if not (avg and p50 and p99):
        raise ReportError(f"{path}: no sockperf round-trip summary")
    return {"avg_us": float(avg.group(1)), "p50_us": float(p50.group(1)), "p99_us": float(p99.group(1))}


def per_cpu(bytes_, cpu_s):
    if not cpu_s:
        return None
    return bytes_ * 8 / 1e9 / cpu_s


def cmd_record(a):
    tck = float(a.clk_tck)
    rec = {
        "mode": a.mode,
        "round": int(a.round),
        "busy_before": float(a.busy_before) if a.busy_before else None,
        "quiet": a.quiet == "1",
    }
    rec.update(parse_ping(a.ping))
    for name, path, cpu, daemon in (
        ("tcp1", a.tcp1, a.tcp1_cpu, a.tcp1_daemon),
        ("tcp4", a.tcp4, a.tcp4_cpu, a.tcp4_daemon),
        ("udp", a.udp, a.udp_cpu, a.udp_daemon),
    ):
        r = parse_tcp(path) if name != "udp" else parse_udp(path)
        cpu_s = int(cpu) / tck
        rec[f"{name}_gbps"] = r["gbps"]
        rec[f"{name}_cpu_s"] = cpu_s
        rec[f"{name}_daemon_cpu_s"] = int(daemon) / tck if a.has_daemon == "1" else None
        rec[f"{name}_gbit_per_cpu_s"] = per_cpu(r["bytes"], cpu_s)
        if name == "udp":
            rec["udp_loss_pct"] = r["loss_pct"]
        else:
            rec[f"{name}_retransmits"] = r["retransmits"]
        if name == "tcp1":
            rec["tcp1_us_per_64k"] = cpu_s / r["bytes"] * 64 * 1024 * 1e6 if r["bytes"] else None
    if a.udp64:
        r = parse_udp_rate(a.udp64)
        rec["udp64_kpps"] = r["pps"] / 1e3
        rec["udp64_loss_pct"] = r["loss_pct"]
        rec["udp64_cpu_s"] = int(a.udp64_cpu) / tck
        rec["udp64_daemon_cpu_s"] = int(a.udp64_daemon) / tck if a.has_daemon == "1" else None
    for proto, path in (("udp", a.rr_udp), ("tcp", a.rr_tcp)):
        if path:
            r = parse_sockperf(path)
            for k, v in r.items():
                rec[f"rr_{proto}_{k}"] = v
    with open(a.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cmd_meta(a):
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "modes": [m for m in a.modes.split(",") if m],
        "rounds": int(a.rounds),
        "duration_s": int(a.duration),
        "pings": int(a.pings),
        "udp_rate": a.udp_rate,
        "udp_len": int(a.udp_len),
        "rr_seconds": int(a.rr_seconds) if a.rr_seconds else None,
        "weftd_workers": a.workers or None,
        "weftd_io": a.io or None,
        "weftd_version": a.weftd_version or None,
        "iperf3": a.iperf3_version,
        "sockperf": a.sockperf_version or None,
        "git": a.git,
    }
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# Summaries


def summarize(records, modes):
    summary = {}
    for key, _, _, _ in METRICS:
        per_mode = {}
        for mode in modes:
            vals = [r[key] for r in records if r["mode"] == mode and r.get(key) is not None]
            if vals:
                per_mode[mode] = {
                    "median": statistics.median(vals),
                    "min": min(vals),
                    "max": max(vals),
                    "n": len(vals),
                }
        summary[key] = per_mode
    return summary


def ratio_pairs(modes):
    """Which ratios to show: weft against every reference; without weft, vxlan against direct."""
    if "weft" in modes or "encrypted" in modes:
        pairs = [("weft", m) for m in ("vxlan", "direct", "flannel") if "weft" in modes and m in modes]
        if "encrypted" in modes:
            pairs += [("encrypted", m) for m in ("weft", "wireguard-go") if m in modes]
        return pairs
    if "vxlan" in modes and "direct" in modes:
        return [("vxlan", "direct")]
    return []


def floor_of(copy, summary, modes):
    """The floor of a TUN/UDP engine from the copy measurement and VXLAN's median CPU per 64 KiB
    moved in the TCP 1-stream tests, and weft against it and the kernel modes; None without them.
    """
    vxlan = summary.get("tcp1_us_per_64k", {}).get("vxlan")
    if copy is None or vxlan is None:
        return None
    floor_us = vxlan["median"] + FLOOR_COPIES * copy["cold_us"]
    floor = {
        "copy_64k_cold_us": copy["cold_us"],
        "copy_64k_warm_us": copy["warm_us"],
        "copies": FLOOR_COPIES,
        "vxlan_us_per_64k": vxlan["median"],
        "us_per_64k": floor_us,
        "gbit_per_cpu_s": KIB64_GBIT / (floor_us / 1e6),
        "ratios": {},
    }
    per_cpu_s = summary.get("tcp1_gbit_per_cpu_s", {})
    weft = per_cpu_s.get("weft")
    if weft is not None:
        floor["ratios"]["weft/floor"] = weft["median"] / floor["gbit_per_cpu_s"]
        for m in ("vxlan", "direct"):
            if m in per_cpu_s and per_cpu_s[m]["median"]:
                floor["ratios"][f"weft/{m}"] = weft["median"] / per_cpu_s[m]["median"]
    return floor


def floor_markdown(floor, summary, modes):
    lines = ["## The floor of a TUN/UDP engine", ""]
    lines.append(
        f"Kernel VXLAN's CPU per 64 KiB moved (TCP 1 stream, median) {fmt(floor['vxlan_us_per_64k'], 'µs')} µs "
        f"+ {floor['copies']} cold 64 KiB copies of {fmt(floor['copy_64k_cold_us'], 'µs')} µs each "
        f"(warm: {fmt(floor['copy_64k_warm_us'], 'µs')} µs; measured once at the start of the run) "
        f"= {fmt(floor['us_per_64k'], 'µs')} µs per 64 KiB."
    )
    lines.append("")
    row = summary.get("tcp1_gbit_per_cpu_s", {})
    shown = [m for m in modes if m in row]
    ratios = list(floor["ratios"])
    head = ["TCP 1 stream per CPU-second (Gbit/CPU-s)"] + [MODE_LABEL.get(m, m) for m in shown]
    head += ["floor"] + ratios
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    cells = ["median"] + [fmt(row[m]["median"], "Gbit/CPU-s") for m in shown]
    cells += [fmt(floor["gbit_per_cpu_s"], "Gbit/CPU-s")] + [f"{floor['ratios'][r]:.2f}" for r in ratios]
    lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def fmt(v, unit=""):
    if v is None:
        return "–"
    if unit == "":
        return f"{v:.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def markdown(meta, summary, modes, pairs, records, floor=None):
    lines = []
    lines.append(f"# weft lab benchmark, {meta.get('date', '')}")
    lines.append("")
    lines.append(
        f"Machine: {meta.get('cpu')} ({meta.get('cpus')} CPUs), Linux {meta.get('kernel')}; "
        f"{meta.get('iperf3')}; weftd: {meta.get('weftd_version') or 'n/a'}; git {meta.get('git')}."
    )
    opts = [
        f"{meta.get('rounds')} round(s), modes interleaved",
        f"{meta.get('duration_s')} s per iperf3 test",
        f"{meta.get('pings')} pings at 10 ms",
        f"UDP at {meta.get('udp_rate')}bit/s with {meta.get('udp_len')}-byte datagrams",
    ]
    if any("udp64_kpps" in r for r in records):
        opts.append("64-byte UDP at full rate (iperf3 -b 0)")
    if any("rr_udp_p50_us" in r or "rr_tcp_p50_us" in r for r in records):
        opts.append(
            f"request/response: sockperf ping-pong, 64 bytes, {meta.get('rr_seconds')} s each, round trips"
        )
    if meta.get("weftd_workers"):
        opts.append(f"weftd --workers {meta['weftd_workers']}")
    if meta.get("weftd_io"):
        opts.append(f"weftd --io {meta['weftd_io']}")
    lines.append("Run: " + "; ".join(opts) + ".")
    noisy = sum(1 for r in records if not r.get("quiet", True))
    if noisy:
        lines.append("")
        lines.append(
            f"**{noisy} of {len(records)} measurements started on a busy machine** "
            "(the quiet-machine wait timed out); treat CPU figures with care."
        )
    lines.append("")
    lines.append("Cells: median [min–max] over the rounds. CPU-seconds are the whole machine's.")
    lines.append("")
    head = ["metric"] + [MODE_LABEL.get(m, m) for m in modes] + [f"{a}/{b}" for a, b in pairs]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for key, label, unit, _ in METRICS:
        row = summary.get(key, {})
        if not row:
            continue
        cells = [f"{label}" + (f" ({unit})" if unit else "")]
        for m in modes:
            s = row.get(m)
            if s is None:
                cells.append("–")
            elif s["n"] == 1:
                cells.append(fmt(s["median"], unit))
            else:
                cells.append(f"{fmt(s['median'], unit)} [{fmt(s['min'], unit)}–{fmt(s['max'], unit)}]")
        for a, b in pairs:
            sa, sb = row.get(a), row.get(b)
            if sa and sb and sb["median"]:
                cells.append(f"{sa['median'] / sb['median']:.2f}")
            else:
                cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if floor is not None:
        lines.append(floor_markdown(floor, summary, modes))
    return "\n".join(lines)


def nice_axis(v):
    """A round step and axis maximum (at most 5 steps) covering 0..v."""
    if v <= 0:
        return 0.25, 1.0
    raw = v / 5
    exp = 10.0 ** math.floor(math.log10(raw))
    step = next(m * exp for m in (1, 2, 2.5, 5, 10) if m * exp >= raw)
    return step, step * math.ceil(v / step - 1e-9)


def tick_label(v, step):
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step < 1 else 0
    if step >= 1 and step != int(step):
        decimals = 1
    return f"{v:.{decimals}f}"


def svg_chart(meta, summary, modes):
    panel_w, panel_h = 360, 250
    cols = 2
    rows = (len(CHART) + cols - 1) // cols
    top = 70
    width = cols * panel_w + 40
    height = top + rows * panel_h + 40
    out = []
    out.append(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">'
    )
    out.append(f'<rect width="{width}" height="{height}" fill="#ffffff"/>')
    title = f"weft lab: {', '.join(MODE_LABEL.get(m, m) for m in modes)}"
    out.append(f'<text x="20" y="28" font-size="18" font-weight="bold">{escape(title)}</text>')
    sub = (
        f"{meta.get('date', '')} · {meta.get('cpu', '')} ({meta.get('cpus')} CPUs) · "
        f"Linux {meta.get('kernel', '')} · median of {meta.get('rounds')} round(s), bars show min–max"
    )
    out.append(f'<text x="20" y="50" font-size="11" fill="#444">{escape(sub)}</text>')
    metric_info = {k: (label, unit, hib) for k, label, unit, hib in METRICS}
    for idx, key in enumerate(CHART):
        label, unit, higher = metric_info[key]
        px = 20 + (idx % cols) * panel_w
        py = top + (idx // cols) * panel_h
        row = summary.get(key, {})
        out.append(f'<g transform="translate({px},{py})">')
        better = "higher is better" if higher else "lower is better"
        out.append(
            f'<text x="0" y="14" font-size="13" font-weight="bold">{escape(label)} ({escape(unit)})</text>'
        )
        out.append(f'<text x="0" y="29" font-size="11" fill="#666">{better}</text>')
        plot_x, plot_y, plot_w, plot_h = 50, 48, panel_w - 80, panel_h - 93
        vmax = max([s["max"] for s in row.values()] or [0])
        step, axis_max = nice_axis(vmax * 1.1)
        ticks = int(round(axis_max / step))
        for t in range(ticks + 1):
            v = step * t
            y = plot_y + plot_h - plot_h * t / ticks
            out.append(
                f'<line x1="{plot_x}" y1="{y:.1f}" x2="{plot_x + plot_w}" y2="{y:.1f}" '
                f'stroke="#e3e3e3" stroke-width="1"/>'
            )
            out.append(
                f'<text x="{plot_x - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end" '
                f'fill="#555">{escape(tick_label(v, step))}</text>'
            )
        out.append(
            f'<line x1="{plot_x}" y1="{plot_y + plot_h}" x2="{plot_x + plot_w}" '
            f'y2="{plot_y + plot_h}" stroke="#333" stroke-width="1"/>'
        )
        n = max(len(modes), 1)
        slot = plot_w / n
        bar_w = min(56, slot * 0.6)
        for i, m in enumerate(modes):
            cx = plot_x + slot * (i + 0.5)
            s = row.get(m)
            out.append(
                f'<text x="{cx:.1f}" y="{plot_y + plot_h + 16}" font-size="11" '
                f'text-anchor="middle">{escape(MODE_LABEL.get(m, m))}</text>'
            )
            if s is None:
                out.append(
                    f'<text x="{cx:.1f}" y="{plot_y + plot_h - 6}" font-size="10" '
                    f'text-anchor="middle" fill="#888">n/a</text>'
                )
                continue

            def ypos(v):
                return plot_y + plot_h - plot_h * (v / axis_max)

            y = ypos(s["median"])
            out.append(
                f'<rect x="{cx - bar_w / 2:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
                f'height="{plot_y + plot_h - y:.1f}" fill="{MODE_COLOUR.get(m, "#777")}"/>'
            )
            if s["n"] > 1:
                y0, y1 = ypos(s["min"]), ypos(s["max"])
                out.append(
                    f'<line x1="{cx:.1f}" y1="{y0:.1f}" x2="{cx:.1f}" y2="{y1:.1f}" '
                    f'stroke="#222" stroke-width="1.2"/>'
                )
                for yy in (y0, y1):
                    out.append(
                        f'<line x1="{cx - 6:.1f}" y1="{yy:.1f}" x2="{cx + 6:.1f}" y2="{yy:.1f}" '
                        f'stroke="#222" stroke-width="1.2"/>'
                    )
            label_y = min(y, ypos(s["max"])) - 8
            out.append(
                f'<text x="{cx:.1f}" y="{label_y:.1f}" font-size="11" text-anchor="middle" '
                f'font-weight="bold">{escape(fmt(s["median"], unit))}</text>'
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def cmd_summarize(a):
    d = a.dir
    try:
        with open(os.path.join(d, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ReportError(f"{d}/meta.json: {e}") from e
    records = []
    with open(os.path.join(d, "raw.jsonl"), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise ReportError(f"{d}/raw.jsonl line {n}: {e}") from e
    if not records:
        raise ReportError(f"{d}/raw.jsonl holds no measurements")
    present = {r["mode"] for r in records}
    modes = [m for m in MODE_ORDER if m in present] + sorted(present - set(MODE_ORDER))
    summary = summarize(records, modes)
    pairs = ratio_pairs(modes)
    ratios = {}
    for key, _, _, _ in METRICS:
        row = summary.get(key, {})
        for x, y in pairs:
            if x in row and y in row and row[y]["median"]:
                ratios.setdefault(key, {})[f"{x}/{y}"] = row[x]["median"] / row[y]["median"]
    copy = None
    copy_path = os.path.join(d, "copy_cost.json")
    if os.path.exists(copy_path):
        try:
            with open(copy_path, encoding="utf-8") as f:
                copy = json.load(f)
        except (OSError, ValueError) as e:
            raise ReportError(f"{copy_path}: {e}") from e
        if not isinstance(copy, dict) or not all(
            isinstance(copy.get(k), (int, float)) and copy[k] > 0 for k in ("cold_us", "warm_us")
        ):
            raise ReportError(f"{copy_path}: no positive cold_us and warm_us")
    floor = floor_of(copy, summary, modes)
    results = {
        "meta": meta,
        "copy_cost": copy,
        "floor": floor,
        "metrics": {k: {"label": l, "unit": u, "higher_is_better": h} for k, l, u, h in METRICS},
        "summary": summary,
        "ratios": ratios,
        "records": records,
    }
    with open(os.path.join(d, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    md = markdown(meta, summary, modes, pairs, records, floor)
    with open(os.path.join(d, "summary.md"), "w", encoding="utf-8") as f:
        f.write(md)
    with open(os.path.join(d, "chart.svg"), "w", encoding="utf-8") as f:
        f.write(svg_chart(meta, summary, modes))
    sys.stdout.write(md)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("meta")
    m.add_argument("--out", required=True)
    for opt in ("modes", "rounds", "duration", "pings", "udp-rate", "udp-len"):
        m.add_argument(f"--{opt}", required=True)
    for opt in ("workers", "io", "weftd-version", "iperf3-version", "sockperf-version", "rr-seconds", "git"):
        m.add_argument(f"--{opt}", default="")

    r = sub.add_parser("record")
    for opt in ("out", "mode", "round", "clk-tck", "ping", "has-daemon"):
        r.add_argument(f"--{opt}", required=True)
    r.add_argument("--busy-before", default="")
    r.add_argument("--quiet", default="1")
    for t in ("tcp1", "tcp4", "udp"):
        r.add_argument(f"--{t}", required=True)
        r.add_argument(f"--{t}-cpu", required=True)
        r.add_argument(f"--{t}-daemon", required=True)
    r.add_argument("--udp64", default="")
    r.add_argument("--udp64-cpu", default="0")
    r.add_argument("--udp64-daemon", default="0")
    r.add_argument("--rr-udp", default="")
    r.add_argument("--rr-tcp", default="")

    s = sub.add_parser("summarize")
    s.add_argument("dir")

    a = p.parse_args(argv)
    try:
        {"meta": cmd_meta, "record": cmd_record, "summarize": cmd_summarize}[a.cmd](a)
    except ReportError as e:
        print(f"report.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
