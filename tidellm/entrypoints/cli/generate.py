"""`tidellm generate PROMPT` and `tidellm chat`: stream tokens to the terminal."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from tidellm.entrypoints.cli.args import add_engine_args, engine_kwargs_from_args
from tidellm.entrypoints.cli.sampling_args import add_sampling_args, sampling_params_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="Complete a prompt and print the result as it streams.")
    p.add_argument("prompt", help="Prompt text ('-' reads stdin).")
    p.add_argument(
        "--chat-format", action="store_true", help="Wrap the prompt as a user message in the chat template."
    )
    p.add_argument("--log-level", default="WARNING")
    add_sampling_args(p)
    add_engine_args(p)
    p.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="Interactive chat in the terminal (/exit to quit, /reset to clear).")
    c.add_argument("--system", default=None, help="System prompt.")
    c.add_argument("--log-level", default="WARNING")
    add_sampling_args(c, max_tokens=512)
    add_engine_args(c)
    c.set_defaults(func=run_chat)


def _make_engine(args: argparse.Namespace):
    from tidellm.engine.llm_engine import LLMEngine
    from tidellm.logger import configure_logging

    configure_logging(args.log_level)
    return LLMEngine.from_kwargs(**engine_kwargs_from_args(args))


def stream(engine, prompt, params) -> Iterator[str]:
    """Yield text deltas of one request (the first completion when n > 1 is printed alone)."""
    from tidellm.engine.output_processor import OutputKind

    rid = engine.next_request_id()
    engine.add_request(rid, prompt, params, kind=OutputKind.DELTA)
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                for c in out.outputs:
                    if c.text:
                        yield c.text if params.n == 1 else f"[{c.index}] {c.text}"
    finally:
        if engine.has_unfinished_requests():
            engine.abort_request(rid)


def run_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = sampling_params_from_args(args, default_temperature=0.0)
    engine = _make_engine(args)
    if args.chat_format:
        prompt = engine.tokenizer.encode(
            engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]),
            add_special_tokens=False,
        )
    for text in stream(engine, prompt, params):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args, default_temperature=0.7)
    engine = _make_engine(args)
    tok = engine.tokenizer
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    interactive = sys.stdin.isatty()
    print("tidellm chat: type a message, /reset to clear the history, /exit to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = list(base)
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(history), add_special_tokens=False)
        reply = []
        for text in stream(engine, ids, params):
            reply.append(text)
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0
