"""Reports: a simulated run's report assembled from its recorder, JSON files, and matplotlib PNG plots."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import SimConfig, SimPlan
from .metrics import SLO, MetricsRecorder
from .workload import Workload

KV_SAMPLES = 2000  # points of the KV-usage timeline kept in a report


@dataclass
class SimResult:
    report: dict
    per_request: dict[str, np.ndarray] = field(repr=False)
    kv_usage: tuple[np.ndarray, np.ndarray] = field(repr=False)  # (time, used fraction over all replicas)
    traces: list = field(default_factory=list, repr=False)  # per replica, when record_trace
    wall_s: float = 0.0


def build_result(config: SimConfig, plan: SimPlan, workload: Workload, slo: SLO | None, dispatch: str,
                 recorder: MetricsRecorder, traces: dict[int, list], wall_s: float = 0.0) -> SimResult:
    """The report of a run (vLLM's metric names, the replicas' counters, KV usage) from its recorder."""
    info = recorder.replicas
    duration = recorder.duration
    summary = recorder.summary(duration, slo)
    for key in ("num_preemptions", "num_steps", "num_cached_tokens"):
        summary[key] = sum(r[key] for r in info.values())
    if plan.engine_config.jit_config.enabled:
        jits = [r["jit"] for r in info.values()]
        compiled, slow = sum(j["steps_compiled"] for j in jits), sum(j["steps_slow"] for j in jits)
        ready = [j["first_ready_at"] for j in jits if j["first_ready_at"] is not None]
        summary["jit"] = {
            "hit_rate": compiled / (compiled + slow) if compiled + slow else 0.0,
            "compilations_started": sum(j["compilations_started"] for j in jits),
            "compilations_finished": sum(j["compilations_finished"] for j in jits),
            "compilations_failed": sum(j["compilations_failed"] for j in jits),
            "compile_seconds_total": sum(j["compile_seconds_total"] for j in jits),
            "first_bucket_ready_s": min(ready) if ready else None,
        }
    usages = [r["device_time"] for r in info.values() if "device_time" in r]
    if usages:  # where the devices' time went: shares of the run's duration, averaged over replicas
        d = (duration or 1.0) * len(usages)
        total = {k: sum(u[k] for u in usages) for k in usages[0]}
        summary["device_time"] = {
            "compute_bound_share": total["compute_bound_s"] / d,
            "weight_bandwidth_bound_share": total["weight_bandwidth_bound_s"] / d,
            "kv_bandwidth_bound_share": total["kv_bandwidth_bound_s"] / d,
            "tp_comm_share": total["tp_comm_s"] / d,
            "stage_transfer_share": total["stage_transfer_s"] / d,
            "idle_share": max(0.0, 1.0 - total["busy_s"] / d),  # with several stages: the pipeline bubble
            "mean_batch_size": total["num_seqs"] / total["num_batches"] if total["num_batches"] else 0.0,
        }
    kv_time, kv_frac = recorder.kv_usage()
    summary["mean_kv_usage"] = float(kv_frac.mean()) if len(kv_frac) else 0.0
    summary["max_kv_usage"] = float(kv_frac.max()) if len(kv_frac) else 0.0
    keep = np.unique(np.linspace(0, len(kv_time) - 1, min(KV_SAMPLES, len(kv_time))).astype(int)) if len(kv_time) else []
    report = {
        "config": config.describe(),
        "workload": workload.describe(),
        "slo": None if slo is None else asdict(slo),
        "dispatch": dispatch,
        "replicas": [
            {**{k: v for k, v in r.items() if k != "num_cached_tokens"},
             "utilization": r["device_busy_s"] / duration if duration else 0.0}
            for r in info.values()
        ],
        "max_model_len": plan.max_model_len,
        "unused_devices": plan.unused_devices or None,  # given, but the layout leaves them over
        "metrics": summary,
        "kv_usage": {"time_s": [float(kv_time[i]) for i in keep], "used_fraction": [float(kv_frac[i]) for i in keep]},
    }
    return SimResult(report, recorder.per_request(), (kv_time, kv_frac), [traces[i] for i in sorted(traces)], wall_s)


def jsonable(obj):
    """Report values as strict JSON (NaN and infinities become null)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


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
    rate = result.report["workload"]["request_rate"]
    load = f"{rate:g} req/s" if isinstance(rate, (int, float)) and math.isfinite(rate) else "offline (all at t=0)"
    fig.suptitle(f"{cfg['model']} on {cfg['devices']} (tp={cfg['tensor_parallel_size']}, "
                 f"pp={cfg['pipeline_parallel_size']}), {load}")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_plan(plan: dict, path: str | Path) -> None:
    """SLO attainment against request rate for each probed configuration, and the max rate of each; for the
    ``offline_throughput`` objective, each configuration's offline output throughput. A point that could not
    run is labelled with "(error)"."""
    plt = _pyplot()
    rows = plan["results"]
    labels = [(", ".join(f"{k}={v}" for k, v in row["point"].items()) or "config") + (" (error)" if "error" in row else "")
              for row in rows]
    if plan.get("objective") == "offline_throughput":
        fig, a = plt.subplots(figsize=(8, 1.5 + 0.4 * len(rows)))
        a.barh(range(len(rows)), [row.get("output_throughput") or 0.0 for row in rows])
        a.set_yticks(range(len(rows)), labels, fontsize=7)
        a.set_xlabel("offline output throughput (tokens/s, every request at t=0)")
        a.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for row, label in zip(rows, labels):
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
    # an unbounded row (the SLOs held offline) is drawn at its highest probed rate, marked in its label
    rates = [max((h["request_rate"] for h in row.get("probes", []) if h["passes"]), default=0.0)
             if row.get("unbounded") else row.get("max_request_rate") or 0.0 for row in rows]
    labels = [f"{label} (unbounded)" if row.get("unbounded") else f"{label} (not converged)" if row.get("converged") is False
              else label for label, row in zip(labels, rows)]
    ax[1].barh(range(len(rows)), rates)
    finite = [r for r in rates if r > 0]
    if finite and max(finite) > 100 * min(finite):  # e.g. an unbounded row at its highest probe: log, so all show
        ax[1].set_xscale("log")
    ax[1].set_yticks(range(len(rows)), labels, fontsize=7)
    ax[1].set_xlabel("max request rate within SLOs (req/s)")
    ax[1].grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
