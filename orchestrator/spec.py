"""The workflow spec: pydantic models for every key of the workflow YAML, and how a file becomes one.

A workflow is a union on `task`: each kind of task (tasks/kinds) brings its own sections (data, teacher,
student, distill, soft_targets: tasks/kinds/<kind>/spec.py) and the metrics its objectives, early stopping
and gates may name; the keys every kind shares are here. Every model forbids unknown keys, so a typo is an
error that names its YAML path, never a silent default.
"""

from __future__ import annotations

import copy
import operator
import re
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from tasks.errors import UserError
from tasks.kinds import DEFAULT, TaskKind, kind_for, kinds
from tasks.retry import Retries
from tasks.sections import DataSpec, DistillSpec, ModelSpec, ScheduleKeys, SoftTargetSpec, Strict, TeacherSpec

# what every kind's gates can compare besides its own metrics (the driver records them for every student)
GENERIC_GATE_METRICS = ("num_params", "model_bytes", "samples_per_s", "epochs")
# what every kind's search objectives can name besides its epoch metrics
SIZE_OBJECTIVE = "num_params"


class S3Options(Strict):
    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False


class RetrySpec(Strict):
    """How long to wait for a service that is away: `attempts` tries, waits doubling up to `max_wait_s`."""

    attempts: int = Field(8, ge=1, le=100)
    max_wait_s: float = Field(15.0, gt=0, le=600)

    def policy(self) -> Retries:
        return Retries(attempts=self.attempts, max_wait_s=self.max_wait_s)


class StorageSpec(Strict):
    root: str = ".kdflow"
    s3: S3Options | None = None
    retries: RetrySpec = RetrySpec()  # an S3 server away for a while: retried, then exit 2 naming it


class TrackingSpec(Strict):
    uri: str | None = None
    experiment: str | None = None
    retries: RetrySpec = RetrySpec()  # the MLflow server away for a while: retried, then exit 2 naming it


class OptimizerSpec(ScheduleKeys):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)


def natural_direction(metric: str) -> Literal["maximize", "minimize"]:
    """Which way a metric improves when no one says: losses, perplexities and sizes down, the rest up."""
    return "minimize" if any(w in metric for w in ("loss", "perplexity", "num_params", "latency")) else "maximize"


class EarlyStoppingSpec(Strict):
    metric: str | None = Field(None, description="a per-epoch metric; default the kind's (classification: "
                                                 "val_accuracy, causal_lm: val_perplexity)")
    patience: int = Field(5, ge=1)
    mode: Literal["max", "min"] | None = Field(None, description="default: min for a loss or perplexity, else max")

    @property
    def direction(self) -> str:
        if self.mode:
            return self.mode
        return "min" if natural_direction(self.metric or "") == "minimize" else "max"


class TrainSpec(Strict):
    epochs: int = Field(20, ge=0, description="0: none, where the kind trains in a stage after them alone (on-policy)")
    batch_size: int = Field(128, ge=1, description="rows per step on each worker (global: workers x this)")
    optimizer: OptimizerSpec = OptimizerSpec()
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs per worker; also its torch threads (>= 1)")
    gpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast; fp16 adds a GradScaler")
    max_failures: int = Field(0, ge=0)
    placement: Literal["pack", "spread", "strict_spread"] = Field(
        "pack", description="where the workers go: pack (fewest nodes), spread (one per node where it can), "
                            "strict_spread (one per node, or wait)")
    checkpoint_every: int | None = Field(None, ge=1, description="epochs between checkpoints; default by time")
    checkpoint_interval_s: float = Field(30.0, ge=0, description="seconds between checkpoints (docs/training.md)")
    early_stopping: EarlyStoppingSpec | None = None
    hold_share_mb: float = Field(
        1024, ge=0, description="a worker holds its share of the rows in memory when their stored size is at most "
                                "this; above it reads them shard by shard, one ahead (0: always stream)")


