"""Registers `sim import` on the `sim` app: other tools' measurements as run folders (README, "Run folders").

    sim import vllm-bench FILE.json --out RUN_DIR    # vllm bench serve --save-result --save-detailed
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli import app, check_out_dir, friendly
from .errors import InputError

import_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Convert other tools' measurements into run folders for sim calibrate / sim replay.")
app.add_typer(import_app, name="import")


@import_app.command("vllm-bench")
@friendly
def vllm_bench(file: Path = typer.Argument(..., help="JSON written by vllm bench serve --save-result --save-detailed"),
               out: Optional[Path] = typer.Option(None, "--out", help="run folder to write (default reports/<file name>-vllm-bench)"),
               kind: str = typer.Option("vllm", "--server-kind", help="server.json kind: the server the benchmark ran "
                                                                      "against (vllm, openai, unknown, ...)"),
               no_plots: bool = typer.Option(False, "--no-plots", help="skip the report's PNG plots")):
    """Convert a vLLM bench serve result into a run folder (requests.csv, client.csv, tokens.parquet, server.json)."""
    from .import_vllm_bench import write_run_folder
    from .runfolder import SERVER_KINDS
    if kind not in SERVER_KINDS:
        raise InputError("--server-kind", kind, f"unknown server kind (known: {', '.join(SERVER_KINDS)})")
    out = out or Path("reports") / f"{file.stem or 'vllm'}-vllm-bench"
    check_out_dir(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(str(out), "--out", "exists and is not empty (choose another --out)")
    info = write_run_folder(file, out, kind, plots=not no_plots)
    print(f"run folder: {out} ({info['n']} requests, {info['ok']} ok; send times {info['send_times']})")
