"""Load benchmarks (issue 5): our validator against the transport floor and the reference design.

    python benchmarks/run.py [--quick] [--rounds N] [--scenarios throughput,latency,...] [--readme]

For each scenario and each of ``--rounds`` rounds, the three contenders run one
after the other, in an order rotated every round:

* ``ours``: ``bettensor-ws validator`` through the CLI (fresh database per run);
* ``floor``: benchmarks/floor.py, a bare trio-websocket echo server;
* ``baseline``: benchmarks/baseline.py, a validator in the reference design.

``--contenders ours,ours2`` adds a hidden one, never run by default:

* ``ours2``: benchmarks/workers.py, the same validator options on two worker
  processes sharing the port (an upper bound: nothing shared between them);
  its own table compares it with ``ours``, CPU included.

Each run starts its server as a subprocess, waits for its ``listening on`` line,
runs benchmarks/loadgen.py (its own process) against it, and stops it with
SIGTERM. Medians over the rounds go into benchmarks/results/results.md (the
table, also printed), results.json (every raw number) and latency.png. The exit
status is 0 whatever the numbers; the targets missed are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import LISTENING, make_games

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PYTHON = sys.executable
CLI = str(Path(sys.executable).parent / "bettensor-ws")
PROFILE_DIR: Path | None = None
# every process of a run imports the bettensor_ws of this checkout, not whichever the venv
# has installed (an editable install of another worktree, or a release)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
CONTENDERS = ("ours", "floor", "baseline")
HIDDEN = ("ours2",)  # only with --contenders; kept out of the main table and the plot
WORKERS = 2
SCENARIOS = ("throughput", "latency", "batched", "scale", "broadcast", "peak", "gameupdate")
# who runs each scenario: the floor neither stores nor confirms, so it has no game-update peak;
# ours2 only where its numbers mean what they say (its RSS would be one process's, its feed one per worker)
RUNS_IN = {"gameupdate": ("ours", "baseline"), "scale": CONTENDERS, "broadcast": CONTENDERS}
RATES = [250, 500, 1000, 2000, 4000]
LATENCY_AT = 1000
BROADCAST_GAMES = 100
BROADCAST_INTERVAL = 2.0
PEAK_MINERS = 256
PEAK_GAMES = 40
# the game-update peak's miners run in this many processes (benchmarks/swarm.py): each real
# miner is a process of its own; 256 in one process share one GIL, thread pool and collector
PEAK_SWARM_PROCS = 4
HEARTBEAT = 30.0

# loadgen settings per scenario: (full, quick)
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "throughput": (
        {"connections": 8, "inflight": 16, "warmup": 1.0, "duration": 4.0, "frames_per_conn": 5000},
        {"connections": 8, "inflight": 16, "warmup": 0.5, "duration": 2.0, "frames_per_conn": 2000},
    ),
    "latency": (
        {"connections": 8, "rates": RATES, "rate_duration": 2.5},
        {"connections": 8, "rates": RATES, "rate_duration": 1.0},
    ),
    "batched": (
        {"connections": 8, "inflight": 4, "batch_size": 100, "warmup": 1.0, "duration": 4.0,
         "frames_per_conn": 300, "max_extend": 8.0},
        {"connections": 8, "inflight": 4, "batch_size": 100, "warmup": 0.5, "duration": 2.0,
         "frames_per_conn": 120, "max_extend": 5.0},
    ),
    "scale": (
        {"connections": 1000, "wave": 100, "settle": 2.5, "cpu_window": 5.0},
        {"connections": 1000, "wave": 100, "settle": 2.5, "cpu_window": 2.0},
    ),
    "broadcast": (
        {"connections": 256, "wave": 64, "hold": 3 * BROADCAST_INTERVAL + 1.5, "grace": 1.5},
        {"connections": 256, "wave": 64, "hold": BROADCAST_INTERVAL + 1.5, "grace": 1.5},
    ),
    # (a) reference-format miners (no batch): each sends PEAK_GAMES single predictions at once
    "peak": (
        {"connections": PEAK_MINERS, "frames_per_conn": PEAK_GAMES, "features": [], "wave": 64,
         "settle": 1.0, "drain_timeout": 60.0},
        {"connections": PEAK_MINERS, "frames_per_conn": PEAK_GAMES, "features": [], "wave": 64,
         "settle": 1.0, "drain_timeout": 60.0},
    ),
    # (b) our MinerNodes (benchmarks/swarm.py): one update of PEAK_GAMES new games, predicted by all
    "gameupdate": (
        {"connections": PEAK_MINERS, "games": PEAK_GAMES, "settle": 1.0, "timeout": 60.0,
         "procs": PEAK_SWARM_PROCS},
        {"connections": PEAK_MINERS, "games": PEAK_GAMES, "settle": 1.0, "timeout": 60.0,
         "procs": PEAK_SWARM_PROCS},
    ),
}

# (row, unit, scenario, how to read a round's result)
TARGETS = {
    "throughput": "≥ 40% of floor, ≥ 2x baseline",
    "p50": "—",
    "p99": "≤ 5 ms",
    "batched": "≥ 30,000 pred/s",
    "rss": "≤ 64 KiB",
    "cpu": "≤ 3%",
    "broadcast": "≤ 250 ms",
    "peak": "≤ 2,000 ms, ≥ 6x faster than baseline",
    "gameupdate": "≤ 1,000 ms",
}


# --------------------------------------------------------------------------- processes


class Server:
    """One contender's server process, started and stopped around one loadgen run."""

    def __init__(self, contender: str, scenario: str, tmp: Path, tag: str, games_file: Path) -> None:
        self.contender = contender
        self.log_out = tmp / f"{tag}.out"
        self.log_err = tmp / f"{tag}.err"
        db = str(tmp / f"{tag}.db")
        broadcast = scenario == "broadcast"
        if contender == "ours" and scenario == "gameupdate":
            cmd = [PYTHON, str(HERE / "peakvalidator.py"), "--db", db, "--games-per-update", str(PEAK_GAMES),
                   "--rate-limit", "1000000", "--rate-burst", "1000000", "--heartbeat-interval", str(HEARTBEAT)]
        elif contender in ("ours", "ours2"):
            cmd = [
                CLI, "validator", "--host", "127.0.0.1", "--port", "0", "--db", db,
                "--hotkey-uri", "//Alice", "--rate-limit", "1000000", "--rate-burst", "1000000",
                "--heartbeat-interval", str(HEARTBEAT), "--connection-timeout", "300",
            ]
            if broadcast:
                cmd += ["--feed-games", str(BROADCAST_GAMES), "--feed-interval", str(BROADCAST_INTERVAL)]
            else:
                cmd += ["--games", str(games_file)]
            if contender == "ours2":  # the same options, to benchmarks/workers.py
                cmd = [PYTHON, str(HERE / "workers.py"), "--workers", str(WORKERS), *cmd[2:]]
            elif PROFILE_DIR is not None:  # --profile: the same run under pyinstrument
                report = PROFILE_DIR / f"{tag}.txt"
                cmd = [PYTHON, "-m", "pyinstrument", "-r", "text", "-o", str(report),
                       "-m", "bettensor_ws.node.cli", *cmd[1:]]
        elif contender == "floor":
            cmd = [PYTHON, str(HERE / "floor.py")]
            if broadcast:
                cmd += ["--broadcast", str(BROADCAST_GAMES), "--interval", str(BROADCAST_INTERVAL)]
        else:
            cmd = [PYTHON, str(HERE / "baseline.py"), "--db", db]
            if broadcast:
                cmd += ["--broadcast", str(BROADCAST_GAMES), "--interval", str(BROADCAST_INTERVAL)]
            elif scenario == "gameupdate":
                cmd += ["--peak-games", str(PEAK_GAMES)]
            else:
                cmd += ["--games", str(games_file)]
        self.cmd = cmd
        with open(self.log_out, "wb") as out, open(self.log_err, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=tmp, env=ENV)
        self.url = self._wait_listening(30.0)

    def _wait_listening(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_out.read_text(errors="replace")
            match = re.search(LISTENING + r"(ws://\S+)", text)
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"{self.contender} did not start ({self.proc.returncode}): "
            f"{self.log_err.read_text(errors='replace')[-500:]}"
        )

    def stop(self) -> dict[str, Any]:
        """SIGTERM, wait; what the server said on stderr that looks like trouble."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        err = self.log_err.read_text(errors="replace").splitlines()
        notable = [ln for ln in err if re.search(r"ERROR|CRITICAL|Traceback|WARNING|Exception", ln)]
        return {"returncode": self.proc.returncode, "stderr_lines": len(err), "notable": notable[:8],
                "notable_count": len(notable)}


def worker_dbs(path: Path) -> list[Path]:
    """The databases of benchmarks/workers.py given ``--db path``: path.w0, path.w1..."""
    found = [p for p in path.parent.glob(f"{path.name}.w*") if re.fullmatch(r"\.w\d+", p.name[len(path.name):])]
    return sorted(found, key=lambda p: int(p.name[len(path.name) + 2:]))


def stored_predictions(path: Path) -> int | None:
    """Predictions in a stopped server's database (or its workers' together): at least
    as many as were confirmed."""
    parts = worker_dbs(path)
    if parts:
        counts = [stored_predictions(p) for p in parts]
        return None if None in counts else sum(c for c in counts if c is not None)
    import sqlite3

    try:
        db = sqlite3.connect(path)
        try:
            return int(db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return None


def run_loadgen(cfg: dict[str, Any], timeout: float, script: str = "loadgen.py") -> dict[str, Any]:  # noqa: ASYNC109
    try:
        done = subprocess.run(
            [PYTHON, str(HERE / script), "-"], input=json.dumps(cfg), capture_output=True,
            text=True, timeout=timeout, cwd=HERE, env=ENV,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"loadgen timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    try:
        return dict(json.loads(lines[-1]))
    except (IndexError, ValueError):
        return {"ok": False, "error": f"loadgen failed ({done.returncode}): {done.stderr[-500:]}"}


def one_run(
    contender: str, scenario: str, rnd: int, settings: dict[str, Any], tmp: Path, games_file: Path
) -> dict[str, Any]:
    tag = f"{scenario}-r{rnd}-{contender}"
    started = time.monotonic()
    try:
        server = Server(contender, scenario, tmp, tag, games_file)
    except RuntimeError as exc:
        return {"ok": False, "error": str(exc), "seconds": time.monotonic() - started}
    cfg = {
        "scenario": scenario,
        "url": server.url,
        "mode": "echo" if contender == "floor" else "confirm",
        "server_pid": server.proc.pid,
        "games_file": str(games_file),
        "cache": str(tmp / f"frames-{scenario}.pkl"),  # signed once, reused for the scenario
        **settings,
    }
    if scenario == "gameupdate":
        folder = tmp / f"{tag}-miners"
        folder.mkdir()
        cfg["folder"] = str(folder)
    try:
        result = run_loadgen(cfg, timeout=180, script="swarm.py" if scenario == "gameupdate" else "loadgen.py")
    finally:
        result_server = server.stop()
        if scenario == "gameupdate":
            shutil.rmtree(tmp / f"{tag}-miners", ignore_errors=True)
    result["server"] = result_server
    if contender != "floor" and scenario in ("throughput", "latency", "batched", "peak"):
        result["db_rows"] = stored_predictions(tmp / f"{tag}.db")
        if contender == "ours2":  # how the kernel spread the load
            result["db_rows_per_worker"] = [stored_predictions(p) for p in worker_dbs(tmp / f"{tag}.db")]
    result["seconds"] = time.monotonic() - started
    return result


# --------------------------------------------------------------------------- summary


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else math.nan


def _latency_at(result: dict[str, Any], rate: int) -> tuple[float, float]:
    """(p50, p99) in ms at ``rate``; inf when the sweep stopped (saturated) before it."""
    if not result.get("ok"):
        return math.nan, math.nan
    for point in result.get("sweep", []):
        if point.get("rate") == rate and "p99_ms" in point:
            return point["p50_ms"], point["p99_ms"]
    return math.inf, math.inf


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, float]]:
    """Median per metric and contender over the rounds."""
    def get(scenario: str, contender: str, key: str) -> float:
        rs = runs.get(scenario, {}).get(contender, [])
        return _median([r.get(key, math.nan) if r.get("ok") else math.nan for r in rs])

    out: dict[str, dict[str, float]] = {}
    hidden = [h for h in HIDDEN if any(by_c.get(h) for by_c in runs.values())]
    for c in (*CONTENDERS, *hidden):
        lat = runs.get("latency", {}).get(c, [])
        pairs = [_latency_at(r, LATENCY_AT) for r in lat]
        out[c] = {
            "throughput": get("throughput", c, "rate"),
            "p50": _median([p for p, _ in pairs]),
            "p99": _median([q for _, q in pairs]),
            "batched": get("batched", c, "rate"),
            "rss": get("scale", c, "rss_per_conn_kib"),
            "cpu": get("scale", c, "idle_cpu_pct"),
            "broadcast": get("broadcast", c, "last_ms"),
            "peak": get("peak", c, "p99_ms"),
            "gameupdate": get("gameupdate", c, "last_ms"),
        }
    return out


def sweep_medians(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, list[tuple[int, float, float]]]:
    curves: dict[str, list[tuple[int, float, float]]] = {}
    for c in CONTENDERS:
        rs = runs.get("latency", {}).get(c, [])
        if not rs:
            continue
        points = []
        for rate in RATES:
            pairs = [_latency_at(r, rate) for r in rs if r.get("ok")]
            if pairs:  # a round whose sweep stopped before this rate counts as infinitely late
                points.append((rate, _median([p for p, _ in pairs]), _median([q for _, q in pairs])))
        curves[c] = points
    return curves


def verdicts(m: dict[str, dict[str, float]]) -> dict[str, bool | None]:
    ours, floor, base = m["ours"], m["floor"], m["baseline"]

    def known(*values: float) -> bool:
        return all(not math.isnan(v) for v in values)

    return {
        "throughput": (ours["throughput"] >= 0.4 * floor["throughput"] and ours["throughput"] >= 2 * base["throughput"])
        if known(ours["throughput"], floor["throughput"], base["throughput"]) else None,
        "p50": None,
        "p99": ours["p99"] <= 5.0 if known(ours["p99"]) else None,
        "batched": ours["batched"] >= 30_000 if known(ours["batched"]) else None,
        "rss": ours["rss"] <= 64 if known(ours["rss"]) else None,
        "cpu": ours["cpu"] <= 3 if known(ours["cpu"]) else None,
        "broadcast": ours["broadcast"] <= 250 if known(ours["broadcast"]) else None,
        "peak": (ours["peak"] <= 2000 and 6 * ours["peak"] <= base["peak"])
        if known(ours["peak"], base["peak"]) else None,
        "gameupdate": ours["gameupdate"] <= 1000 if known(ours["gameupdate"]) else None,
    }


ROWS = [
    ("throughput", "throughput (pred/s)", "{:,.0f}"),
    ("p50", f"p50 latency at {LATENCY_AT:,}/s (ms)", "{:.2f}"),
    ("p99", f"p99 latency at {LATENCY_AT:,}/s (ms)", "{:.2f}"),
    ("batched", "batched (pred/s)", "{:,.0f}"),
    ("rss", "RSS per idle connection (KiB)", "{:.1f}"),
    ("cpu", "idle CPU, 1,000 connections (% of a core)", "{:.2f}"),
    ("broadcast", "broadcast to 256, last miner (ms)", "{:.1f}"),
    ("peak", f"peak (a): {PEAK_MINERS} miners x {PEAK_GAMES} predictions at once, p99 (ms)", "{:,.0f}"),
    ("gameupdate", f"peak (b): {PEAK_GAMES} new games to {PEAK_MINERS} MinerNodes, last stored (ms)", "{:,.0f}"),
]


def _fmt(fmt: str, value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "saturated"
    return fmt.format(value)


def _ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b) or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def table(m: dict[str, dict[str, float]], met: dict[str, bool | None]) -> str:
    lines = [
        "| metric | ours | floor | baseline | ours/floor | ours/baseline | target | met? |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for key, label, fmt in ROWS:
        ours, floor, base = m["ours"][key], m["floor"][key], m["baseline"][key]
        verdict = {True: "yes", False: "**no**", None: "—"}[met[key]]
        lines.append(
            f"| {label} | {_fmt(fmt, ours)} | {_fmt(fmt, floor)} | {_fmt(fmt, base)} | "
            f"{_ratio(ours, floor)} | {_ratio(ours, base)} | {TARGETS[key]} | {verdict} |"
        )
    return "\n".join(lines)


def sweep_table(curves: dict[str, list[tuple[int, float, float]]]) -> str:
    head = "| offered (pred/s) | " + " | ".join(f"{c} p50 / p99 (ms)" for c in CONTENDERS) + " |"
    lines = [head, "|---:|" + "---:|" * len(CONTENDERS)]
    for rate in RATES:
        cells = []
        for c in CONTENDERS:
            point = next((p for p in curves.get(c, []) if p[0] == rate), None)
            cells.append(f"{_fmt('{:.2f}', point[1])} / {_fmt('{:.2f}', point[2])}" if point else "n/a")
        lines.append(f"| {rate:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def peak_table(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """The peaks in detail: where the time went, medians over the rounds."""
    def med(scenario: str, contender: str, key: str) -> float:
        return _median([r.get(key, math.nan) for r in runs.get(scenario, {}).get(contender, []) if r.get("ok")])

    lines = []
    if runs.get("peak"):
        lines += [
            f"(a) {PEAK_MINERS} reference-format connections, {PEAK_GAMES} single predictions each, all sent at once:",
            "",
            "| contender | p50 (ms) | p99 (ms) | last answer (ms) | server CPU per prediction (µs) |",
            "|---|---:|---:|---:|---:|",
        ]
        for c in (*CONTENDERS, *HIDDEN):
            if runs["peak"].get(c):
                lines.append(
                    f"| {c} | {_fmt('{:,.0f}', med('peak', c, 'p50_ms'))} | {_fmt('{:,.0f}', med('peak', c, 'p99_ms'))} | "
                    f"{_fmt('{:,.0f}', med('peak', c, 'last_ms'))} | {_fmt('{:.0f}', med('peak', c, 'server_cpu_us'))} |"
                )
        lines.append("")
    if runs.get("gameupdate"):
        lines += [
            f"(b) one update of {PEAK_GAMES} new games to {PEAK_MINERS} of our MinerNodes ({PEAK_SWARM_PROCS} "
            "processes, benchmarks/swarm.py), from the validator's signal; the miners' own CPU is what "
            "they spent in that time, per miner:",
            "",
            "| validator | update at the last miner (ms) | last prediction sent (ms) | last answer received (ms) "
            "| last confirmation stored (ms) | miners' CPU per miner (ms) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for c in CONTENDERS:
            if runs["gameupdate"].get(c):
                cells = [med("gameupdate", c, k) for k in
                         ("update_last_ms", "sent_last_ms", "answer_last_ms", "last_ms", "swarm_cpu_per_miner_ms")]
                lines.append(f"| {c} | " + " | ".join(_fmt("{:,.0f}", v) for v in cells[:4])
                             + f" | {_fmt('{:.1f}', cells[4])} |")
        lines.append("")
    return "\n".join(lines)


def workers_table(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """ours against ours2 (benchmarks/workers.py), with the CPU each side spent: medians over the rounds."""
    def med(scenario: str, c: str, key: str, rate: int | None = None) -> float:
        values = []
        for r in runs.get(scenario, {}).get(c, []):
            if not r.get("ok"):
                continue
            point = r if rate is None else next((p for p in r.get("sweep", []) if p.get("rate") == rate), {})
            values.append(point.get(key, math.inf if rate is not None else math.nan))
        return _median(values)

    rows: list[tuple[str, str, str, str | None, str]] = []
    for scenario in ("throughput", "batched"):
        rows.append((f"{scenario} (pred/s)", scenario, "rate", None, "{:,.0f}"))
    rows += [(f"p{q} at {r:,}/s (ms)", "latency", f"p{q}_ms", str(r), "{:.2f}") for r in RATES for q in (50, 99)]
    rows += [("peak (a) p99 (ms)", "peak", "p99_ms", None, "{:,.0f}"),
             ("peak (a) last answer (ms)", "peak", "last_ms", None, "{:,.0f}")]
    for scenario, rate in (("throughput", None), ("batched", None), ("latency", str(LATENCY_AT)), ("peak", None)):
        at = f" at {int(rate):,}/s" if rate else ""
        rows += [(f"{scenario}{at}: server CPU per prediction (µs)", scenario, "server_cpu_us", rate, "{:.0f}"),
                 (f"{scenario}{at}: server CPU (% of one core)", scenario, "server_cpu_pct", rate, "{:.0f}"),
                 (f"{scenario}{at}: load generator CPU (% of one core)", scenario, "client_cpu_pct", rate, "{:.0f}")]
    lines = ["| metric | ours | ours2 | ours2/ours |", "|---|---:|---:|---:|"]
    for label, scenario, key, rate, fmt in rows:
        if not runs.get(scenario, {}).get("ours2"):
            continue
        a, b = (med(scenario, c, key, int(rate) if rate else None) for c in ("ours", "ours2"))
        lines.append(f"| {label} | {_fmt(fmt, a)} | {_fmt(fmt, b)} | {_ratio(b, a)} |")
    splits = [f"{s}: " + ", ".join("/".join(str(n) for n in r.get("db_rows_per_worker", [])) for r in rs if r.get("ok"))
              for s, by_c in runs.items() if (rs := by_c.get("ours2"))]
    lines += ["", "Predictions stored by each worker, round by round: " + "; ".join(splits) + "."]
    return "\n".join(lines)


def plot(curves: dict[str, list[tuple[int, float, float]]], medians: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
    colors = {"ours": "tab:blue", "floor": "tab:green", "baseline": "tab:red"}
    for c, points in curves.items():
        points = [p for p in points if math.isfinite(p[2]) and math.isfinite(p[1])]
        if not points:
            continue
        rates = [p[0] for p in points]
        ax.plot(rates, [p[2] for p in points], "o-", color=colors[c], label=f"{c} p99")
        ax.plot(rates, [p[1] for p in points], "s--", color=colors[c], alpha=0.6, label=f"{c} p50")
    ax.axhline(5.0, color="grey", linestyle=":", linewidth=1, label="p99 target (5 ms)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(RATES)
    ax.set_xticklabels([f"{r:,}" for r in RATES])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("offered load (predictions/s, 8 connections)")
    ax.set_ylabel("confirmation latency (ms)")
    ax.set_title("Latency against offered load (median of rounds)", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    peaks = [("peak", f"(a) {PEAK_MINERS} miners x {PEAK_GAMES}\np99", 2000.0),
             ("gameupdate", f"(b) update to {PEAK_MINERS}\nMinerNodes, last", 1000.0)]
    width = 0.27
    for k, c in enumerate(CONTENDERS):
        values = [medians[c][key] for key, _, _ in peaks]
        xs = [i + (k - 1) * width for i in range(len(peaks))]
        shown = [(x, v) for x, v in zip(xs, values, strict=True) if math.isfinite(v)]
        if shown:
            bars.bar([x for x, _ in shown], [v / 1e3 for _, v in shown], width, color=colors[c], label=c)
            for x, v in shown:
                bars.annotate(f"{v / 1e3:.2f}", (x, v / 1e3), ha="center", va="bottom", fontsize=7)
    for i, (_, _, target) in enumerate(peaks):
        bars.hlines(target / 1e3, i - 1.5 * width, i + 1.5 * width, colors="grey", linestyles=":",
                    label="target" if i == 0 else None)
    bars.set_xticks(range(len(peaks)))
    bars.set_xticklabels([label for _, label, _ in peaks], fontsize=8)
    bars.set_ylabel("seconds (from the burst / the broadcast)")
    bars.set_title("The peak: new games, every miner at once", fontsize=11)
    bars.grid(True, axis="y", alpha=0.3)
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def server_notes(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    notes = []
    for scenario, by_c in runs.items():
        for c, rs in by_c.items():
            for i, r in enumerate(rs):
                tag = f"{scenario} round {i + 1} {c}"
                if not r.get("ok"):
                    notes.append(f"{tag}: run failed: {r.get('error')}")
                if r.get("errors"):
                    notes.append(f"{tag}: error answers: {r['errors']}")
                srv = r.get("server", {})
                if srv.get("notable_count"):
                    notes.append(f"{tag}: {srv['notable_count']} notable stderr lines, e.g. {srv['notable'][:2]}")
                if srv.get("returncode") not in (0, None, -signal.SIGTERM):
                    notes.append(f"{tag}: server exit status {srv.get('returncode')}")
                if r.get("unanswered"):
                    notes.append(f"{tag}: {r['unanswered']} predictions unanswered")
                if scenario == "gameupdate" and r.get("ok") and r.get("miners_done", 0) < r.get("connections", 0):
                    notes.append(f"{tag}: only {r['miners_done']} of {r['connections']} miners stored "
                                 f"every confirmation within the timeout")
                if r.get("frames_exhausted"):
                    notes.append(f"{tag}: ran out of pre-signed frames (shorter window: {r.get('window', 0):.2f} s)")
                rows, confirmed = r.get("db_rows"), r.get("success_total")
                if c != "floor" and r.get("ok") and rows is not None and confirmed and rows < confirmed:
                    notes.append(f"{tag}: DURABILITY: {confirmed} success confirmations but {rows} rows stored")
                if scenario == "scale" and r.get("ok") and r.get("still_open", 0) < r.get("connections", 0):
                    notes.append(f"{tag}: {r['connections'] - r['still_open']} connections closed while idle")
                if scenario == "broadcast" and r.get("ok"):
                    partial = [u["received_by"] for u in r.get("updates", []) if u["received_by"] < r["connections"]]
                    if partial or not r.get("complete_updates"):
                        notes.append(
                            f"{tag}: {r.get('complete_updates', 0)} updates reached all {r['connections']} "
                            f"miners; {len(partial)} reached only {partial} within the grace time"
                        )
                    if r.get("closed_during_hold"):
                        notes.append(f"{tag}: {r['closed_during_hold']} connections closed by the server")
    return notes


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round, shorter runs (smoke test)")
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 3, --quick 1)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS), help="output folder (default benchmarks/results)")
    parser.add_argument("--readme", action="store_true", help="also put the table in benchmarks/README.md")
    parser.add_argument("--profile", metavar="DIR", help="run our validator under pyinstrument, reports in DIR")
    args = parser.parse_args()
    global PROFILE_DIR
    if args.profile:
        PROFILE_DIR = Path(args.profile).resolve()
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    contenders = [c for c in (*CONTENDERS, *HIDDEN) if c in args.contenders.split(",")]
    rounds = args.rounds or (1 if args.quick else 3)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192 and (hard == resource.RLIM_INFINITY or hard > soft):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536, hard))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bettensor-bench-"))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        games_file = tmp / "games.json"
        games_file.write_text(json.dumps(make_games(10)))
        for scenario in scenarios:
            settings = SETTINGS[scenario][1 if args.quick else 0]
            if "ours2" in contenders and scenario in ("throughput", "batched"):
                # WORKERS processes answer faster: enough pre-signed frames for the whole window
                settings = {**settings, "frames_per_conn": settings["frames_per_conn"] * WORKERS}
            runs[scenario] = {c: [] for c in contenders}
            for rnd in range(rounds):
                who = [c for c in contenders if c in RUNS_IN.get(scenario, (*CONTENDERS, *HIDDEN))]
                order = who[rnd % len(who):] + who[: rnd % len(who)]
                for c in order:
                    result = one_run(c, scenario, rnd, settings, tmp, games_file)
                    runs[scenario][c].append(result)
                    print(f"[{time.monotonic() - started:6.1f} s] {scenario} round {rnd + 1}/{rounds} "
                          f"{c}: {_brief(scenario, result)}", flush=True)
            (tmp / f"frames-{scenario}.pkl").unlink(missing_ok=True)
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started

    for c in CONTENDERS:
        for scenario in scenarios:
            runs[scenario].setdefault(c, [])
    medians = summarize(runs)
    met = verdicts(medians)
    curves = sweep_medians(runs)
    notes = server_notes(runs)
    md_table = table(medians, met)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"Run {stamp} on {os.cpu_count()} CPUs ({platform.python_implementation()} "
        f"{platform.python_version()}), {rounds} round(s) of each scenario"
        f"{' (--quick)' if args.quick else ''}, contenders alternated, medians shown; "
        f"total {elapsed:.0f} s; load average before: {load_before[0]:.2f}."
    )
    report = [
        "# Load benchmark results",
        "",
        header,
        "",
        md_table,
        "",
        "## Latency sweep (median p50 / p99 over rounds, open loop over 8 connections)",
        "",
        sweep_table(curves),
        "",
        "![latency against offered load](latency.png)",
        "",
        *(["## The peaks", "", peak_table(runs)] if runs.get("peak") or runs.get("gameupdate") else []),
        *([f"## Two worker processes (ours2: benchmarks/workers.py, {WORKERS} workers, an upper bound)", "",
           workers_table(runs), ""] if any(by_c.get("ours2") for by_c in runs.values()) else []),
        "## Notes from the run",
        "",
        *([f"- {n}" for n in notes] or ["- nothing unusual: no failed runs, error answers or server errors"]),
        "",
    ]
    (out / "results.md").write_text("\n".join(report))
    (out / "results.json").write_text(
        json.dumps(
            {"when": stamp, "seconds": elapsed, "rounds": rounds, "quick": args.quick,
             "load_average_before": load_before, "medians": medians, "met": met,
             "latency_curves": curves, "runs": runs, "notes": notes},
            indent=1, default=str,
        )
    )
    if curves or "peak" in scenarios or "gameupdate" in scenarios:
        plot(curves, medians, out / "latency.png")
    if args.readme:
        _update_readme(md_table, header)

    print()
    print(header)
    print()
    print(md_table)
    print()
    if any(by_c.get("ours2") for by_c in runs.values()):
        print(workers_table(runs))
        print()
    for n in notes:
        print(f"note: {n}")
    missed = [label for key, label, _ in ROWS if met[key] is False]
    unknown_rows = [label for key, label, _ in ROWS if met[key] is None and TARGETS[key] != "—"]
    print(f"targets missed: {', '.join(missed) if missed else 'none'}")
    if unknown_rows:
        print(f"targets not measured: {', '.join(unknown_rows)}")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'latency.png'} in {elapsed:.0f} s")
    return 0


def _brief(scenario: str, r: dict[str, Any]) -> str:
    if not r.get("ok"):
        return f"FAILED {r.get('error')}"
    if scenario in ("throughput", "batched"):
        s = f"{r['rate']:,.0f} pred/s"
    elif scenario == "latency":
        s = ", ".join(
            f"{p['rate']}/s p50 {p['p50_ms']:.2f} p99 {p['p99_ms']:.2f} ms" if "p99_ms" in p else f"{p['rate']}/s skipped"
            for p in r.get("sweep", [])
        )
    elif scenario == "peak":
        s = (f"p50 {r['p50_ms']:,.0f} p99 {r['p99_ms']:,.0f} ms, last answer {r['last_ms']:,.0f} ms "
             f"({r['success_total']:,} confirmed, sent in {r['send_s']:.2f} s)")
    elif scenario == "gameupdate":
        s = (f"update at the last miner {r['update_last_ms']:,.0f} ms, last confirmation stored "
             f"{r['last_ms']:,.0f} ms, median miner {r['median_ms']:,.0f} ms ({r['miners_done']} done)")
    elif scenario == "scale":
        s = f"{r['rss_per_conn_kib']:.1f} KiB/conn, idle CPU {r['idle_cpu_pct']:.2f}%, connect {r['connect_s']:.1f} s"
    else:
        s = f"last miner {r['last_ms']:.1f} ms over {r['complete_updates']} updates"
    if r.get("errors"):
        s += f" errors={r['errors']}"
    return s + f" ({r.get('seconds', 0):.1f} s)"


MARK_BEGIN = "<!-- bench-table:begin -->"
MARK_END = "<!-- bench-table:end -->"


def _update_readme(md_table: str, header: str) -> None:
    readme = HERE / "README.md"
    text = readme.read_text()
    block = f"{MARK_BEGIN}\n{header}\n\n{md_table}\n{MARK_END}"
    if MARK_BEGIN in text and MARK_END in text:
        text = text[: text.index(MARK_BEGIN)] + block + text[text.index(MARK_END) + len(MARK_END):]
    else:
        text = text.rstrip() + "\n\n## Latest results\n\n" + block + "\n"
    readme.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
