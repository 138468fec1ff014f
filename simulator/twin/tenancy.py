"""Which traffic class an HTTP request belongs to.

Identity comes from headers (X-User, X-Project, X-Class, X-Priority), then the body's `metadata`
object (same keys, lower case), then OpenAI's `user` field. Headers and metadata are strict (an
unknown user is a 400); the `user` field is only used when it names a scenario user, since OpenAI
clients put arbitrary end-user ids there. A request with no identity at all belongs to the default
user (`sim serve --default-user`; without it the scenario's first user, announced at start-up and
in /health): its class for the requested model, else its first class.

The class decides user, project, tier, priority, timeout and prices. A request whose (user, model)
pairing no class lists gets a derived class that keeps the class name of its base, so records and
the report still group it sensibly.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..scenario import TIER_PRIORITY

MAX_PRIORITY = 2**31 - 1  # within SQLite's and numpy's integers; schedulers multiply it by aging_s


class HTTPProblem(Exception):
    """A request the server refuses before it reaches the world: status, error type, message, param."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code = code
        self.headers = headers or {}


@dataclass
class Identity:
    user: str | None = None
    project: str | None = None
    cls: str | None = None
    priority: int | None = None
    body_user: object = None  # OpenAI's free-form `user` field


def identity(headers, body: dict) -> Identity:
    meta = body.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    out = Identity()
    for key in ("user", "project", "class"):
        v = headers.get(f"X-{key.capitalize()}")
        if v is None:
            v = meta.get(key)
        if v is not None and not isinstance(v, str):
            raise HTTPProblem(400, f"metadata.{key} must be a string", param=f"metadata.{key}")
        setattr(out, "cls" if key == "class" else key, v)
    pr = headers.get("X-Priority")
    where = "X-Priority"
    if pr is None:
        pr, where = meta.get("priority", body.get("priority")), "priority"
    if pr is not None:
        try:
            if isinstance(pr, (bool, float)) or (isinstance(pr, str) and len(pr) > 12):
                raise ValueError
            out.priority = int(pr)
            if not 0 <= out.priority <= MAX_PRIORITY:
                raise ValueError
        except (TypeError, ValueError):
            raise HTTPProblem(400, f"{where} must be an integer in 0..{MAX_PRIORITY}", param=where) from None
    out.body_user = body.get("user")
    return out


class Tenancy:
    def __init__(self, world, default_user: str | None = None):
        self.world = world
        sc = world.sc
        self.classes = sc.workload.classes
        self.class_index = {c.name: i for i, c in enumerate(self.classes)}
        self.users = {u.id: u for u in sc.tenants.users}
        self.projects = {p.id: p for p in sc.tenants.projects}
        self.models = {m.name: m for m in sc.tenants.models}
        self.derived: dict[tuple, int] = {}
        if default_user is not None and default_user not in self.users:
            raise ValueError(f"unknown user {default_user!r} (known: {sorted(self.users)})")
        self.default_user = default_user if default_user is not None else sc.tenants.users[0].id

    def model_name(self, model) -> str | None:
        """The body's model, which must be a scenario model; None when absent (the class decides)."""
        if model is None:
            return None
        if not isinstance(model, str):
            raise HTTPProblem(400, "model must be a string", param="model")
        if model not in self.models:
            raise HTTPProblem(404, f"model {model!r} does not exist (known: {sorted(self.models)})",
                              "invalid_request_error", "model", "model_not_found")
        return model

    def resolve(self, ident: Identity, model: str | None) -> int:
        user, project, body_user = ident.user, ident.project, ident.body_user
        if user is None and isinstance(body_user, str) and body_user in self.users:
            user = body_user
        if user is not None and user not in self.users:
            raise HTTPProblem(400, f"unknown user {user!r}", param="X-User")
        if project is not None and project not in self.projects:
            raise HTTPProblem(400, f"unknown project {project!r}", param="X-Project")
        if user is not None and project is not None and self.users[user].project != project:
            raise HTTPProblem(400, f"user {user!r} belongs to project {self.users[user].project!r}, not {project!r}",
                              param="X-Project")
        if user is None and project is None and ident.cls is None:
            user = self.default_user
        if user is None and project is not None:
            user = next((u.id for u in self.users.values() if u.project == project), None)
            if user is None:
                raise HTTPProblem(400, f"project {project!r} has no users", param="X-Project")
        if ident.cls is not None:
            if ident.cls not in self.class_index:
                raise HTTPProblem(400, f"unknown class {ident.cls!r} (known: {sorted(self.class_index)})", param="X-Class")
            ci = self.class_index[ident.cls]
        else:
            mine = [i for i, c in enumerate(self.classes) if user is None or c.user == user]
            ci = next((i for i in mine if self.classes[i].model == model), None)
            if ci is None:
                ci = mine[0] if mine else next((i for i, c in enumerate(self.classes) if c.model == model), 0)
        c = self.classes[ci]
        user = user or c.user
        model = model or c.model
        if user == c.user and model == c.model:
            return ci
        return self._derive(ci, user, model)

    def _derive(self, ci: int, user: str, model: str) -> int:
        key = (ci, user, model)
        if key in self.derived:
            return self.derived[key]
        c = self.classes[ci]
        prio, stream, timeout, _, _ = self.world.cinfo[ci]
        tier = c.tier
        if user != c.user:
            u = self.users[user]
            tier = u.tier
            p = self.projects[u.project]
            prio = p.priority if p.priority is not None else TIER_PRIORITY[tier]
        project = self.users[user].project
        m = self.models[model]
        idx = self.world.add_class((c.name, user, project, model, tier),
                                   (prio, stream, timeout, m.cost_per_1k_prompt / 1000, m.cost_per_1k_output / 1000), ci)
        self.derived[key] = idx
        return idx