class FloatParam(Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> FloatParam:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        return self


class IntParam(Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1

    @model_validator(mode="after")
    def _ordered(self) -> IntParam:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        return self


class CategoricalParam(Strict):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


SearchParam = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class Objective(Strict):
    metric: str | None = Field(None, description="an epoch metric of the task's kind, or num_params; default the "
                                                 "kind's (classification: val_accuracy, causal_lm: val_perplexity)")
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="default: minimize for a loss, perplexity or size, else maximize")


SELECT_WITHIN = re.compile(r"^smallest\s+within\s+([0-9.]+)\s+of\s+best(?:\s+(\w+))?(?:\s+by\s+(\w+))?$")


@dataclass(frozen=True)
class SelectRule:
    """search.select parsed: 'best', or 'smallest within D of best [METRIC] [by SIZE]' (docs/search.md,
    orchestrator/search/selection.py applies it)."""

    kind: str
    tolerance: float = 0.0
    metric: str | None = None
    size: str = SIZE_OBJECTIVE

    @classmethod
    def parse(cls, text: str) -> SelectRule:
        t = text.strip().lower()
        if t == "best":
            return cls("best")
        m = SELECT_WITHIN.match(t)
        if not m:
            raise ValueError(f"unknown select rule {text!r}: use 'best' or 'smallest within 0.01 of best "
                             "[metric] [by num_params]'")
        return cls("smallest_within", float(m.group(1)), m.group(2), m.group(3) or SIZE_OBJECTIVE)

    def check(self, text: str, objectives: list[str]) -> None:
        """The metrics the rule names must be objectives (or num_params for the size)."""
        if self.metric is not None and self.metric not in objectives:
            raise ValueError(f"select rule {text!r} names {self.metric!r}, which is not an objective "
                             f"({', '.join(objectives)})")
        if self.kind == "smallest_within" and self.size != SIZE_OBJECTIVE and self.size not in objectives:
            raise ValueError(f"select rule {text!r}: the size {self.size!r} must be num_params or an objective")


class SearchSpec(Strict):
    trials: int = Field(12, ge=1)
    concurrency: int = Field(1, ge=1)
    sampler: Literal["tpe", "random", "cmaes", "nsga2"] = "tpe"
    pruner: Literal["none", "median", "asha", "hyperband"] = "median"
    storage: str | None = None
    study: str | None = None
    seed: int | None = Field(None, description="the sampler's seed; default: the workflow's seed")
    objectives: list[Objective] = Field(default_factory=lambda: [Objective()], min_length=1)
    select: str = "best"
    space: dict[str, SearchParam] = Field(min_length=1)

    @field_validator("space", mode="before")
    @classmethod
    def _typed_params(cls, space: Any) -> Any:
        """A parameter says its type; `{choices: [...]}` alone is categorical. Without one, a message
        that says what to write (pydantic's own is "Unable to extract tag using discriminator")."""
        if not isinstance(space, dict):
            return space
        out = {}
        for key, param in space.items():
            if isinstance(param, dict) and "type" not in param:
                if "choices" not in param:
                    raise ValueError(f"{key}: needs type: float (with low, high), int (low, high) or "
                                     "categorical (choices)")
                param = {"type": "categorical", **param}
            out[key] = param
        return out

    @field_validator("select")
    @classmethod
    def _known_rule(cls, v: str) -> str:
        SelectRule.parse(v)
        return v

    @model_validator(mode="after")
    def _one_objective_for_cmaes(self) -> SearchSpec:
        if self.sampler == "cmaes" and len(self.objectives) > 1:
            raise ValueError("sampler: cmaes optimises one objective; use nsga2 or tpe for several")
        return self

    def settle(self, kind: TaskKind) -> None:
        """Fill in what the objectives leave to the kind (its metric and direction), then check them: each a
        metric the kind records, none twice, and the select rule naming objectives only."""
        for i, o in enumerate(self.objectives):
            o.metric = o.metric or kind.best_by[0]
            if o.metric not in objective_metrics(kind):
                raise ValueError(f"search.objectives[{i}].metric: unknown metric {o.metric!r} for task {kind.name}; "
                                 f"known: {', '.join(objective_metrics(kind))}")
            if o.direction is None:
                best = o.metric == kind.best_by[0]
                o.direction = ("maximize" if kind.best_by[1] else "minimize") if best else natural_direction(o.metric)
        metrics = [o.metric for o in self.objectives]
        if len(set(metrics)) < len(metrics):
            raise ValueError(f"search.objectives: a metric appears twice ({', '.join(metrics)})")
        try:
            SelectRule.parse(self.select).check(self.select, metrics)
        except ValueError as exc:
            raise ValueError(f"search.select: {exc}") from None

    @property
    def rule(self) -> SelectRule:
        return SelectRule.parse(self.select)


GATE_RE = re.compile(r"^\s*(>=|<=|>|<|==)\s*([-+0-9.eE]+)\s*$")
GATE_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


class Gate(str):
    """A comparison such as '>= 0.95'."""

    def holds(self, value: float) -> bool:
        m = GATE_RE.match(self)
        assert m
        return GATE_OPS[m.group(1)](value, float(m.group(2)))


def _gate(v: Any) -> Gate:
    if isinstance(v, (int, float)):
        v = f">= {v}"
    if not isinstance(v, str) or not GATE_RE.match(v):
        raise ValueError(f"a gate is a comparison like '>= 0.95' or '<= 20000', got {v!r}")
    return Gate(v)


GateRule = Annotated[str, BeforeValidator(lambda v: v if v is None else _gate(v))]


class GatesSpec(Strict):
    """`metric: "<op> number"` for any metric the task's kind records (checked by the workflow), plus
    `beats_alias: ALIAS` where the kind offers it."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    __pydantic_extra__: dict[str, GateRule | None] = Field(init=False)

    beats_alias: str | None = None

    def comparisons(self) -> dict[str, Gate]:
        """metric -> rule, in the order the YAML gives them."""
        return {k: Gate(v) for k, v in (self.model_extra or {}).items() if v is not None}


class PromoteSpec(Strict):
    alias: str = "champion"
    gates: GatesSpec = GatesSpec()


class RegistrySpec(Strict):
    model: str | None = None
    promote: PromoteSpec | None = None


def gate_metrics(kind: TaskKind) -> tuple[str, ...]:
    """What a gate of this kind's workflow can compare: every value the run records for its student."""
    return (*kind.gate_metrics, *GENERIC_GATE_METRICS)


def objective_metrics(kind: TaskKind) -> tuple[str, ...]:
    """What a search objective can name: the kind's epoch metrics (read at the best epoch) and the size."""
    return (*kind.epoch_metrics, SIZE_OBJECTIVE)


class Workflow(Strict):
    """The keys every kind shares; `workflow_class(kind)` makes a kind's branch with its own sections."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    task: str
    seed: int = 0
    storage: StorageSpec = StorageSpec()
    tracking: TrackingSpec = TrackingSpec()
    data: DataSpec
    teacher: TeacherSpec | list[TeacherSpec]
    soft_targets: SoftTargetSpec
    student: ModelSpec
    distill: DistillSpec
    train: TrainSpec = TrainSpec()
    search: SearchSpec | None = None
    registry: RegistrySpec = RegistrySpec()

    @property
    def kind(self) -> TaskKind:
        return kind_for(self.task)

    @property
    def teachers(self) -> list[TeacherSpec]:
        return self.teacher if isinstance(self.teacher, list) else [self.teacher]

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def registered_model(self) -> str:
        return self.registry.model or f"{self.name}-student"

    @model_validator(mode="after")
    def _metrics_of_this_kind(self) -> Workflow:
        """Objectives, early stopping and gates name what this kind records; then the kind's own rules."""
        kind = self.kind
        es = self.train.early_stopping
        if es is not None:
            es.metric = es.metric or kind.best_by[0]
            if es.metric not in kind.epoch_metrics:
                raise ValueError(f"train.early_stopping.metric: unknown metric {es.metric!r} for task {self.task}; "
                                 f"known: {', '.join(kind.epoch_metrics)}")
        if self.search is not None:
            self.search.settle(kind)
        gates = self.registry.promote.gates if self.registry.promote else None
        unknown = [k for k in (gates.model_extra or {}) if k not in gate_metrics(kind)] if gates else []
        if unknown:
            raise ValueError(f"registry.promote.gates: no metric {unknown[0]!r} to gate on for task {self.task}; known: "
                             f"{', '.join(gate_metrics(kind))}" + (", and beats_alias" if kind.champion else ""))
        if gates is not None and gates.beats_alias and kind.champion is None:
            raise ValueError(f"registry.promote.gates.beats_alias: not available for task {self.task} (gate on its "
                             f"metrics: {', '.join(kind.gate_metrics)})")
        if self.train.epochs == 0 and (kind.after_epochs(self, {}) is None or self.search is not None):
            raise ValueError("train.epochs: 0 trains nothing" + (" a search can judge (its trials are judged by their "
                             "epochs)" if self.search is not None else f"; at least 1, or a stage after the epochs where task "
                             f"{self.task} has one (docs/workflow-reference.yaml)"))
        kind.check_workflow(self)
        return self

    @model_validator(mode="after")
    def _search_keys_exist(self) -> Workflow:
        if self.search is None:
            return self
        if isinstance(self.teacher, list) and not self.teacher:
            raise ValueError("teacher: the list of teachers is empty")
        base = self.model_dump(mode="json", exclude={"search"})
        for key, param in self.search.space.items():
            if key.split(".")[0] in ("search", "name", "storage", "tracking", "registry", "teacher", "data",
                                     "soft_targets", "task"):
                raise ValueError(f"search.space.{key}: only student, distill and train keys can be searched "
                                 "(the teacher and soft targets are computed once per search)")
            if key.startswith("student.params.") and (unknown := self.kind.unknown_param(self.student.model,
                                                                                          key.split(".")[2])):
                raise ValueError(f"search.space.{key}: {unknown}")
            samples = param.choices if isinstance(param, CategoricalParam) else [param.low, param.high]
            for sample in samples:  # both ends of a range, every choice: a trial must never be invalid
                trial = copy.deepcopy(base)
                try:
                    set_dotted(trial, key, sample, must_exist=not key.startswith("student.params."))
                    type(self).model_validate(trial)
                except (KeyError, ValidationError) as exc:
                    raise ValueError(f"search.space.{key}: not a valid workflow key for value {sample!r} "
                                     f"({_short(exc)})") from None
        return self


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


@cache
def workflow_class(kind: TaskKind) -> type[Workflow]:
    """The workflow of one kind: `task` fixed to its name (optional for the default kind), its sections with
    their defaults (a section without a default is required)."""
    s = kind.spec

    def section(cls: Any, default: Any) -> tuple[Any, Any]:
        return (cls, default if default is not None else ...)

    teacher_type = Union[s.teacher, list[s.teacher]]  # noqa: UP007 - a runtime union of runtime types
    return create_model(
        f"{_camel(kind.name)}Workflow", __base__=Workflow,
        task=(Literal[kind.name], kind.name if kind.name == DEFAULT else ...),
        data=section(s.data, s.data()), teacher=section(teacher_type, s.teacher_default),
        soft_targets=section(s.soft_targets, s.soft_targets()), student=section(s.student, s.student_default),
        distill=section(s.distill, s.distill()))


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in exc.errors())
    return str(exc).strip("'\"")


