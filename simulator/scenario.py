"""Scenario schema: the one YAML format read by `sim run`, `sim serve` and `stress run`.

Every model forbids unknown keys so a typo fails loudly, and `load_scenario` turns pydantic's
errors into one line naming the file, the field path and the reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InputError

PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
TIER_PRIORITY = {"high": 0, "standard": 1, "batch": 2}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- tenants
class User(Strict):
    id: str
    project: str
    tier: Literal["high", "standard", "batch"] = "standard"
    rate_limit: Optional["TokenBucket"] = None  # overrides gateway.user_rate_limit


class Project(Strict):
    id: str
    token_quota: Optional[PosInt] = None  # prompt + output tokens per window
    quota_window_s: PosFloat = 60.0
    rate_limit: Optional["TokenBucket"] = None
    priority: Optional[NonNegInt] = None  # overrides the class priority when set


class ModelSpec(Strict):
    name: str
    cost_per_1k_prompt: NonNegFloat = 0.0
    cost_per_1k_output: NonNegFloat = 0.0
    default_max_tokens: PosInt = 256
    max_max_tokens: PosInt = 4096
    enabled: bool = True


class Tenants(Strict):
    users: list[User] = Field(default_factory=lambda: [User(id="default", project="default")])
    projects: list[Project] = Field(default_factory=lambda: [Project(id="default")])
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec(name="default")])

    @model_validator(mode="after")
    def _refs(self):
        projects = {p.id for p in self.projects}
        for i, u in enumerate(self.users):
            if u.project not in projects:
                raise ValueError(f"users[{i}].project: unknown project {u.project!r} (known: {sorted(projects)})")
        return self


# ---------------------------------------------------------------- arrivals
class Poisson(Strict):
    type: Literal["poisson"]
    rate: PosFloat


class Constant(Strict):
    type: Literal["constant"]
    rate: PosFloat


class Gamma(Strict):
    type: Literal["gamma"]
    rate: PosFloat
    cv: PosFloat = 1.0  # vLLM's burstiness = 1 / cv²


class OnOff(Strict):
    type: Literal["onoff"]
    on_rate: PosFloat
    off_rate: NonNegFloat = 0.0
    on_s: PosFloat
    off_s: PosFloat


class Piecewise(Strict):
    type: Literal["piecewise"]
    points: list[tuple[NonNegFloat, NonNegFloat]] = Field(min_length=2)  # (time_s, rate) knots, linear between
    repeat: bool = False  # repeat the pattern (diurnal)

    @model_validator(mode="after")
    def _sorted(self):
        ts = [t for t, _ in self.points]
        if ts != sorted(ts) or len(set(ts)) != len(ts):
            raise ValueError("points: times must be strictly increasing")
        if max(r for _, r in self.points) <= 0:
            raise ValueError("points: at least one rate must be > 0")
        return self


class ClosedLoop(Strict):
    type: Literal["closed_loop"]
    users: PosInt
    think_time_s: NonNegFloat = 0.0
    think: Literal["fixed", "exponential"] = "exponential"


class Trace(Strict):
    type: Literal["trace"]
    format: Literal["azure", "mooncake"]
    path: str
    time_scale: PosFloat = 1.0  # >1 stretches time (slower), <1 compresses
    start_s: NonNegFloat = 0.0
    limit: Optional[PosInt] = None


Arrival = Annotated[Union[Poisson, Constant, Gamma, OnOff, Piecewise, ClosedLoop, Trace], Field(discriminator="type")]


# ---------------------------------------------------------------- lengths
class Fixed(Strict):
    type: Literal["fixed"]
    value: PosInt


class Uniform(Strict):
    type: Literal["uniform"]
    low: PosInt
    high: PosInt

    @model_validator(mode="after")
    def _order(self):
        if self.high < self.low:
            raise ValueError("high must be >= low")
        return self


class LogNormal(Strict):
    type: Literal["lognormal"]
    mean: PosFloat  # mean of the distribution in tokens
    sigma: PosFloat = 0.8  # sigma of the underlying normal
    min: PosInt = 1
    max: PosInt = 32768


class Exponential(Strict):
    """Memoryless lengths: geometric on {1, 2, ...} with this mean (the discrete exponential)."""
    type: Literal["exponential"]
    mean: Annotated[float, Field(ge=1)]
    max: PosInt = 1_000_000


class Empirical(Strict):
    type: Literal["empirical"]
    path: str  # CSV: a column of token counts, or a histogram (field, bin_lo_incl, bin_hi_excl, prob)
    column: Optional[str] = None
    field: Optional[str] = None  # histogram field (ServeGen format)


class FromTrace(Strict):
    type: Literal["trace"]  # lengths come with a trace arrival


class Sequence(Strict):
    """Lengths in the order listed, each `repeat` times in a row, then over again: a designed experiment
    (probe scenarios: a prefill sweep at concurrency 1) rather than a distribution."""
    type: Literal["sequence"]
    values: list[PosInt] = Field(min_length=1, max_length=100_000)
    repeat: PosInt = 1

    @property
    def period(self) -> int:
        return len(self.values) * self.repeat


Length = Annotated[Union[Fixed, Uniform, LogNormal, Exponential, Empirical, FromTrace, Sequence],
                   Field(discriminator="type")]


class PrefixGroups(Strict):
    groups: PosInt  # number of distinct shared prefixes (e.g. system prompts)
    tokens: PosInt  # shared prefix length
    share: Annotated[float, Field(ge=0, le=1)] = 1.0  # fraction of requests that carry one
    block_tokens: PosInt = 64  # granularity of the prefix hashes


class TrafficClass(Strict):
    name: str
    user: str = "default"
    model: str = "default"
    tier: Literal["high", "standard", "batch"] = "standard"
    priority: Optional[NonNegInt] = None  # 0 = most urgent; defaults from tier
    arrival: Arrival
    prompt_tokens: Length = Field(default_factory=lambda: Fixed(type="fixed", value=512))
    output_tokens: Length = Field(default_factory=lambda: Fixed(type="fixed", value=128))
    max_tokens: Optional[PosInt] = None  # requested; defaults to the sampled output length
    stream: bool = True
    timeout_s: PosFloat = 600.0
    weight: PosFloat = 1.0
    prefix: Optional[PrefixGroups] = None

    @property
    def effective_priority(self) -> int:
        return TIER_PRIORITY[self.tier] if self.priority is None else self.priority


class Workload(Strict):
    classes: list[TrafficClass] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self):
        names = [c.name for c in self.classes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"classes: duplicate class name(s) {sorted(dup)}")
        for i, c in enumerate(self.classes):
            trace_len = isinstance(c.prompt_tokens, FromTrace) or isinstance(c.output_tokens, FromTrace)
            if trace_len and not isinstance(c.arrival, Trace):
                raise ValueError(f"classes[{i}]: lengths of type 'trace' need a trace arrival")
        return self


# ---------------------------------------------------------------- gateway
class TokenBucket(Strict):
    rate: PosFloat  # requests per second
    burst: PosFloat = 1.0  # bucket size


class DegradationLevel(Strict):
    name: str
    above: Annotated[float, Field(ge=0)]  # active when queue usage ratio >= this
    max_tokens_cap: Optional[PosInt] = None
    reject_tiers: list[Literal["standard", "batch"]] = Field(default_factory=list)  # high is always kept
    reject_classes: list[str] = Field(default_factory=list)


class Gateway(Strict):
    max_queue: Optional[PosInt] = None  # queued (not yet running) requests across replicas -> 503
    rate_limit: Optional[TokenBucket] = None  # global -> 429
    user_rate_limit: Optional[TokenBucket] = None  # per user -> 429
    enforce_quota: bool = True
    degradation: list[DegradationLevel] = Field(default_factory=list)

    @model_validator(mode="after")
    def _levels(self):
        th = [d.above for d in self.degradation]
        if th != sorted(th):
            raise ValueError("degradation: levels must be in increasing order of 'above'")
        if self.degradation and self.max_queue is None:
            raise ValueError("degradation: needs max_queue (levels are driven by queue usage ratio)")
        return self


# ---------------------------------------------------------------- scheduler / engine / cluster
class Scheduler(Strict):
    policy: Literal["fifo", "priority", "priority_aging", "sjf"] = "fifo"
    aging_s: PosFloat = 5.0  # priority_aging: one priority level gained per aging_s of waiting


class Engine(Strict):
    type: Literal["single", "dynamic_batching", "continuous", "llamacpp"] = "continuous"
    profile: str = "default"  # cost-model profile name or path
    # dynamic batching
    max_batch_size: PosInt = 8
    batch_timeout_s: NonNegFloat = 0.01
    # continuous batching (vLLM-like)
    max_num_seqs: PosInt = 256
    max_num_batched_tokens: PosInt = 8192
    chunked_prefill: bool = True
    long_prefill_threshold: Optional[PosInt] = None  # separate small/large prefill queues
    block_size: PosInt = 16
    num_blocks: Optional[PosInt] = None  # else derived from gpu_memory_gb
    gpu_memory_gb: PosFloat = 80.0
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    prefix_caching: bool = False
    fast_forward: bool = True
    # llama.cpp
    n_parallel: PosInt = 4
    n_ctx: PosInt = 8192
    n_batch: PosInt = 2048


class ModelPoolEntry(Strict):
    model: str
    replicas: PosInt = 1
    target_inflight: PosInt = 64
    load_time_s: NonNegFloat = 20.0
    unload_after_idle_s: Optional[PosFloat] = None
    preloaded: bool = True
    weight_gb: Optional[PosFloat] = None
    profile: Optional[str] = None  # cost profile of this model's replicas (default: engine.profile)


class Cluster(Strict):
    replicas: PosInt = 1
    router: Literal["round_robin", "least_outstanding", "least_kv", "prefix_affinity"] = "round_robin"
    model_pool: list[ModelPoolEntry] = Field(default_factory=list)
    gpus: Optional[PosInt] = None  # model pool: GPUs available (one replica per GPU)


class SLO(Strict):
    ttft_s: Optional[PosFloat] = None
    tpot_s: Optional[PosFloat] = None
    e2e_s: Optional[PosFloat] = None
    starvation_s: PosFloat = 10.0  # queue wait above this counts as starvation


class Scenario(Strict):
    name: str
    description: str = ""
    seed: NonNegInt = 0  # numpy seed sequences take non-negative integers only
    duration_s: Optional[PosFloat] = None
    num_requests: Optional[PosInt] = None
    warmup_s: NonNegFloat = 0.0
    drain_s: PosFloat = 3600.0  # after arrivals stop, how long in-flight work may still run
    tenants: Tenants = Field(default_factory=Tenants)
    workload: Workload
    gateway: Gateway = Field(default_factory=Gateway)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    engine: Engine = Field(default_factory=Engine)
    cluster: Cluster = Field(default_factory=Cluster)
    slo: SLO = Field(default_factory=SLO)

    @model_validator(mode="after")
    def _stop_and_refs(self):
        if self.duration_s is None and self.num_requests is None:
            if not all(isinstance(c.arrival, Trace) and c.arrival.limit for c in self.workload.classes):
                raise ValueError("a stop condition is needed: duration_s and/or num_requests")
        if self.duration_s is not None and self.warmup_s >= self.duration_s:
            raise ValueError(f"warmup_s: {self.warmup_s:g} s is not below duration_s ({self.duration_s:g} s): "
                             "every request would be excluded from the statistics")
        users = {u.id for u in self.tenants.users}
        models = {m.name for m in self.tenants.models}
        for i, c in enumerate(self.workload.classes):
            if c.user not in users:
                raise ValueError(f"workload.classes[{i}].user: unknown user {c.user!r} (known: {sorted(users)})")
            if c.model not in models:
                raise ValueError(f"workload.classes[{i}].model: unknown model {c.model!r} (known: {sorted(models)})")
        classes = {c.name for c in self.workload.classes}
        for i, lvl in enumerate(self.gateway.degradation):
            bad = set(lvl.reject_classes) - classes
            if bad:
                raise ValueError(f"gateway.degradation[{i}].reject_classes: unknown class(es) {sorted(bad)}")
        for i, e in enumerate(self.cluster.model_pool):
            if e.model not in models:
                raise ValueError(f"cluster.model_pool[{i}].model: unknown model {e.model!r}")
        return self

    # lookups used on hot paths
    def user(self, uid: str) -> User:
        return next(u for u in self.tenants.users if u.id == uid)

    def project(self, pid: str) -> Project:
        return next(p for p in self.tenants.projects if p.id == pid)

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.tenants.models if m.name == name)


User.model_rebuild()
Project.model_rebuild()


# ---------------------------------------------------------------- loading
def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("poisson", "constant", "gamma", "onoff", "piecewise", "closed_loop", "trace",
                      "fixed", "uniform", "lognormal", "exponential", "empirical") and out.endswith(("arrival", "tokens")):
            continue  # pydantic's union tag adds nothing for the reader
        else:
            out += f".{part}" if out else str(part)
    return out


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    field = _loc(err["loc"])
    if err["type"] == "value_error" and ": " in msg:
        head, rest = msg.split(": ", 1)
        if " " not in head:  # validators name the offending path relative to their model
            field, msg = (f"{field}.{head}" if field else head), rest
    elif err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "union_tag_invalid" and isinstance(err.get("input"), dict):
        msg = f"unknown type {err['input'].get('type')!r} (expected one of {err['ctx']['expected_tags']})"
    extra = len(exc.errors()) - 1
    return field, msg + (f" (+{extra} more error{'s' if extra > 1 else ''})" if extra else "")


def set_path(data: dict, path: str, value: Any) -> None:
    """Apply one --set a.b[0].c=value override (value parsed as YAML)."""
    parts: list[Any] = []
    for seg in path.split("."):
        while "[" in seg:
            name, rest = seg.split("[", 1)
            if name:
                parts.append(name)
            idx, seg = rest.split("]", 1)
            parts.append(int(idx))
        if seg:
            parts.append(seg)
    cur: Any = data
    for p in parts[:-1]:
        if isinstance(p, int):
            cur = cur[p]
        else:
            cur = cur.setdefault(p, {})
    cur[parts[-1]] = value


def parse_overrides(items: list[str] | None, file: str) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise InputError(file, f"--set {item}", "expected path=value")
        k, v = item.split("=", 1)
        if not k.strip():
            raise InputError(file, f"--set {item}", "empty path before '='")
        try:
            out.append((k.strip(), yaml.safe_load(v)))
        except yaml.YAMLError as exc:
            raise InputError(file, k.strip(), f"--set value is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return out


def load_scenario(path: str | Path, overrides: list[str] | None = None, seed: int | None = None) -> Scenario:
    path = Path(path)
    if not path.exists():
        raise InputError(str(path), "", "file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise InputError(str(path), where, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise InputError(str(path), "", "expected a mapping at top level")
    for k, v in parse_overrides(overrides, str(path)):
        try:
            set_path(data, k, v)
        except (IndexError, KeyError, TypeError):
            raise InputError(str(path), k, "--set path does not exist") from None
        except ValueError:  # a list index that is not an integer, or an unclosed '['
            raise InputError(str(path), k, "--set path is malformed (list indices are written [0])") from None
    if seed is not None:
        data["seed"] = seed
    sc = scenario_from_dict(data, str(path))
    _check_files(sc, path)
    return sc


def scenario_from_dict(data: dict, file: str = "<scenario>") -> Scenario:
    try:
        sc = Scenario.model_validate(data)
    except ValidationError as exc:
        field, msg = _first_error(exc)
        raise InputError(file, field, msg) from None
    sc._source = file  # type: ignore[attr-defined]
    return sc


def resolve_path(p: str, base: Path) -> Path:
    """Data paths are relative to the scenario file, then to the repo root."""
    cand = Path(p)
    if cand.is_absolute():
        return cand
    for root in (base.parent, Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / cand).exists():
            return root / cand
    return base.parent / cand


def _check_files(sc: Scenario, path: Path) -> None:
    for i, c in enumerate(sc.workload.classes):
        for field, spec in (("arrival", c.arrival), ("prompt_tokens", c.prompt_tokens), ("output_tokens", c.output_tokens)):
            p = getattr(spec, "path", None)
            if p is not None:
                rp = resolve_path(p, path)
                if not rp.exists():
                    raise InputError(str(path), f"workload.classes[{i}].{field}.path", f"file not found: {p}")
                object.__setattr__(spec, "path", str(rp))


def dump_scenario(sc: Scenario) -> str:
    return yaml.safe_dump(sc.model_dump(mode="json"), sort_keys=False)
