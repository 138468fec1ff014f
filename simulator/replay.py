"""`sim replay`: a measured run's exact request stream through the simulator.

Run folder (simulator/runfolder.py) -> the run's scenario with engine settings from the server's facts
and the command line -> a ReplayPlan (open-loop requests at their measured send offsets; closed-loop
users as chains whose next send waits for the previous request's simulated end plus the gap measured
between that end and the next send) -> ReplayWorld (the simulator's World fed with that plan) -> a normal
report folder, then simulator/fidelity.py compares it with the measured run.

Per request: prompt = the server's usage.prompt_tokens when client.csv reports it (what the engine
processed), else the client's prompt_tokens; output = the tokens received for ok requests (the length the
server generated), else the max_tokens sent; max_tokens = the one sent; the stream flag as sent.
Requests never sent (not_sent) are left out; other non-ok requests are replayed as sent.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .runfolder import RunFolder, parse_sets
from .scenario import Engine, Scenario, scenario_from_dict
from .slotstate import predecessor, slot_overrides
from .workload import Stream, build_stream
from .world import World

# server.json facts -> engine fields (applied where the engine schema has the field). llama-server reports
# its context per slot (/props default_generation_settings.n_ctx, /slots n_ctx); the engine's n_ctx is the
# whole context its n_parallel slots share, as llama-server's --ctx-size.
FACTS = (("num_gpu_blocks", "num_blocks"), ("block_size", "block_size"), ("max_num_seqs", "max_num_seqs"),
         ("max_num_batched_tokens", "max_num_batched_tokens"), ("total_slots", "n_parallel"), ("n_ctx", "n_ctx"),
         ("max_model_len", "max_model_len"))


# What a vLLM server schedules with when its facts do not say (vLLM exposes neither limit to a client): the
# defaults of the version the continuous engine mirrors, for the GPUs it is run on most (simulator/presets.py
# `vllm-0.26`: 70 GiB or more, not an A100). A run's scenario describes the simulated side and is not the
# server's configuration: measured, vLLM ran 820 requests at once at 40 req/s where the held-out scenario
# says 256 (tests/data/real/vllm-0.26-h200-llama3-8b). --set engine.preset=vllm-0.26-small-gpu, or the
# values, for a server started otherwise.
# the engine a measured server's runs replay with unless --engine or --set engine.type says otherwise (a run's
# scenario names the engine it was planned with, e.g. heldout_poisson.yaml's continuous, not the server)
ENGINE_OF_KIND = {"vllm": "continuous", "llamacpp": "llamacpp"}
SERVER_DEFAULTS = {"vllm": ("vllm-0.26", ("max_num_seqs", "max_num_batched_tokens", "chunked_prefill",
                                         "async_scheduling"))}


def _int(v):
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


@dataclass
class ReplayStream(Stream):
    ids: np.ndarray | None = None  # the measured request ids (World.arrivals numbers requests by these)


@dataclass
class Chain:
    """One closed-loop user: its requests in send order; gaps[j] = measured send_j − end_(j−1)."""
    ci: int
    user: int
    first_t: float
    rids: list
    prompt: list
    output: list
    max_tokens: list
    hashes: list
    gaps: list


@dataclass
class ReplayPlan:
    stream: ReplayStream
    chains: list
    stream_flag: dict  # request id -> streamed or not, as sent
    info: dict = field(default_factory=dict)  # what was replayed, for summary.json


# ------------------------------------------------------------------ scenario
def replay_overrides(run: RunFolder, engine: str | None, profile: str | None, sets: list[str] | None,
                     after: RunFolder | None = None) -> tuple[list, dict]:
    """(path, value) overrides in order: server facts, then --engine, --profile, the slots' state at the start
    (llama-server; `after`: the run measured just before on the same server), --set (the user wins)."""
    fields = Engine.model_fields
    out, used = [], {}
    facts = dict(run.facts)
    slots, per_slot = _int(facts.get("total_slots")), _int(facts.get("n_ctx_per_slot"))
    if slots and per_slot and not _int(facts.get("n_ctx")):
        facts["n_ctx"] = slots * per_slot
    for fact, name in FACTS:
        v = _int(facts.get(fact))
        if v and name in fields:
            out.append((f"engine.{name}", v))
            used[fact] = v
    if run.kind in SERVER_DEFAULTS and (engine or "continuous") == "continuous":
        from .presets import PRESETS
        preset, names = SERVER_DEFAULTS[run.kind]
        for name in names:
            if name not in used:
                out.append((f"engine.{name}", PRESETS[preset][name]))
                used[name] = f"{PRESETS[preset][name]} ({preset} default)"
    if engine:
        out.append(("engine.type", engine))
    if profile:
        out.append(("engine.profile", str(Path(profile).resolve()) if Path(profile).exists() else profile))
    user = parse_sets(sets, run.path)
    return out + slot_overrides(run, used, user, after) + user, used


# ------------------------------------------------------------------ the plan
def _class_index(run: RunFolder, sc: Scenario, names) -> np.ndarray:
    idx = {c.name: i for i, c in enumerate(sc.workload.classes)}
    unknown = sorted(set(names) - set(idx))
    if unknown:
        raise InputError(str(run.path / "requests.csv"), "class_name",
                         f"class {unknown[0]!r} is not in scenario.yaml (known: {', '.join(idx)})")
    return np.array([idx[n] for n in names], dtype=np.int64)


def _col(df, name):
    return df[name].to_numpy(dtype=float) if name in df.columns else np.full(len(df), np.nan)


def _hashes(run: RunFolder, rids, cis, closed_cls) -> tuple[list, np.ndarray | None, str]:
    """Prefix-block ids of each request as the run's scenario generated them (the stress tester's prompts
    share prefixes by these), or Nones when the scenario has none."""
    sc0 = scenario_from_dict(run.scenario_data, str(run.path / "scenario.yaml"))
    if not any(c.prefix is not None or getattr(c.arrival, "format", None) == "mooncake" for c in sc0.workload.classes):
        return [None] * len(rids), None, "none in the scenario"
    try:
        s, closed = build_stream(sc0)
    except (InputError, OSError) as exc:
        return [None] * len(rids), None, f"not regenerated ({exc})"
    out = [None] * len(rids)
    n_open = len(s)
    # closed-loop lengths were drawn in issue order, which is id order within a class, for every request
    # the run issued (sent or not)
    names = {c.name: i for i, c in enumerate(sc0.workload.classes)}
    every = run.requests[["request_id", "class_name"]].sort_values("request_id", kind="stable")
    drawn = {}
    for rid, name in zip(every["request_id"].tolist(), every["class_name"].tolist()):
        ci = names.get(name)
        if ci in closed:
            drawn[rid] = closed[ci].next()[3]
    for j, (rid, ci) in enumerate(zip(rids.tolist(), cis.tolist())):
        if ci in closed_cls:
            out[j] = drawn.get(rid)
        elif rid < n_open and int(s.cls[rid]) == ci:
            out[j] = s.hashes[rid]
    return out, s.hash_block, "from the run's scenario"


def _infer_users(t, end, users: int) -> np.ndarray:
    """Without client.csv: each send goes to the user whose previous request ended last before it (zero
    think time's chain); the first `users` sends start one user each."""
    order = np.argsort(t, kind="stable")
    last_end: list[float] = []
    who = np.zeros(t.size, dtype=np.int64)
    for j in order:
        if len(last_end) < users:
            who[j] = len(last_end)
            last_end.append(end[j])
            continue
        free = [u for u, e in enumerate(last_end) if not (e > t[j] + 1e-6)]
        u = max(free, key=lambda u: last_end[u]) if free else int(np.argmin(last_end))
        who[j] = u
        last_end[u] = end[j] if np.isfinite(end[j]) else t[j]
    return who


def build_plan(run: RunFolder, sc: Scenario) -> ReplayPlan:
    df = run.requests
    sent = df[df["arrival_s"].notna()].sort_values(["arrival_s", "request_id"], kind="stable")
    rids = sent["request_id"].to_numpy(dtype=np.int64)
    cis = _class_index(run, sc, sent["class_name"].tolist())
    # the simulation starts at 0; a run may send a little before its own origin (its closed-loop users
    # start as they are created): every time moves by the same shift, undone in the fidelity plot
    shift = max(0.0, -float(sent["arrival_s"].min()))
    t = sent["arrival_s"].to_numpy(dtype=float) + shift
    end = _col(sent, "end_s") + shift
    ok = (sent["outcome"] == "ok").to_numpy()
    p_client = sent["prompt_tokens"].to_numpy(dtype=float)
    p_server = _col(sent, "prompt_tokens_server")
    prompt = np.where(np.isfinite(p_server) & (p_server > 0), p_server, p_client)
    if "prefix_cached_tokens" in sent.columns:  # served from the server's prefix cache: not computed
        cached = np.nan_to_num(sent["prefix_cached_tokens"].to_numpy(dtype=float), nan=0.0)
        prompt = np.maximum(prompt - cached, 1)
    applied = sent["applied_max_tokens"].to_numpy(dtype=float)
    got = sent["output_tokens"].to_numpy(dtype=float)
    output = np.where(ok, got, applied)
    output = np.where(np.isfinite(output) & (output > 0), output, np.where(np.isfinite(got) & (got > 0), got, 1))
    mx = np.where(np.isfinite(applied) & (applied >= output), applied, output)
    prompt = np.maximum(np.nan_to_num(prompt, nan=1.0), 1).astype(np.int64)
    output, mx = output.astype(np.int64), mx.astype(np.int64)
    flags = dict(zip(rids.tolist(), (sent["stream"].to_numpy() != 0).tolist()))

    closed_cls = {i for i, c in enumerate(sc.workload.classes) if c.arrival.type == "closed_loop"}
    hashes, hash_block, hash_note = _hashes(run, rids, cis, closed_cls)
    if hash_block is None or hash_block.size != len(sc.workload.classes):
        hash_block = np.ones(len(sc.workload.classes), dtype=np.int64)
        for i, c in enumerate(sc.workload.classes):
            if c.prefix is not None:
                hash_block[i] = c.prefix.block_tokens
    is_closed = np.isin(cis, list(closed_cls))
    o = np.flatnonzero(~is_closed)
    stream = ReplayStream(t[o], cis[o], prompt[o], output[o], mx[o], [hashes[j] for j in o], hash_block, ids=rids[o])

    chains, source = [], None
    users_col = _col(sent, "closed_user")
    for ci in sorted(closed_cls):
        sel = np.flatnonzero(cis == ci)
        if not sel.size:
            continue
        u = users_col[sel]
        if run.has_client and np.all(np.isfinite(u) & (u >= 0)):
            who, source = u.astype(np.int64), "client.csv closed_user"
        else:
            who = _infer_users(t[sel], end[sel], sc.workload.classes[ci].arrival.users)
            source = source or "inferred from send and end times (no closed_user in client.csv)"
        for user in np.unique(who):
            js = sel[who == user]  # already in send order
            gaps = [0.0] + [max(0.0, float(t[b] - end[a])) if np.isfinite(end[a]) else 0.0 for a, b in zip(js[:-1], js[1:])]
            chains.append(Chain(ci, int(user), float(t[js[0]]), rids[js].tolist(), prompt[js].tolist(), output[js].tolist(),
                                mx[js].tolist(), [hashes[j] for j in js], gaps))
    info = {"run": run.label, "server_kind": run.kind, "time_shift_s": round(shift, 9), "requests_replayed": int(len(sent)),
            "left_out_not_sent": int(len(df) - len(sent)), "open_loop": int(o.size),
            "closed_loop_users": len(chains), "closed_loop_requests": int(is_closed.sum()),
            "closed_loop_users_from": source, "prompt_tokens_from": "client.csv prompt_tokens_server"
            if np.isfinite(p_server).any() else "requests.csv prompt_tokens", "prefix_hashes": hash_note}
    return ReplayPlan(stream, chains, flags, info)


# ------------------------------------------------------------------ the world
class ReplayWorld(World):
    """The simulator's world with a measured run's requests as its arrivals."""

    def __init__(self, sc: Scenario, plan: ReplayPlan, progress=None):
        self.plan = plan
        self._flags = plan.stream_flag
        super().__init__(sc, progress, stream=(plan.stream, {}))

    def make_request(self, rid, ci, t, prompt, output, max_tokens, hashes):
        req = super().make_request(rid, ci, t, prompt, output, max_tokens, hashes)
        req.stream = self._flags.get(rid, req.stream)
        return req

    def sources(self) -> list:
        return super().sources() + [self.env.process(self.chain_user(ch)) for ch in self.plan.chains]

    def chain_user(self, ch: Chain):
        env = self.env
        if ch.first_t > 0:
            yield env.timeout(ch.first_t)
        for j, rid in enumerate(ch.rids):
            if j and ch.gaps[j] > 0:
                yield env.timeout(ch.gaps[j])
            req = self.make_request(rid, ch.ci, env.now, ch.prompt[j], ch.output[j], ch.max_tokens[j], ch.hashes[j])
            req.done = env.event()
            self.submit(req)
            yield req.done


def simulate_replay(run: RunFolder, engine: str | None = None, profile: str | None = None,
                    sets: list[str] | None = None, progress=None, after: RunFolder | None = None):
    """Simulate the run's request stream without writing anything (e.g. inside a fit). Returns (Result, plan).
    `after`: the run measured just before on the same server (default: from a run_order.txt, slotstate.py)."""
    if after is None and run.kind == "llamacpp":
        after = predecessor(run)
    engine = engine or ENGINE_OF_KIND.get(run.kind)
    overrides, used = replay_overrides(run, engine, profile, sets, after)
    sc = run.scenario(overrides)
    plan = build_plan(run, sc)
    plan.info.update(engine=sc.engine.type, profile=sc.engine.profile, server_facts_applied=used,
                     overrides=[f"{k}={v}" for k, v in overrides])
    return ReplayWorld(sc, plan, progress).run(), plan


def replay(run: RunFolder, out: Path, engine: str | None = None, profile: str | None = None,
           sets: list[str] | None = None, plots: bool = True, progress=None,
           after: RunFolder | None = None) -> tuple[dict, ReplayPlan]:
    """Simulate the run's request stream; write the report folder to `out`. Returns (summary, plan)."""
    from .run import write_result
    result, plan = simulate_replay(run, engine, profile, sets, progress, after)
    return write_result(result, out, plots, {"replay": plan.info}), plan
