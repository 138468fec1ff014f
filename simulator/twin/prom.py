"""vLLM's Prometheus metrics, from the twin's own state, so a dashboard or autoscaler built for vLLM
works against `sim serve` unchanged.

Names, types, label names (`model_name`, `engine`) and bucket layouts follow vLLM's V1
`PrometheusStatLogger` (vllm-project/vllm, vllm/v1/metrics/loggers.py, read at commit 005a810b):
scheduler gauges vllm:num_requests_running / _waiting and vllm:kv_cache_usage_perc per engine
(here: per replica), counters vllm:prompt_tokens, vllm:generation_tokens, vllm:num_preemptions,
vllm:prefix_cache_queries / _hits (tokens) and
vllm:request_success{finished_reason=stop|length|abort}, histograms vllm:time_to_first_token_seconds,
vllm:time_per_output_token_seconds (and vllm:inter_token_latency_seconds, the newer releases' name,
one observation per gap, with the same buckets), vllm:e2e_request_latency_seconds and
vllm:request_queue_time_seconds, vllm:request_prompt_tokens / _generation_tokens (1-2-5 buckets up to
the context length), and the info gauge vllm:cache_config_info (block_size, num_gpu_blocks, ...).

What counts: a request the engine finished is a success with reason `stop` or `length` as its client
was told; a request that ended early once admitted (the client hung up, the world timed it out, the
server shut down) is `abort`. Gateway rejections never reach vLLM's engine and are not counted here
(servesim_rejections_total has them). Latencies are those of successful requests on the simulated
clock, as in requests.csv. The collector is read at scrape time; nothing here runs per token.
"""
from __future__ import annotations

from bisect import bisect_left

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# Bucket upper bounds, as vLLM's loggers.py lists them.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
LABELS = ["model_name", "engine"]


def buckets_1_2_5(max_value: int) -> tuple:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's build_1_2_5_buckets)."""
    out, e = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10 ** e
            if v > max_value:
                return tuple(out)
            out.append(v)
        e += 1


class Hist:
    """Counts per bucket (the last one +Inf) and the sum, filled one value or many at a time."""
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, x: float) -> None:
        self.counts[bisect_left(self.bounds, x)] += 1  # le is inclusive: x == bound lands in that bucket
        self.sum += x

    def observe_gaps(self, times) -> None:
        """Every gap between consecutive times (a request's token times): a loop for short answers,
        numpy for long ones."""
        n = len(times)
        if n < 2:
            return
        if n < 64:
            b, c = self.bounds, self.counts
            prev, tot = times[0], 0.0
            for x in times[1:]:
                g = x - prev
                c[bisect_left(b, g)] += 1
                tot += g
                prev = x
            self.sum += tot
            return
        gaps = np.diff(np.asarray(times, dtype=float))
        for i, k in enumerate(np.bincount(np.searchsorted(self.bounds, gaps, side="left"), minlength=len(self.counts))):
            self.counts[i] += int(k)
        self.sum += float(gaps.sum())

    def buckets(self) -> list:
        out, c = [], 0
        for b, n in zip(self.bounds, self.counts):
            c += n
            out.append((repr(b), c))
        return out + [("+Inf", c + self.counts[-1])]


def cache_info(sc, replicas) -> list[dict]:
    """vllm:cache_config_info labels per replica, for engines that model a KV cache."""
    e = sc.engine
    out = []
    for r in replicas:
        eng = r.engine
        kv = getattr(eng, "kv", None)
        if kv is not None:
            blocks, bs = kv.num_blocks, eng.bs
        elif e.type == "llamacpp":
            bs = 1
            blocks = e.n_ctx
        else:
            continue
        out.append({"block_size": str(bs), "num_gpu_blocks": str(blocks), "num_cpu_blocks": "0",
                    "enable_prefix_caching": str(bool(e.prefix_caching)), "cache_dtype": "auto",
                    "engine": str(r.index)})
    return out


def max_model_len(sc, replicas) -> int | None:
    """Tokens of context one request may use: llama.cpp's n_ctx, or the KV cache's capacity."""
    e = sc.engine
    if e.type == "llamacpp":
        return int(e.n_ctx)
    for r in replicas:
        kv = getattr(r.engine, "kv", None)
        if kv is not None:
            return int(kv.num_blocks * r.engine.bs)
    return None


class _Key:
    """The counters and histograms of one (model_name, engine) pair."""
    __slots__ = ("prompt", "generation", "preemptions", "success", "hists")
    NAMES = ("ttft", "tpot", "itl", "e2e", "queue", "prompt_tokens", "generation_tokens")

    def __init__(self, len_buckets):
        self.prompt = self.generation = self.preemptions = 0
        self.success: dict = {}
        self.hists = [Hist(b) for b in (TTFT_BUCKETS, TPOT_BUCKETS, TPOT_BUCKETS, REQUEST_LATENCY_BUCKETS,
                                        REQUEST_LATENCY_BUCKETS, len_buckets, len_buckets)]


