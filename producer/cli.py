"""The `tokenfeed` command: serve, stop, status, scale, mix, clean, cache, and the offline
tools' demo, download, train-tokenizer, import-tokenizer and explain (`tokenfeed.tools`).

serve's flags take their defaults from `DaemonConfig` (config.py), where they are written
once. User mistakes (`UserInputError`) print one line on stderr and exit with code 2;
an unreachable daemon prints one line and exits with code 1. No tracebacks for
either.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tokenfeed.common.config import ensure_private_dir, resolve_run_dir
from tokenfeed.common.control import request
from tokenfeed.common.errors import (
    ConfigError,
    DaemonUnavailableError,
    TokenfeedError,
    UserInputError,
)
from tokenfeed.common.protocol import OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION
from tokenfeed.common.version import package_version
from tokenfeed.producer.config import (
    ON_BACKEND_MISMATCH,
    ON_ERROR,
    TOKENIZER_BACKENDS,
    DaemonConfig,
    data_path,
    field_default,
    load_mix_file,
    load_recipe,
    parse_source,
    parse_weights,
)
from tokenfeed.producer.logs import LOG_FORMATS, LOG_LEVELS
from tokenfeed.tools import commands, explain

DETACHED_LOG_NAME = "daemon.log"  # in the run dir: the log of `serve --detach`
# Start-up reads every file's Parquet footer and loads the tokenizer: seconds on a
# large corpus, bounded here so a stuck start cannot hang a job script.
DETACH_START_TIMEOUT_S = 300.0


def _add_run_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", help="daemon run dir (default: $TOKENFEED_RUN_DIR, "
                   "else <tmp>/tokenfeed-<uid>)")


def _default(name: str) -> Any:
    return field_default(DaemonConfig, name)


def _add_data_flags(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--data", required=required,
                   help="folder of *.parquet shards, or a URL: s3://bucket/prefix, gs://...")
    p.add_argument("--tokenizer", default=_default("tokenizer"),
                   help="tiktoken encoding name or tokenizer directory "
                   "(default: %(default)s, bundled, offline)")
    p.add_argument("--bos", help="BOS special token (default: <|bos|>, else <|endoftext|>)")
    p.add_argument("--workers", type=int, default=_default("workers"),
                   help="tokenizer worker processes (default %(default)s)")
    p.add_argument("--slots", type=int, default=_default("slots"),
                   help="ring slots (batches) per stream (default %(default)s)")
    p.add_argument("--val-files", type=int, default=_default("val_files"),
                   help="last N files form the val split (default %(default)s)")
    p.add_argument("--text-column", default=_default("text_column"),
                   help="Parquet column holding the text (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenfeed", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tokenfeed {package_version()} "
                        f"(protocol v{PROTOCOL_VERSION}, serves clients from "
                        f"v{OLDEST_PROTOCOL_VERSION})")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the node daemon in the foreground")
    _add_data_flags(serve, required=False)
    serve.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                       help="a named source of a mixture (repeat it; instead of --data): a "
                       "folder or URL of shards with --text-column, split and --val-files "
                       "like --data; consumers pick weights with TokenFeed(mix=...)")
    serve.add_argument("--mix", metavar="FILE", help="sources and default weights from a TOML "
                       "file: a [sources.NAME] table each, with path, optional text_column "
                       "and weight (docs/recipes.md: Mixtures)")
    serve.add_argument("--filter", metavar="EXPR", help="keep only the documents of --data "
                       "whose row satisfies EXPR, e.g. \"int_score >= 3 and language == 'en'\" "
                       "(a mixture: filter = \"...\" per source in --mix; docs/recipes.md: "
                       "Filters)")
    serve.add_argument("--allow-filter-changes", action="store_true",
                       help="resume states saved under another filter (logged); by default "
                       "such a resume is refused")
    serve.add_argument("--weights", metavar="NAME=W,...", help="default mixture weights, "
                       "e.g. web=0.7,code=0.3 (default: equal; normalized)")
    _add_run_dir(serve)
    serve.add_argument("--linger-s", type=float, default=_default("linger_s"),
                       help="keep a stream warm this long after its last consumer leaves "
                       "(default %(default)s)")
    serve.add_argument("--max-ring-mib", type=int, default=_default("max_ring_bytes") >> 20,
                       help="upper bound on all rings together, in MiB of /dev/shm "
                       "(default %(default)s)")
    serve.add_argument("--max-staging-mib", type=int,
                       default=_default("max_staging_bytes") >> 20,
                       help="tokens read ahead outside the rings, all streams together, in MiB "
                       "(default %(default)s)")
    serve.add_argument("--task-kib", type=int, default=_default("task_bytes") >> 10,
                       help="text per worker task, in KiB: row groups are split into tasks "
                       "(default %(default)s)")
    serve.add_argument("--tokenizer-backend", default=_default("tokenizer_backend"),
                       choices=TOKENIZER_BACKENDS,
                       help="auto: the fastest installed backend proven identical to tiktoken "
                       "on your documents at start (quicktok: pip install tokenfeed[fast])")
    serve.add_argument("--on-backend-mismatch", default=_default("on_backend_mismatch"),
                       choices=ON_BACKEND_MISMATCH,
                       help="when a faster backend differs from tiktoken on your documents: "
                       "use tiktoken (with a warning), or refuse to start")
    serve.add_argument("--cache-dir", help="node-local token cache: row groups tokenized "
                       "once are read from here in later epochs and later runs")
    serve.add_argument("--manifest", metavar="PATH_OR_URL",
                       help="start from `tokenfeed index`'s manifest instead of every shard's "
                       "footer (default: the copy in --cache-dir, else one next to the data); "
                       "checked against the listing, changed shards are read again")
    serve.add_argument("--cache-gib", type=float, default=_default("cache_bytes") / (1 << 30),
                       help="bound of the token cache; least recently used entries go first "
                       "(default %(default)g)")
    serve.add_argument("--val-memory-mib", type=int,
                       default=_default("val_memory_bytes") >> 20,
                       help="without --cache-dir, the val split's tokenized row groups are kept "
                       "in this much memory, so a fixed validation set is tokenized once "
                       "(default %(default)s)")
    serve.add_argument("--on-error", default=_default("on_error"), choices=ON_ERROR,
                       help="a row group that fails to read or tokenize 3 times: fail the "
                       "streams that need it (naming it), or skip it (logged, in status)")
    serve.add_argument("--consumer-timeout-s", type=float,
                       default=_default("consumer_timeout_s"),
                       help="drop a consumer silent this long and reclaim its slots "
                       "(default %(default)s)")
    serve.add_argument("--metrics-port", type=int, default=_default("metrics_port"),
                       metavar="PORT", help="serve Prometheus metrics at "
                       "http://HOST:PORT/metrics (pip install tokenfeed[metrics]; 0: any "
                       "free port)")
    serve.add_argument("--metrics-host", default=_default("metrics_host"),
                       help="address /metrics listens on (default %(default)s; 0.0.0.0 for a "
                       "scraper on another host or pod)")
    serve.add_argument("--exclude", metavar="FILE",
                       help="documents no stream delivers, one per line: file,row_group,row, "
                       "source,file,row_group,row, or `tokenfeed explain --json` output")
    serve.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    serve.add_argument("--log-format", default=LOG_FORMATS[0], choices=LOG_FORMATS,
                       help="json: one JSON object per line (time, level, daemon_id, stream, "
                       "message) for log collectors")
    serve.add_argument("--detach", action="store_true",
                       help="run in the background (log: <run dir>/daemon.log); print the run "
                       "dir and return once the daemon answers")

    stop = sub.add_parser("stop", help="stop the daemon")
    _add_run_dir(stop)

    status = sub.add_parser("status", help="per stream: depth, tokens/s, trainer stall; "
                            "workers; one line of advice")
    _add_run_dir(status)
    status.add_argument("--json", action="store_true",
                        help="print the status as JSON (keys: docs/operations.md)")
    status.add_argument("--watch", nargs="?", const=1.0, type=float, metavar="SECONDS",
                        help="a live screen, redrawn every SECONDS (default 1) until Ctrl-C; "
                        "with --json, one JSON document per refresh")

    scale = sub.add_parser("scale", help="resize the worker pool of a running daemon")
    scale.add_argument("--workers", type=int, required=True)
    _add_run_dir(scale)

    mix = sub.add_parser("mix", help="change the mixture weights of running streams at "
                         "their next batch not yet filled (recorded in their feed state)")
    mix.add_argument("--set", required=True, metavar="NAME=W,...", dest="weights",
                     help="new weights, e.g. web=0.5,code=0.5 (sources not named: 0)")
    mix.add_argument("--split", default="train", choices=["train", "val"],
                     help="streams of this split (default: train)")
    _add_run_dir(mix)

    clean = sub.add_parser("clean", help="remove shared memory left by killed daemons")
    clean.add_argument("--dry-run", action="store_true", help="list, do not remove")

    cache = sub.add_parser("cache", help="inspect or empty a token cache directory")
    cache.add_argument("action", choices=["info", "clear"])
    cache.add_argument("--cache-dir", required=True)

    demo = sub.add_parser("demo", help="daemon + two consumer ranks on a sample corpus")
    _add_data_flags(demo, required=False)
    demo.add_argument("--batches", type=int, default=300, help="batches per rank")
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--seq-len", type=int, default=1024)
    commands.add_commands(sub)
    explain.add_parser(sub)
    return parser


def _serve_detached(args: argparse.Namespace, argv: list[str]) -> int:
    """Start `serve` without --detach in its own session, logging to the run dir; return
    once that process answers a ping (0, run dir on stdout) or exits (its exit code, its
    error line on stderr)."""
    run_dir = resolve_run_dir(args.run_dir)
    ensure_private_dir(run_dir)
    log_path = run_dir / DETACHED_LOG_NAME
    # argparse takes "--de" ... "--detach" alike; the child must never detach again
    cmd = [sys.executable, "-m", "tokenfeed.producer",
           *[a for a in argv if not (len(a) >= 4 and "--detach".startswith(a))],
           "--run-dir", str(run_dir)]
    with open(log_path, "ab") as log_file:  # appended: a daemon already running keeps its log
        start = log_file.tell()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + DETACH_START_TIMEOUT_S
    while True:
        code = proc.poll()
        if code is not None:
            with open(log_path, "rb") as f:
                f.seek(start)
                lines = f.read().decode(errors="replace").strip().splitlines()
            errors = [line for line in lines if line.startswith("tokenfeed: ")]
            print(errors[-1] if errors else f"tokenfeed: error: the daemon exited with code "
                  f"{code} at start; see {log_path}", file=sys.stderr)
            return code or 1
        try:  # the pid tells our daemon from one already serving this run dir
            if request(run_dir, "ping", timeout_s=1.0, expect="pong").get("pid") == proc.pid:
                break
        except DaemonUnavailableError:
            pass
        if time.monotonic() > deadline:
            print(f"tokenfeed: error: the daemon (pid {proc.pid}) did not answer within "
                  f"{DETACH_START_TIMEOUT_S:.0f} s; see {log_path}, stop it with "
                  f"`tokenfeed stop --run-dir {run_dir}`", file=sys.stderr)
            return 1
        time.sleep(0.1)
    print(str(run_dir))
    print(f"tokenfeed daemon pid {proc.pid} serving; log {log_path}; stop with "
          f"`tokenfeed stop --run-dir {run_dir}`", file=sys.stderr)
    return 0


def daemon_config(args: argparse.Namespace) -> DaemonConfig:
    """The configuration `serve`'s parsed flags ask for."""
    sources = tuple(parse_source(v) for v in args.source)
    weights = parse_weights(args.weights) if args.weights else None
    if args.mix:
        if sources:
            raise ConfigError("pass sources with --mix FILE or with --source, not both")
        sources, file_weights = load_mix_file(args.mix)
        weights = weights or file_weights
        schedule, limits = load_recipe(args.mix)
        if schedule is not None and args.weights:
            raise ConfigError(f"--weights and the [schedule] of {args.mix} both give weights; "
                              "pass one of them")
    else:
        schedule, limits = None, ()
    return DaemonConfig(
        data_dir=data_path(args.data) if args.data else None, sources=sources, weights=weights,
        schedule=schedule, limits=limits,
        run_dir=resolve_run_dir(args.run_dir),
        tokenizer=args.tokenizer, bos=args.bos, workers=args.workers, slots=args.slots,
        val_files=args.val_files, text_column=args.text_column, linger_s=args.linger_s,
        max_ring_bytes=args.max_ring_mib << 20, consumer_timeout_s=args.consumer_timeout_s,
        max_staging_bytes=args.max_staging_mib << 20, task_bytes=args.task_kib << 10,
        tokenizer_backend=args.tokenizer_backend, on_backend_mismatch=args.on_backend_mismatch,
        on_error=args.on_error, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        cache_dir=Path(args.cache_dir).expanduser() if args.cache_dir else None,
        cache_bytes=int(args.cache_gib * (1 << 30)), manifest=args.manifest,
        val_memory_bytes=args.val_memory_mib << 20,
        exclude=Path(args.exclude).expanduser() if args.exclude else None,
        filter=args.filter, allow_filter_changes=args.allow_filter_changes,
    )


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    if args.detach:
        return _serve_detached(args, argv)
    from tokenfeed.producer.daemon import serve
    from tokenfeed.producer.logs import configure as configure_logging

    configure_logging(args.log_level, args.log_format)
    serve(daemon_config(args))
    # Cleaned up: workers joined, rings, sockets and run dir released. A second SIGTERM (a
    # supervisor's stop after the first) must not turn that clean stop into a kill, and
    # the interpreter's own exit has nothing left to do but costs every stop ~0.15 s
    # (module teardown), or up to a minute of retries after a start stopped mid-scan
    # (pyarrow's S3 finalizer waits for the request still in flight): end here.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _status(args: argparse.Namespace) -> None:
    from tokenfeed.producer.view import render_screen, watch

    run_dir = resolve_run_dir(args.run_dir)

    def fetch() -> dict[str, Any]:
        s = request(run_dir, "status")
        s.pop("v", None)
        s.pop("op", None)
        return s

    if args.watch is not None and not args.json:
        watch(fetch, args.watch)
    while True:
        s = fetch()
        print(json.dumps(s, indent=2) if args.json else render_screen(s), flush=True)
        if args.watch is None:
            return
        time.sleep(args.watch)


