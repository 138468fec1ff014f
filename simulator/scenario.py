"""Scenario schema: the one YAML format read by `sim run`, `sim serve` and `stress run`.

Every model forbids unknown keys so a typo fails loudly, and `load_scenario` turns pydantic's
errors into one line naming the file, the field path and the reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InputError
from .limits import Limits, check_limits
from .presets import apply_preset
from .safeio import check_tree, load_yaml_file
from .scenario_io import _check_files, _first_error, parse_overrides, resolve_path, set_path  # noqa: F401 (re-exported)

PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
TIER_PRIORITY = {"high": 0, "standard": 1, "batch": 2}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # .inf / .nan are never a valid setting


def _unique(items, key: str, what: str) -> None:
    seen = set()
    for i, x in enumerate(items):
        v = getattr(x, key)
        if v in seen:
            raise ValueError(f"{what}[{i}].{key}: duplicate {key} {v!r} (ids must be unique)")
        seen.add(v)


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
        _unique(self.users, "id", "users")
        _unique(self.projects, "id", "projects")
        _unique(self.models, "name", "models")
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
    cv: Annotated[float, Field(ge=1e-3, le=1e3)] = 1.0  # vLLM's burstiness = 1 / cv² (gamma shape must stay finite)


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
    sigma: Annotated[float, Field(gt=0, le=10)] = 0.8  # sigma of the underlying normal
    min: PosInt = 1
    max: PosInt = 32768

    @model_validator(mode="after")
    def _order(self):
        if self.min > self.max:
            raise ValueError(f"min: {self.min} is above max ({self.max})")
        return self


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

    @model_validator(mode="after")
    def _ids(self):
        # block ids are class base + group * 100,000 + block: more blocks would make two groups' prefixes collide
        if self.tokens // self.block_tokens > 100_000:
            raise ValueError(f"tokens: {self.tokens // self.block_tokens:,} blocks of {self.block_tokens} tokens in one "
                             "prefix; at most 100,000 (ids of neighbouring groups would collide)")
        return self


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
    preset: Optional[Literal["vllm-0.26", "vllm-0.26-small-gpu", "llama-server"]] = None  # presets.py
    type: Literal["single", "dynamic_batching", "continuous", "llamacpp"] = "continuous"
    profile: str = "default"  # cost-model profile name or path

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, d):
        return apply_preset(d)

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
    async_scheduling: bool = False  # vLLM's: a request arriving during a step joins the step after next
    fast_forward: bool = True
    # llama.cpp
    n_parallel: PosInt = 4
    n_ctx: PosInt = 8192
    n_batch: PosInt = 2048
    n_ubatch: PosInt = 512  # llama.cpp's physical batch (common/common.h)
    kv_unified: bool = False  # one KV buffer for all slots (-kvu); llama-server's default for an explicit -np N is one stream per slot
    cache_idle_slots: bool = True  # llama-server copies idle slots to its host prompt cache at each task launch
    # llama.cpp slots when the run begins (simulator/slotstate.py: `sim replay` takes them from measured runs):
    # those used before, least recently used first (a slot not named was never used, so is picked first), and
    # the tokens each slot holds that the host prompt cache lacks (one number per slot)
    slot_order: Optional[list[NonNegInt]] = None
    slot_tokens: Optional[list[NonNegInt]] = None

    @model_validator(mode="after")
    def _slots(self):
        if self.slot_order is not None:
            if len(set(self.slot_order)) != len(self.slot_order):
                raise ValueError("slot_order: a slot id appears twice")
            if self.slot_order and max(self.slot_order) >= self.n_parallel:
                raise ValueError(f"slot_order: slot {max(self.slot_order)} is not one of n_parallel={self.n_parallel}")
        if self.slot_tokens is not None and len(self.slot_tokens) != self.n_parallel:
            raise ValueError(f"slot_tokens: {len(self.slot_tokens)} numbers for n_parallel={self.n_parallel} slots")
        return self


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

    @model_validator(mode="after")
    def _pool(self):
        _unique(self.model_pool, "model", "model_pool")
        return self


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
    limits: Limits = Field(default_factory=Limits)  # caps on a run's size (simulator/limits.py)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # the default report folder is reports/<name>: a name must never lead outside it
        if not v.strip() or v != v.strip():
            raise ValueError("must be a non-empty name without leading or trailing spaces")
        if any(ch in v for ch in "/\\:") or ".." in v or any(ord(ch) < 32 or ord(ch) == 127 for ch in v):
            raise ValueError(f"{v!r} is not a plain name (no '/', '\\', ':', '..' or control characters): "
                             "it names the report folder reports/<name>")
        if len(v) > 200:
            raise ValueError(f"a name of {len(v)} characters; at most 200")
        return v

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
def load_scenario(path: str | Path, overrides: list[str] | None = None, seed: int | None = None) -> Scenario:
    """Parse, override, validate and check a scenario against its limits and data files: the one check
    that `sim validate`, `sim run`, `sim sweep`, `sim serve` and `stress run` share."""
    path = Path(path)
    data = load_yaml_file(path)
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
    if overrides:
        check_tree(data, str(path))
    sc = scenario_from_dict(data, str(path))
    _check_files(sc, path)
    check_limits(sc, str(path))
    return sc


def scenario_from_dict(data: dict, file: str = "<scenario>") -> Scenario:
    try:
        sc = Scenario.model_validate(data)
    except ValidationError as exc:
        field, msg = _first_error(exc)
        raise InputError(file, field, msg) from None
    sc._source = file  # type: ignore[attr-defined]
    return sc


def dump_scenario(sc: Scenario) -> str:
    # limits appear only when the scenario set them (a default run's scenario.yaml is as before)
    exclude = None if "limits" in sc.model_fields_set else {"limits"}
    return yaml.safe_dump(sc.model_dump(mode="json", exclude=exclude), sort_keys=False)
