"""Reports: JSON files and matplotlib PNG plots of simulated runs and plans."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .simulation import SimResult, jsonable


def write_json(obj: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(jsonable(obj), indent=2) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(result: SimResult, path: str | Path) -> None:
    """Latency distributions, KV usage over time and throughput of one simulated run."""
    plt = _pyplot()
    r = result.per_request
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    slo = result.report.get("slo") or {}
    for a, key, label in ((ax[0, 0], "ttft_ms", "TTFT (ms)"), (ax[0, 1], "tpot_ms", "TPOT (ms)")):
        vals = np.sort(r[key][r["n_out"] > 1] if key == "tpot_ms" else r[key])
        if len(vals):
            a.plot(vals, np.arange(1, len(vals) + 1) / len(vals))
        target = slo.get(key)
        if target:
            a.axvline(target, color="red", linestyle="--", label=f"SLO {target:g} ms")
            a.legend()
        a.set_xlabel(label)
        a.set_ylabel("share of requests")
        a.set_title(f"{label.split()[0]} CDF")
        a.grid(alpha=0.3)
    t, u = result.kv_usage
    ax[1, 0].plot(t, u * 100, linewidth=0.8)
    ax[1, 0].set_xlabel("simulated time (s)")
    ax[1, 0].set_ylabel("KV blocks in use (%)")
    ax[1, 0].set_title("KV cache usage")
    ax[1, 0].grid(alpha=0.3)
    finish = np.sort(r["arrival"] + r["e2el_ms"] / 1e3)
    if len(finish):
        bins = max(10, min(100, len(finish) // 20))
        counts, edges = np.histogram(finish, bins=bins)
        width = edges[1] - edges[0]
        ax[1, 1].step(edges[:-1], counts / width, where="post")
    ax[1, 1].set_xlabel("simulated time (s)")
    ax[1, 1].set_ylabel("completed requests / s")
    ax[1, 1].set_title("Request throughput")
    ax[1, 1].grid(alpha=0.3)
    cfg = result.report["config"]
    fig.suptitle(f"{cfg['model']} on {cfg['devices']} (tp={cfg['tensor_parallel_size']}, "
                 f"pp={cfg['pipeline_parallel_size']}), {result.report['workload']['request_rate']} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_plan(plan: dict, path: str | Path) -> None:
    """SLO attainment against request rate for each probed configuration, and the max rate of each."""
    plt = _pyplot()
    rows = plan["results"]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = []
    for row in rows:
        label = ", ".join(f"{k}={v}" for k, v in row["point"].items()) or "config"
        labels.append(label)
        probes = sorted(row.get("probes", []), key=lambda h: h["request_rate"])
        if probes:
            ax[0].plot([h["request_rate"] for h in probes], [h["slo_attainment"] for h in probes], marker="o",
                       label=label)
    ax[0].axhline(plan["slo"]["attainment"], color="red", linestyle="--", label="target attainment")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("request rate (req/s)")
    ax[0].set_ylabel("share of requests meeting SLOs")
    ax[0].legend(fontsize=7)
    ax[0].grid(alpha=0.3)
    rates = [row.get("max_request_rate") or 0.0 for row in rows]
    ax[1].barh(range(len(rows)), rates)
    ax[1].set_yticks(range(len(rows)), labels, fontsize=7)
    ax[1].set_xlabel("max request rate within SLOs (req/s)")
    ax[1].grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
