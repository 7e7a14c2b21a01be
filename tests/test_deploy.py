"""deploy/: every `tokenfeed serve` flag exists; the dashboard plots metrics that exist."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import time
from pathlib import Path

import pytest
from test_metrics import scrape

from tokenfeed.producer.cli import build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
STOP_TOKENS = {"&", "&&", ";", "|", "||", "…", "..."}


def _serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def serve_args() -> list[tuple[str, list[str]]]:
    """(where, argument list) of every `tokenfeed serve` in deploy/, comments included."""
    found = []
    for path in sorted(DEPLOY.iterdir()):
        text = path.read_text()
        if path.name == "daemonset.yaml":  # the container's args go to ENTRYPOINT serve
            args = re.findall(r"^\s*- (--[\w-]+(?:=\S+)?)\s*$", text, flags=re.M)
            found.append((path.name, args))
            continue
        joined = re.sub(r"\\\n", " ", text)
        for line in joined.splitlines():
            for m in re.finditer(r"tokenfeed serve\b(.*)", line):
                tail = m.group(1).split("`")[0]  # markdown: the end of an inline command
                try:
                    words = shlex.split(tail, comments=False)
                except ValueError:
                    words = tail.split()
                args = []
                for w in words:
                    if w in STOP_TOKENS or w.startswith("#"):
                        break
                    args.append(w)
                found.append((f"{path.name}: {line.strip()[:60]}", args))
    return found


def test_deploy_files_start_the_daemon_somewhere():
    places = serve_args()
    files = {where.split(":")[0] for where, _ in places}
    assert files >= {"daemonset.yaml", "slurm.sh", "tokenfeed.service"}
    assert any("--metrics-port=9464" in args for _, args in places)


@pytest.mark.parametrize("where,args", serve_args(), ids=lambda v: str(v)[:40])
def test_every_serve_flag_in_deploy_is_one_the_cli_parses(where, args):
    parser = _serve_parser()
    options = parser._option_string_actions
    i = 0
    while i < len(args):
        flag, _, inline = args[i].partition("=")
        if not flag.startswith("--"):
            i += 1
            continue
        assert flag in options, f"{where}: `tokenfeed serve {flag}` is not a flag of the CLI"
        action = options[flag]
        value = inline or None
        if action.nargs != 0 and value is None:
            assert i + 1 < len(args), f"{where}: {flag} lacks its value"
            value = args[i + 1]
            i += 1
        # A literal value is parsed; variables ($DATA) and metavars (DIR, N) are not.
        if value is not None and not re.search(r"[$<{…]|^[A-Z_]+$", value):
            argv = ["serve", "--data", "d", flag, value]
            try:
                build_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"{where}: `{flag} {value}` is rejected by the CLI")
        i += 1


def test_scrape_config_and_daemonset_agree_on_the_metrics_port():
    daemonset = (DEPLOY / "daemonset.yaml").read_text()
    monitoring = (DEPLOY / "monitoring.yaml").read_text()
    assert 'prometheus.io/port: "9464"' in daemonset and "containerPort: 9464" in daemonset
    assert "name: metrics" in daemonset and "- port: metrics" in monitoring
    assert "--metrics-host=0.0.0.0" in daemonset  # loopback would hide it from the scraper


def test_grafana_dashboard_uses_only_metrics_a_daemon_serves(start_daemon):
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {name for e in exprs for name in re.findall(r"\btokenfeed_[a-z_]+\b", e)}
    assert len(used) >= 8, used
    daemon = start_daemon("--metrics-port", "0", workers=1)
    with daemon.feed(2, 64) as feed:
        next(feed)
        deadline = time.monotonic() + 60
        while not (served := scrape(daemon)).get("tokenfeed_ring_depth_batches"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert used <= set(served), f"not in /metrics: {sorted(used - set(served))}"