class VllmMetrics:
    """Request-level vLLM metrics, fed as requests finish; `collect()` adds the live gauges."""

    def __init__(self, world):
        self.world = world
        self.sc = world.sc
        self.max_len = max_model_len(self.sc, world.replicas) or max(
            [m.max_max_tokens or 0 for m in self.sc.tenants.models] + [4096])
        self.len_buckets = buckets_1_2_5(self.max_len)
        self.default_model = next((m.name for m in self.sc.tenants.models if m.enabled), "")
        self.keys: dict = {}  # (model, engine) -> _Key

    def observe(self, req, finish_reason: str | None, times) -> None:
        """`req` finished; `finish_reason` is what its client was told (None: not ok)."""
        o = req.outcome
        if req.start is None and o != "ok":
            return  # never reached an engine (rejected, or gave up in a queue): vLLM would not count it
        key = (req.model, str(req.replica if req.replica > 0 else 0))
        k = self.keys.get(key)
        if k is None:
            k = self.keys[key] = _Key(self.len_buckets)
        k.prompt += req.prompt
        k.generation += req.generated
        k.preemptions += req.preemptions
        ttft, tpot, itl, e2e, queue, ptok, gtok = k.hists
        if req.first_token is not None:
            ttft.observe(req.first_token - req.arrival)
        reason = (finish_reason or "stop") if o == "ok" else "abort"
        k.success[reason] = k.success.get(reason, 0) + 1
        if o == "ok":
            e2e.observe(req.end - req.arrival)
            queue.observe(req.start - req.arrival)
            ptok.observe(req.prompt)
            gtok.observe(req.generated)
            if req.generated > 1:
                tpot.observe((req.last_token - req.first_token) / (req.generated - 1))
                if times is not None:
                    itl.observe_gaps(times)

    # ---------------------------------------------------------------- prometheus_client collector
    def collect(self):
        w = self.world
        running = GaugeMetricFamily("vllm:num_requests_running", "Number of requests in model execution batches.",
                                    labels=LABELS)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                                    labels=LABELS)
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=LABELS)
        for r in w.replicas:
            lab = [r.model if r.model != "*" else self.default_model, str(r.index)]
            running.add_metric(lab, len(r.engine.running))
            waiting.add_metric(lab, len(r.engine.queue))
            kv.add_metric(lab, float(r.engine.kv_util()))
        yield from (running, waiting, kv)
        # vLLM V1's prefix-cache counters (vllm/v1/metrics/loggers.py): tokens looked up when a request is
        # scheduled, and those its cache served; continuous-batching replicas only (they model the cache)
        queries = CounterMetricFamily("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of "
                                      "queried tokens.", labels=LABELS)
        hits = CounterMetricFamily("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                                   labels=LABELS)
        cached = [r for r in w.replicas if hasattr(r.engine, "admitted_tokens")]
        for r in cached:
            lab = [r.model if r.model != "*" else self.default_model, str(r.index)]
            queries.add_metric(lab, r.engine.admitted_tokens)
            hits.add_metric(lab, r.engine.hit_tokens)
        if cached:
            yield from (queries, hits)
        infos = cache_info(self.sc, w.replicas)
        if infos:
            g = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                  labels=list(infos[0]))
            for d in infos:
                g.add_metric(list(d.values()), 1)
            yield g
        keys = sorted(self.keys.items())
        for name, doc, attr in (("vllm:prompt_tokens", "Number of prefill tokens processed.", "prompt"),
                                ("vllm:generation_tokens", "Number of generation tokens processed.", "generation"),
                                ("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                                 "preemptions")):
            c = CounterMetricFamily(name, doc, labels=LABELS)
            for key, k in keys:
                c.add_metric(list(key), getattr(k, attr))
            yield c
        c = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                labels=LABELS + ["finished_reason"])
        for key, k in keys:
            for reason, n in sorted(k.success.items()):
                c.add_metric([*key, reason], n)
        yield c
        for short, name, doc in (
                ("ttft", "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds."),
                ("tpot", "vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds."),
                ("itl", "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
                ("e2e", "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
                ("queue", "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request."),
                ("prompt_tokens", "vllm:request_prompt_tokens", "Number of prefill tokens processed."),
                ("generation_tokens", "vllm:request_generation_tokens", "Number of generation tokens processed.")):
            h = HistogramMetricFamily(name, doc, labels=LABELS)
            i = _Key.NAMES.index(short)
            for key, k in keys:
                hist = k.hists[i]
                h.add_metric(list(key), hist.buckets(), hist.sum)
            yield h
