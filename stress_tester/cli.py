"""The `stress` command. Bad input exits 2 with one line naming file, field and reason."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional
from urllib.parse import urlsplit

import typer

from simulator.cli import check_out_dir, friendly
from simulator.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="servesim stress tester: replay a scenario's request stream against a live server.")


@app.callback()
def main():
    """Replay a scenario against a live server."""


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError("--base-url", url, "expected http://host[:port][/prefix]")
    try:
        parts.port
    except ValueError:
        raise InputError("--base-url", url, "bad port") from None
    return url


def check_target(api: str, base_url: str, prompt_word: str) -> None:
    """--api, --base-url and --prompt-word, checked before anything is sent."""
    from .dialects import DIALECTS
    from .prompts import check_word
    if api not in DIALECTS:
        raise InputError("--api", api, f"unknown API (known: {', '.join(DIALECTS)})")
    check_url(base_url)
    why = check_word(prompt_word)
    if why:
        raise InputError("--prompt-word", prompt_word, why)


@app.command()
@friendly
def run(scenario: Path = typer.Argument(..., help="scenario YAML"),
        base_url: str = typer.Option(..., "--base-url", help="server root, e.g. http://127.0.0.1:8000"),
        api: str = typer.Option("openai-chat", "--api",
                                help="openai-chat | openai-completions | ollama-chat | ollama-generate | llamacpp | queue | responses"),
        model: Optional[str] = typer.Option(None, "--model", help="model name sent (default: the class's model)"),
        out: Optional[Path] = typer.Option(None, "--out", help="report folder (default reports/<name>-stress)"),
        concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1, help="cap on requests in flight"),
        max_duration: Optional[float] = typer.Option(None, "--max-duration", min=0.0, help="stop sending after S seconds"),
        grace: float = typer.Option(5.0, "--grace", min=0.0, help="seconds in-flight requests get after a stop"),
        workers: int = typer.Option(1, "--workers", min=1, max=64, help="sending processes"),
        retry: bool = typer.Option(False, "--retry", help="retry 429/503 after Retry-After (bounded)"),
        max_retries: int = typer.Option(3, "--max-retries", min=1, max=20),
        seed: Optional[int] = typer.Option(None, "--seed", help="override the scenario's seed"),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="override a field: path=value (YAML value)"),
        no_stream: bool = typer.Option(False, "--no-stream", help="ask for whole answers even for streaming classes"),
        no_extensions: bool = typer.Option(False, "--no-extensions",
                                           help="omit ignore_eos/min_tokens (servers that reject unknown fields)"),
        poll: float = typer.Option(0.02, "--poll", min=0.001, help="queue API: status poll interval (s)"),
        prompt_word: str = typer.Option(" the", "--prompt-word",
                                        help="a text the server's tokenizer makes one token (byte-vocab test models: a)"),
        no_probe: bool = typer.Option(False, "--no-probe", help="do not ask the server about itself (server.json)"),
        prompt_salt: Optional[int] = typer.Option(None, "--prompt-salt", min=-1,
                                                  help="number in every prompt marker (default: new per run, so no "
                                                       "run hits an earlier run's prompts in a prefix cache; -1: none)"),
        progress_file: Optional[Path] = typer.Option(None, "--progress-file", help="write sent/done counts here"),
        no_plots: bool = typer.Option(False, "--no-plots", help="skip PNG plots"),
        quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Send SCENARIO's requests to a server at their scheduled times; write the same report as `sim run`."""
    from simulator.scenario import load_scenario

    from .run import run_stress, start_up
    from .runner import Options
    check_target(api, base_url, prompt_word)
    with start_up() as stopped:  # a signal while loading is answered with a report of unsent requests
        sc = load_scenario(scenario, set_, seed)
    if stopped:
        sc = load_scenario(scenario, set_, seed)
    out = out or Path("reports") / f"{sc.name}-stress"
    check_out_dir(out)
    opts = Options(base_url=base_url, api=api, model=model, concurrency=concurrency, max_duration=max_duration,
                   grace=grace, retry=retry, max_retries=max_retries, no_stream=no_stream,
                   extensions=not no_extensions, poll_s=poll, prompt_word=prompt_word, probe=not no_probe,
                   prompt_salt=prompt_salt,
                   progress_file=str(progress_file) if progress_file else None)
    summary = run_stress(sc, opts, out, workers=workers, plots=not no_plots, stopped_early=stopped[0] if stopped else None)
    if not quiet:
        from rich.console import Console

        from simulator.report import terminal_table
        terminal_table(summary, Console())
        st = summary["stress"]
        lag = st.get("lag_ms", {})
        print(f"schedule lag p50 {lag.get('p50')} ms, p99 {lag.get('p99')} ms; rate requested "
              f"{st.get('requested_rate')}/s, achieved {st.get('achieved_rate')}/s"
              + (f"; stopped: {st['stop_reason']}" if st["stop_reason"] else ""), file=sys.stderr)
    print(f"report: {out}/report.md")
    if summary["stress"]["stop_reason"].startswith("interrupted"):
        print(f"stopped early: {summary['stress']['stop_reason']}; the report is partial", file=sys.stderr)
        raise typer.Exit(130)


def _floats(text: str, name: str, integer: bool = False) -> list:
    try:
        vals = [int(x) if integer else float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(name, text, "expected a comma-separated list of numbers") from None
    if any(v <= 0 for v in vals):
        raise InputError(name, text, "values must be > 0")
    return vals


@app.command()
@friendly
def probe(base_url: str = typer.Option(..., "--base-url", help="server root, e.g. http://127.0.0.1:8000"),
          out: Path = typer.Option(..., "--out", help="folder for the probe runs (one stress run folder each)"),
          api: str = typer.Option("openai-completions", "--api", help="dialect (as stress run)"),
          model: Optional[str] = typer.Option(None, "--model", help="model name sent"),
          users: str = typer.Option("1,4,16,64,128", "--users", help="decode probe concurrencies"),
          contexts: str = typer.Option("256,2048", "--contexts", help="decode probe prompt lengths"),
          rates: str = typer.Option("2,6", "--rates", help="Poisson probe rates (req/s)"),
          heldout_rates: str = typer.Option("", "--heldout-rates", help="held-out Poisson rates (req/s), for sim replay"),
          prompt_max: Optional[int] = typer.Option(None, "--prompt-max", min=32, help="longest prefill probe prompt"),
          only: Optional[List[str]] = typer.Option(None, "--only", help="run only folders starting with this"),
          set_: Optional[List[str]] = typer.Option(None, "--set", help="override a field of every probe scenario"),
          prompt_word: str = typer.Option(" the", "--prompt-word", help="one token of the server's tokenizer"),
          no_extensions: bool = typer.Option(False, "--no-extensions", help="omit ignore_eos/min_tokens")):
    """Run the calibration probes (prefill sweep, decode sweeps, Poisson) against a server, for `sim calibrate`."""
    from .probe import run_probe
    from .runner import Options
    check_target(api, base_url, prompt_word)
    check_out_dir(out)
    opts = Options(base_url=base_url, api=api, model=model, grace=2.0, extensions=not no_extensions,
                   prompt_word=prompt_word)
    done = run_probe(opts, out, _floats(users, "--users", True), _floats(contexts, "--contexts", True),
                     _floats(rates, "--rates"), _floats(heldout_rates, "--heldout-rates"), set_ or (), prompt_max, only)
    print(f"{len(done)} probe runs in {out}; next: sim calibrate {out}/probe_* --out profile.yaml")


if __name__ == "__main__":  # pragma: no cover
    app()
