"""The verdict that opens report.md: were the SLOs met, per class; what limited the run (queueing, KV capacity,
rate limits, degradation); how busy the engines were; whether the system was saturated.

Read from summary.json alone, so the same verdict is written for `sim run`, `stress run` and the twin server
(a client sees no engine: utilisation and queue wait are then said to be unobservable, not guessed).
"""
from __future__ import annotations

from .metrics import first_token_latency
from .slo import SHED, Target, evaluate

SATURATED = 0.95  # engine busy share at or above which a run is called saturated
BUSY = 0.85


def fmt_ms(x) -> str:
    """A latency in seconds as people read it: 1.23 s, 456 ms, 7.8 ms."""
    if x is None:
        return "–"
    if x >= 10:
        return f"{x:.1f} s"
    if x >= 1:
        return f"{x:.2f} s"
    ms = x * 1000
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 1 else f"{ms:.2f} ms"


def pct(x, nd=1) -> str:
    return "–" if x is None else f"{x * 100:.{nd}f} %"


def slo_text(slo: dict) -> str:
    return ", ".join(f"{k.upper()} ≤ {fmt_ms(slo[f'{k}_s'])}" for k in ("ttft", "tpot", "e2e") if slo.get(f"{k}_s") is not None)


def class_targets(s: dict) -> list[Target]:
    slo = s["goodput"]["slo"]
    return [Target(None, m, "p95", slo[f"{m}_s"]) for m in ("ttft", "tpot", "e2e") if slo.get(f"{m}_s") is not None]


def per_class(s: dict, streamed: dict[str, bool]) -> list[tuple[str, bool, list[str]]]:
    """[(class, met, [what missed])] with the scenario's SLO as p95 targets and at most 1 % shed."""
    out = []
    targets = class_targets(s)
    for cls, d in s["latency_by_class"].items():
        missed = []
        scoped = [Target(cls, t.metric, t.stat, t.limit) for t in targets
                  if streamed.get(cls, True) or t.metric not in ("ttft", "tpot")]
        res = evaluate(s, scoped, streamed)
        for t in scoped:
            r = res[t.name]
            if not r["met"]:
                missed.append(f"{t.metric.upper()} p95 {fmt_ms(r['value'])} > {fmt_ms(t.limit)}" if r["value"] is not None
                              else f"no completed request for {t.metric.upper()}")
        o = s["outcomes_by_class"].get(cls, {})
        cut = o.get("not_sent", 0) if s["goodput"].get("excluded_not_sent_max_duration") else 0
        gen = max(sum(o.values()) - cut, 1)
        shed = sum(o.get(k, 0) for k in SHED) / gen
        policy = (o.get("rejected_rate_limited", 0) + o.get("rejected_quota", 0)) / gen
        if shed > 0.01:
            missed.append(f"{pct(shed)} shed")
        if policy > 0.01:
            missed.append(f"{pct(policy)} refused by rate limit or quota")
        if not o.get("ok"):
            missed.append("no request completed")  # nothing met, whatever the targets say
        out.append((cls, not missed, missed))
    return out


def bottlenecks(s: dict) -> list[str]:
    """What limited the run, most requests affected first; each a short clause."""
    gen = max(s["goodput"].get("denominator", s["requests"]["generated"]), 1)
    o = s["requests"]["outcomes"]
    found = []
    rl, quota = o.get("rejected_rate_limited", 0), o.get("rejected_quota", 0)
    if rl + quota:
        found.append((rl + quota, f"rate limits / quotas refused {rl + quota} requests ({pct((rl + quota) / gen)})"))
    deg, full = o.get("rejected_degraded", 0), o.get("rejected_queue_full", 0)
    if deg + full:
        found.append((deg + full, f"degradation and admission shed {deg + full} requests ({pct((deg + full) / gen)}: "
                                  f"{deg} degraded, {full} queue full)"))
    kv = s.get("kv_cache") or []
    if kv:
        peak = max(k.get("peak_util", 0) for k in kv)
        pre = sum(k.get("preemptions", 0) for k in kv)
        big = sum(k.get("rejected_too_large", 0) for k in kv)
        if peak >= 0.9 or pre or big:
            found.append((pre + big + 1, f"KV cache capacity: peak use {pct(peak, 0)}, {pre} preemptions, "
                                         f"{big} prompts too large"))
    lat = first_token_latency(s)
    wait, ttft = lat.get("queue_wait", {}).get("p95"), lat.get("ttft", {}).get("p95")
    busy = (s.get("engine") or {}).get("busy_share")
    behind = f", behind engines busy {pct(busy, 0)} of the time" if busy is not None and busy >= BUSY else ""
    if wait is not None and ttft and wait >= 0.5 * ttft and wait > 0.05:
        found.append((s["requests"]["ok"] * 0.95, f"queueing: p95 queue wait {fmt_ms(wait)}, "
                                                  f"{wait / ttft * 100:.0f} % of the streamed p95 TTFT{behind}"))
    elif busy is not None and busy >= SATURATED and (saturation(s) or "").startswith("**saturated"):
        found.append((1, f"compute: engines busy {pct(busy, 0)} of the time"))
    t = o.get("timeout", 0)
    if t:
        found.append((t, f"{t} requests timed out"))
    err = sum(o.get(k, 0) for k in ("http_error", "connection_error", "stream_error"))
    if err:
        found.append((err, f"{err} requests failed (HTTP, connection or stream errors)"))
    return [text for _, text in sorted(found, key=lambda x: -x[0])]