@cache
def _model_names() -> frozenset[str]:
    """The class names of every section model: pydantic puts a union member's in an error's location."""
    names: set[str] = set()
    todo: list[Any] = [workflow_class(k) for k in kinds().values()]
    while todo:
        t = todo.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            if t.__name__ not in names:
                names.add(t.__name__)
                todo += [f.annotation for f in t.model_fields.values()]
        else:
            todo += list(typing.get_args(t))
    return frozenset(names)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or str(part) in _model_names() or str(part).startswith("function-"):
            continue  # pydantic's names for union members and validators, not YAML keys
        else:
            out += ("." if out else "") + str(part)
    return out


def set_dotted(d: dict[str, Any], key: str, value: Any, must_exist: bool = False) -> None:
    """Set d['a']['b'] = value for key 'a.b', creating mappings on the way."""
    parts = key.split(".")
    node = d
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part) if isinstance(node, dict) else None
        if nxt is None:
            if must_exist:
                raise KeyError(f"no key {'.'.join(parts[: i + 1])}")
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise KeyError(f"{'.'.join(parts[: i + 1])} is not a mapping")
        node = nxt
    if must_exist and parts[-1] not in node:
        raise KeyError(f"no key {key}")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """'--set a.b=VALUE' items, VALUE parsed as YAML ('8' -> 8, '{hidden: [64]}' -> dict, 'null' -> None),
    or taken as a plain string when it is not YAML ('>= 0.9')."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"expected dotted.key=value, got {item!r}", where="--set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw.strip()  # not YAML ('>= 0.9', 'a: b: c'): the text itself, as a user means it
        out.append((key.strip(), value))
    return out


def load_raw(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError("workflow file not found", where=str(path))
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"not valid YAML: {exc}", where=str(path)) from None
    if not isinstance(raw, dict):
        raise UserError("a workflow is a YAML mapping (name:, data:, teacher:, ...)", where=str(path))
    return raw


def _located(loc: str, msg: str) -> tuple[str, str]:
    """A rule between keys raises 'key: why' from the top level: name that key as the error's place."""
    m = re.match(r"^([A-Za-z_][\w.\[\]]*): (.*)$", msg, re.DOTALL)
    if not loc and m:
        return m.group(1), m.group(2)
    return loc or "(top level)", msg


