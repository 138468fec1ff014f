"""Real servers for tests: llama.cpp's own HTTP server (from the `xllamacpp` wheel) on a tiny
random-weight Llama that the tests write themselves with the `gguf` package. No weights are downloaded.

    from realservers import LlamaServer, make_tiny_gguf

    make_tiny_gguf(tmp / "tiny.gguf")
    with LlamaServer(tmp / "tiny.gguf", parallel=4, ctx=2048) as srv:
        ...  # real HTTP against srv.url: /v1/chat/completions, /completion, /props, /metrics ...

The `xllamacpp` wheel ships no `llama-server` executable: its `xllamacpp.Server(CommonParams)` starts
llama.cpp's native server (tools/server: cpp-httplib, slots, continuous batching) inside the calling
process. `python tests/realservers.py llama-server --model M --host H --port P --parallel N -c CTX`
is that server as a command of its own (the flags are llama-server's), so `LlamaServer` runs it as a
subprocess: its own process and threads, so a load-generating client in the test never shares the GIL
with it, and a crash or a hang of the server cannot take the test process with it.

The model (`make_tiny_gguf`): Llama architecture, 2 layers of width 64 (~0.5 MB of f32, loads in ~10 ms,
generates thousands of tokens/s on one CPU thread). Its vocabulary is byte-level, so any text tokenizes:
the 256 byte tokens, plus the SentencePiece word-start piece "▁" and the chain "▁t", "▁th", "▁the" so
that the stress tester's synthetic prompts (" the" repeated) are one token a word as in real vocabularies,
plus `extra_vocab` unused tokens that render as empty text (real servers stream such tokens too: a
token is not always a text chunk). The end-of-sequence token's output row is zero, so its logit is 0
while ~half of the others' are positive: default top-k sampling (40 of ~320) never picks it, and
outputs run to the requested length even where a dialect cannot send `ignore_eos`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
WORD_PIECES = ("\u2581", "\u2581t", "\u2581th", "\u2581the")


def make_tiny_gguf(path, *, embd: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 4, ff: int = 128,
                   ctx: int = 4096, extra_vocab: int = 64, seed: int = 0, f16: bool = False) -> Path:
    """Write a random-weight Llama GGUF (f32, or f16 matrices) to `path`; the same arguments give the same
    bytes. Also the full-size model bench/gpu/ measures real llama-servers with (make_random_gguf.py)."""
    import gguf
    import numpy as np

    path = Path(path)
    rng = np.random.default_rng(seed)
    T = gguf.TokenType
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    scores = [0.0] * len(tokens)
    for i, piece in enumerate(WORD_PIECES):  # longer pieces score higher: SPM merges up to "▁the"
        tokens.append(piece.encode())
        types.append(T.NORMAL)
        scores.append(float(i + 1))
    tokens += [f"<extra_{i}>".encode() for i in range(extra_vocab)]
    types += [T.UNUSED] * extra_vocab
    scores += [0.0] * extra_vocab
    n_vocab = len(tokens)
    head_dim = embd // heads

    def rnd(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16 if f16 else np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("servesim-tiny-random-llama")
    w.add_context_length(ctx)
    w.add_embedding_length(embd)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_tensor("token_embd.weight", rnd(n_vocab, embd))
    kv = kv_heads * head_dim
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rnd(embd, embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", rnd(kv, embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", rnd(kv, embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", rnd(embd, embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rnd(ff, embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rnd(ff, embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rnd(embd, ff))
    w.add_tensor("output_norm.weight", np.ones(embd, dtype=np.float32))
    out = rnd(n_vocab, embd)
    out[2] = 0.0  # end-of-sequence: logit 0, below top-k's cut (see the module's docstring)
    w.add_tensor("output.weight", out)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------- the server as a command
def serve(argv=None) -> None:
    """llama.cpp's server on `--model` until SIGTERM/SIGINT; prints `ready at URL` once it accepts."""
    p = argparse.ArgumentParser(prog="realservers.py llama-server")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port, printed")
    p.add_argument("--parallel", "-np", type=int, default=1)
    p.add_argument("--ctx-size", "-c", type=int, default=2048, help="total context, split over the slots")
    p.add_argument("--threads", "-t", type=int, default=1)
    p.add_argument("--batch-size", "-b", type=int, default=2048)
    p.add_argument("--threads-http", type=int, default=-1, help="HTTP worker threads (-1: max(parallel+2, cores-1))")
    a = p.parse_args(argv)
    import xllamacpp

    prm = xllamacpp.CommonParams()
    prm.model.path = a.model
    prm.hostnames = [a.host]
    prm.port = a.port
    prm.n_parallel = a.parallel
    prm.n_ctx = a.ctx_size
    prm.n_batch = a.batch_size
    prm.n_threads_http = a.threads_http
    prm.cpuparams.n_threads = a.threads
    prm.cpuparams_batch.n_threads = a.threads
    prm.endpoint_props = prm.endpoint_slots = prm.endpoint_metrics = True
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = xllamacpp.Server(prm)
    # one write(): the server's own log threads share this file, and print() writes the line and its
    # newline separately, so a log line could land between them (seen in CI)
    sys.stdout.write(f"ready at {server.listening_address}\n")
    sys.stdout.flush()
    while not stop.wait(1.0):
        pass
    del server  # its destructor stops the HTTP server and the slot loop


