"""`sim serve SCENARIO`: a live HTTP server whose gateway, scheduler, batching and token timing are
the scenario's simulated world running in real time (registers on the `sim` app)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .cli import app, friendly
from .errors import InputError


@app.command()
@friendly
def serve(scenario: Path = typer.Argument(..., help="scenario YAML"),
          host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
          port: int = typer.Option(8000, "--port", help="TCP port (0: any free port, printed at start)"),
          usage_db: Path = typer.Option(Path("reports/usage.db"), "--usage-db",
                                        help="SQLite file for request lifecycle and per-user/project usage"),
          out: Optional[Path] = typer.Option(None, "--out", help="write requests.csv, summary.json, report.md here on shutdown"),
          seed: Optional[int] = typer.Option(None, "--seed", help="override the scenario's seed"),
          set_: Optional[List[str]] = typer.Option(None, "--set", help="override a field: path=value (YAML value)"),
          plots: bool = typer.Option(True, "--plots/--no-plots", help="PNG plots in the --out report"),
          default_user: Optional[str] = typer.Option(None, "--default-user",
                                                     help="scenario user of requests that carry no identity "
                                                          "(default: the scenario's first user)"),
          idle_timeout: float = typer.Option(15.0, "--idle-timeout", help="seconds a connection may stay idle, or take "
                                             "to send a request's head or body, before it is closed"),
          max_connections: int = typer.Option(1000, "--max-connections", help="open connections at most; past it a "
                                              "new one closes the oldest idle one")):
    """Serve SCENARIO over HTTP: OpenAI, Ollama, llama.cpp, queue-style and Responses APIs, /metrics,
    /queue/status, /usage/*. Prompt tokens = whitespace-separated words (or the X-Prompt-Tokens header);
    output tokens = the requested maximum. Identity: X-User, X-Project, X-Class, X-Priority headers.
    Clients are the arrivals (the scenario's own arrival processes are not run); runs until Ctrl-C/SIGTERM."""
    from .scenario import load_scenario
    from .twin import TwinServer, serve_forever
    if not 0 <= port <= 65535:
        raise InputError(str(scenario), "--port", f"{port} is not a TCP port")
    if not 0.05 <= idle_timeout <= 86400:
        raise InputError(str(scenario), "--idle-timeout", f"{idle_timeout} is not in 0.05..86400 seconds")
    if not 1 <= max_connections <= 1_000_000:
        raise InputError(str(scenario), "--max-connections", f"{max_connections} is not in 1..1000000")
    sc = load_scenario(scenario, set_, seed)
    server = TwinServer(sc, host, port, usage_db, out, plots, source=str(scenario), default_user=default_user,
                         idle_timeout_s=idle_timeout, max_connections=max_connections)

    def ready(url):
        print(f"sim serve: {sc.name} listening on {url} (usage db {usage_db}; requests without identity headers "
              f"are user {server.twin.tenancy.default_user!r}); Ctrl-C to stop", flush=True)
    serve_forever(server, ready)
    if out is not None:
        print(f"report: {out}/report.md", file=sys.stderr)