def _has_key(cls: Any, loc: str) -> bool:
    node = cls
    for part in loc.split("."):
        fields = getattr(node, "model_fields", None)
        if fields is None:  # a union: the first member that is a model
            node = next((a for a in typing.get_args(node) if hasattr(a, "model_fields")), None)
            fields = getattr(node, "model_fields", {})
        if part not in fields:
            return False
        node = fields[part].annotation
    return True


def _other_kind_key(task: str, loc: str) -> str | None:
    """The kind a key belongs to when it is not this kind's (data.features in a causal_lm workflow)."""
    return next((name for name, kind in kinds().items() if name != task and _has_key(workflow_class(kind), loc)),
                None)


def validate(raw: dict[str, Any], source: str = "workflow") -> Workflow:
    """Validate a raw mapping as the workflow of its `task`; every problem is reported with its YAML path,
    all at once."""
    task = raw.get("task", DEFAULT)
    if not isinstance(task, str) or task not in kinds():
        raise UserError(f"{source}: invalid workflow\n  task: unknown task kind {task!r}; known: "
                        f"{', '.join(sorted(kinds()))}")
    try:
        return workflow_class(kind_for(task)).model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc, msg = _located(_loc(err["loc"]), err["msg"].removeprefix("Value error, "))
            if err["type"] == "extra_forbidden":
                other = _other_kind_key(task, loc)
                msg = (f"a {other} key, but task is {task} (set task: {other})" if other else
                       "unknown key (check the spelling against docs/workflow-reference.yaml or `kdflow schema`)")
            elif err["type"] == "missing" and "." not in loc:
                msg = f"required: task {task} has no default {loc} (docs/workflow-reference.yaml shows one)"
            lines.append(f"  {loc}: {msg}")
        raise UserError(f"{source}: invalid workflow\n" + "\n".join(lines)) from None