def _cache(args: argparse.Namespace) -> None:
    root = Path(args.cache_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--cache-dir {root} is not a directory")
    entries = sorted(root.glob("*.tok"))
    size = sum(p.stat().st_size for p in entries)
    if args.action == "clear":
        for p in entries:
            p.unlink(missing_ok=True)
        print(f"removed {len(entries)} entries ({size / (1 << 20):.1f} MiB) from {root}")
    else:
        print(f"{root}: {len(entries)} row groups cached, {size / (1 << 20):.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args, argv)
        elif args.command == "stop":
            request(resolve_run_dir(args.run_dir), "stop")
            print(f"tokenfeed daemon at {resolve_run_dir(args.run_dir)} stopping")
        elif args.command == "status":
            _status(args)
        elif args.command == "scale":
            reply = request(resolve_run_dir(args.run_dir), "scale", workers=args.workers)
            print(f"worker pool resized to {reply['workers']}")
        elif args.command == "mix":
            weights = dict(parse_weights(args.weights))
            reply = request(resolve_run_dir(args.run_dir), "mix", weights=weights,
                            split=args.split)
            shown = ", ".join(f"{n}={w:g}" for n, w in reply["weights"].items())
            print(f"weights {shown} from the next batch of {len(reply['streams'])} "
                  f"{args.split} streams (and of new ones)")
        elif args.command == "clean":
            from tokenfeed.producer.owners import remove_stale_segments, stale_segments

            names = stale_segments() if args.dry_run else remove_stale_segments()
            done = "found" if args.dry_run else "removed"
            print("\n".join([*names, f"{len(names)} segments of dead daemons {done}"]))
        elif args.command == "cache":
            _cache(args)
        elif args.command == "demo":
            from tokenfeed.tools.demo import run_demo

            return run_demo(args)
        elif args.command == "explain":
            return explain.run(args)
        elif args.command in commands.COMMANDS:
            return commands.run(args)
    except UserInputError as e:
        print(f"tokenfeed: error: {e}", file=sys.stderr)
        return 2
    except DaemonUnavailableError as e:
        print(f"tokenfeed: {e}", file=sys.stderr)
        return 1
    except TokenfeedError as e:
        print(f"tokenfeed: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