# ---------------------------------------------------------------------- the test's handle on it
def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def get_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric(text: str, name: str) -> float:
    """One un-labelled sample of a Prometheus text exposition (llama.cpp's /metrics)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


class ServerProcess:
    """A server command as a subprocess for a `with` block: `.url` once /health answers, `.start_s`
    (spawn -> healthy), `.log` (its stdout+stderr, a file: never a pipe that could fill and block it).
    Subclasses give `cmd()` and `ready_url(line)` (the URL from the log line that says it listens).
    On a failed start, or when the block raises, the log's tail is printed so the failure shows
    what the server said."""
    name = "server"
    start_timeout_s = START_TIMEOUT_S

    def __init__(self, log):
        self.log = Path(log)
        self.url = ""
        self.start_s = float("nan")
        self.proc: subprocess.Popen | None = None

    def cmd(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    @staticmethod
    def ready_url(line: str) -> str | None:
        raise NotImplementedError

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self):
        t0 = time.monotonic()
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(self.cmd(), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env())
        try:
            self.url = self._wait_ready(t0 + self.start_timeout_s)
        except BaseException:
            self.stop()
            print(f"--- {self.name} log ({self.log}) ---\n{self.log_tail()}", file=sys.stderr)
            raise
        self.start_s = time.monotonic() - t0
        return self

    def _wait_ready(self, deadline: float) -> str:
        url = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready")
            if not url:
                for line in self.log_tail(1 << 20).splitlines():
                    url = self.ready_url(line) or url
            if url:
                try:
                    if get_json(url + "/health", timeout=1.0).get("status") == "ok":
                        return url
                except (OSError, ValueError):
                    pass  # loading (503), or not accepting yet
            time.sleep(0.02)
        raise TimeoutError(f"{self.name} not healthy within {self.start_timeout_s:g} s")

    def stop(self) -> int | None:
        p = self.proc
        if p is None or p.poll() is not None:
            return p.returncode if p else None
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait()

    def __exit__(self, et, ev, tb):
        rc = self.stop()
        if et is not None or rc not in (0, None, -signal.SIGTERM):
            print(f"--- {self.name} log ({self.log}), exit {rc} ---\n{self.log_tail()}", file=sys.stderr)
        return False


class LlamaServer(ServerProcess):
    """`realservers.py llama-server` (llama.cpp's server) on a GGUF: LlamaServer(model, parallel=4, ctx=2048)."""
    name = "llama-server"

    def __init__(self, model, *, parallel: int = 4, ctx: int = 2048, threads: int = 1, threads_http: int = -1, log=None):
        self.model, self.parallel, self.ctx, self.threads = Path(model), parallel, ctx, threads
        self.threads_http = threads_http
        super().__init__(log if log is not None else self.model.with_suffix(".server.log"))

    def cmd(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "llama-server", "--model", str(self.model),
                "--host", "127.0.0.1", "--port", "0", "--parallel", str(self.parallel), "-c", str(self.ctx),
                "--threads", str(self.threads), "--threads-http", str(self.threads_http)]

    @staticmethod
    def ready_url(line):
        m = re.search(r"ready at (http://[\w.\-]+:\d+)", line)  # anywhere in the line: see serve()
        return m.group(1) if m else None


# ---------------------------------------------------------------------- transformers `serve`
def make_tiny_hf_llama(path, *, hidden: int = 64, layers: int = 2, heads: int = 4, ff: int = 128, seed: int = 0) -> Path:
    """A random-weight LlamaForCausalLM folder (safetensors, ~0.5 MB) with its own tokenizer, for
    `transformers serve`: byte-level BPE (one byte one token) with merges up to "Ġthe" (the stress
    tester's " the" is one token), a plain chat template, and an all-zero output row for
    end-of-sequence (as in make_tiny_gguf: top-k sampling never picks it)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    path = Path(path)
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [("\u0120", "t"), ("\u0120t", "h"), ("\u0120th", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(path)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight[1] = 0.0
    model.save_pretrained(path)
    return path


class TransformersServer(ServerProcess):
    """`transformers serve FOLDER` (FastAPI/uvicorn, OpenAI chat and completions) on the CPU, offline,
    one torch thread; the model is preloaded (FORCE_MODEL), so requests name it by its folder path."""
    name = "transformers serve"
    start_timeout_s = 120.0  # imports torch and transformers: ~4 s here, far more on a loaded machine

    def __init__(self, model_dir, *, log=None, extra=()):
        self.model_dir, self.extra = Path(model_dir), list(extra)
        super().__init__(log if log is not None else self.model_dir.parent / "transformers-serve.log")

    @property
    def model(self) -> str:
        return str(self.model_dir)

    def cmd(self):
        exe = Path(sys.executable).with_name("transformers")
        head = [str(exe)] if exe.exists() else [sys.executable, "-c", "from transformers.cli.transformers import main; main()"]
        return head + ["serve", str(self.model_dir), "--host", "127.0.0.1", "--port", "0", "--device", "cpu",
                       "--log-level", "info", *self.extra]

    def env(self):
        return {**super().env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1"}

    @staticmethod
    def ready_url(line):
        if "Uvicorn running on http" in line:
            return line.split("running on ", 1)[1].split()[0]
        return None


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "llama-server":
        serve(sys.argv[2:])
    elif len(sys.argv) > 2 and sys.argv[1] == "gguf":
        print(make_tiny_gguf(sys.argv[2]))
    else:
        sys.exit("usage: realservers.py llama-server --model M [--port P --parallel N -c CTX] | gguf OUT.gguf")