def workflow_schema() -> dict[str, Any]:
    """The JSON Schema of a workflow file (what `kdflow schema` prints): one branch per kind of task, which
    `task` selects (if/then: editors complete the keys of the workflow's kind, and a mistake is reported at
    its own key); unknown keys are errors there too."""
    classes = {name: workflow_class(kind) for name, kind in kinds().items()}
    defs: dict[str, Any] = {}
    branches = []
    for name, cls in classes.items():
        schema = cls.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(schema.pop("$defs", {}))
        defs[cls.__name__] = schema
        # a workflow without `task` is of the default kind: only the others' branches need it present
        selects = {"properties": {"task": {"const": name}}, **({} if name == DEFAULT else {"required": ["task"]})}
        branches.append({"if": selects, "then": {"$ref": f"#/$defs/{cls.__name__}"}})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "kdflow workflow", "type": "object",
            "properties": {"task": {"enum": list(classes), "default": DEFAULT,
                                    "description": "the kind of task; it selects the keys of every other section"}},
            "allOf": branches, "$defs": defs}


def load_workflow(path: str | Path, overrides: list[str] | None = None) -> Workflow:
    raw = load_raw(path)
    for key, value in parse_overrides(overrides or []):
        try:
            set_dotted(raw, key, value)
        except KeyError as exc:
            raise UserError(f"cannot set {key}: {_short(exc)}", where="--set") from None
    return validate(raw, source=str(path))