def utilisation(s: dict) -> str:
    eng = s.get("engine")
    if not eng:
        return "utilisation: not observable from the client (no engine-side data in a stress run)"
    reps = eng.get("replicas") or []
    sim = eng.get("simulated_s") or 0
    shares = [r["busy_s"] / sim for r in reps if sim and "busy_s" in r]
    each = ", ".join(f"{x * 100:.0f} %" for x in shares)
    kv = s.get("kv_cache") or []
    kvtxt = f"; KV cache peak {pct(max(k.get('peak_util', 0) for k in kv), 0)}" if kv else ""
    return f"utilisation: engines busy {pct(eng.get('busy_share'), 0)} of the time" + (f" ({each})" if len(shares) > 1 else "") + kvtxt


def queueing_share(s: dict):
    """p95 queue wait over p95 TTFT of the streamed classes (None where the wait is unobservable)."""
    lat = first_token_latency(s)
    wait, ttft = lat.get("queue_wait", {}).get("p95"), lat.get("ttft", {}).get("p95")
    return None if wait is None or not ttft else wait / ttft


def saturation(s: dict) -> str | None:
    """Busy engines alone are no saturation (a continuous-batching engine with one sequence is busy); busy
    engines with requests queueing, shed or timing out are."""
    eng = s.get("engine") or {}
    busy = eng.get("busy_share")
    o = s["requests"]["outcomes"]
    sent = s["goodput"].get("denominator", s["requests"]["generated"])
    shed = sum(o.get(k, 0) for k in SHED)
    q = queueing_share(s)
    pressed = (q is not None and q >= 0.5) or (sent and shed / sent > 0.01)
    if busy is not None and busy >= SATURATED and pressed:
        return (f"**saturated**: engines busy {pct(busy, 0)} of the time while requests queue"
                + (f" (p95 wait {q * 100:.0f} % of p95 TTFT)" if q is not None else "")
                + f" and {shed} were shed or timed out; more load only adds queueing and shedding. "
                  "Add replicas or lower the load.")
    if busy is None and sent and shed / sent > 0.05:
        return f"**likely saturated**: {shed} of {sent} requests shed, timed out or failed ({pct(shed / sent)})."
    if busy is not None and busy >= BUSY:
        return (f"not saturated: engines busy {pct(busy, 0)} of the time (a batch always running) but requests "
                "barely queue; the headroom is in batch slots, not idle time.")
    return None


def _rate(x) -> str:
    return "–" if x is None else f"{x:.2f} req/s"


def verdict_lines(s: dict, streamed: dict[str, bool]) -> list[str]:
    cls = per_class(s, streamed)
    met = [c for c, ok, _ in cls if ok]
    slo = s["goodput"]["slo"]
    slo_txt = slo_text(slo)
    head = "**SLOs met by every class**" if len(met) == len(cls) else \
        f"**SLOs missed by {len(cls) - len(met)} of {len(cls)} classes**"
    g = s["goodput"]
    lines = [f"{head} (p95 {slo_txt or 'none set'}; TTFT and TPOT for streamed classes; ≤ 1 % shed). "
             f"SLO attainment {pct(g['slo_attainment'])} of {g.get('denominator', s['requests']['generated'])} "
             f"offered requests; goodput {_rate(g['requests_per_s'])} of {_rate(s['throughput']['requests_per_s'])} "
             "completed.", ""]
    for c, ok, why in cls:
        lines.append(f"- {'✅' if ok else '❌'} **{c}**{'' if streamed.get(c, True) else ' (non-streamed)'}: "
                     + ("met" if ok else "; ".join(why)))
    b = bottlenecks(s)
    lines += ["", "Bottleneck: " + ("; ".join(b) if b else "none: nothing was refused, queued long or preempted") + ".",
              utilisation(s) + "."]
    sat = saturation(s)
    if sat:
        lines.append(sat)
    cut = g.get("excluded_not_sent_max_duration")
    if cut:
        lines.append(f"{cut} requests scheduled after --max-duration were never sent; they are left out of SLO attainment.")
    return lines


def streamed_of(s: dict) -> dict[str, bool]:
    """Which classes streamed, from the summary's own split (a summary without it: every class streamed)."""
    out = {c: True for c in s["latency_by_class"]}
    for c in (s.get("latency_by_stream") or {}).get("non_streamed", {}).get("classes", []):
        out[c] = False
    return out


def verdict_short(s: dict) -> str:
    """One line for the terminal."""
    streamed = streamed_of(s)
    cls = per_class(s, streamed)
    missed = [c for c, ok, _ in cls if not ok]
    head = "SLOs met by every class" if not missed else f"SLOs missed by {', '.join(missed)}"
    b = bottlenecks(s)
    sat = saturation(s)
    return (f"verdict: {head}" + (f"; bottleneck: {b[0].split(':')[0].split(' refused')[0].split(' shed')[0]}" if b else "")
            + ("; SATURATED" if sat and sat.startswith("**saturated") else ""))
