"""Sampling flags shared by `generate`, `chat` and `bench`."""

from __future__ import annotations

import argparse

from tidellm.sample.params import SamplingParams


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = parser.add_argument_group("sampling options")
    g.add_argument(
        "--max-tokens",
        type=int,
        default=max_tokens,
        help="Tokens to generate at most (default: %(default)s).",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="Sampling temperature; 0 = greedy (default: 0.7 for chat, 0 for generate).",
    )
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--stop", action="append", default=None, help="Stop string (repeatable).")
    g.add_argument("--sampling-seed", type=int, default=None, help="Seed for this request's sampling.")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("-n", type=int, default=1, help="Completions per prompt.")


def sampling_params_from_args(args: argparse.Namespace, default_temperature: float) -> SamplingParams:
    return SamplingParams(
        n=args.n,
        max_tokens=args.max_tokens,
        temperature=default_temperature if args.temperature is None else args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=args.stop,
        seed=args.sampling_seed,
        ignore_eos=args.ignore_eos,
    )
