"""`tidellm bench throughput | latency | serve`: thin CLI wiring; the work lives in `tidellm.benchmarks`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from tidellm.benchmarks import latency, serve, throughput

    p = sub.add_parser("bench", help="Benchmarks: offline throughput and latency, and serving load.")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    for name, module, help_text in (
        ("throughput", throughput, "Offline throughput on N random prompts."),
        ("latency", latency, "One batch end to end, prefill and decode timed separately."),
        ("serve", serve, "Load generator for any OpenAI-compatible server (TTFT, TPOT, ITL, throughput)."),
    ):
        sp = bsub.add_parser(name, help=help_text, description=help_text)
        module.add_cli_args(sp)
        sp.set_defaults(func=module.main)
    p.set_defaults(func=lambda a: p.print_help() or 2)
