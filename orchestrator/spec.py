"""The workflow spec: pydantic models for every key of the workflow YAML, and how a file becomes one.

Every model forbids unknown keys, so a typo is an error that names its YAML path, never a silent default.
"""

from __future__ import annotations

import copy
import operator
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.errors import UserError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class S3Options(Strict):
    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False


class StorageSpec(Strict):
    root: str = ".kdflow"
    s3: S3Options | None = None


class TrackingSpec(Strict):
    uri: str | None = None
    experiment: str | None = None


class SplitSpec(Strict):
    val: float = Field(0.15, ge=0.0, lt=1.0)
    test: float = Field(0.15, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> SplitSpec:
        if self.val + self.test >= 0.9:
            raise ValueError("val + test must leave at least 10% of the rows for training")
        return self


class TokenizerSpec(Strict):
    """task causal_lm: a local tokenizer directory (tokenizer.json), or a byte-level BPE trained on the
    training documents with this vocabulary size (kept in the store, reused by reruns)."""

    path: str | None = None
    vocab_size: int = Field(512, ge=260, description="BPE vocabulary: 256 bytes + EOS + merges")


class CorpusSpec(Strict):
    """The built-in corpus (source: python-stdlib): a deterministic subset of the interpreter's stdlib."""

    max_bytes: int | None = Field(2_000_000, ge=1000)
    max_files: int | None = Field(None, ge=1)


# data: keys that only one task kind reads; set to anything but their default on the other kind's workflow,
# they are an error
LM_DATA_KEYS = ("text", "prompt", "completion", "seq_len", "tokenizer", "corpus")
CLASSIFICATION_DATA_KEYS = ("features", "label", "transfer")


class DataSpec(Strict):
    source: str = "sklearn:digits"
    features: list[str] | str | None = None
    label: str = "label"
    split: SplitSpec = SplitSpec()
    transfer: int | str | None = None
    limit: int | None = Field(None, ge=1, description="use only the first N rows (documents for causal_lm)")
    # task causal_lm only
    text: str | None = Field(None, description="the text column (default 'text')")
    prompt: str | None = Field(None, description="prompt column: its tokens are inputs, never targets")
    completion: str | None = Field(None, description="completion column (with prompt)")
    seq_len: int = Field(128, ge=2, description="tokens per packed row")
    tokenizer: TokenizerSpec = TokenizerSpec()
    corpus: CorpusSpec = CorpusSpec()

    @field_validator("transfer")
    @classmethod
    def _positive_rows(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError("a transfer row count must be >= 1")
        return v


class ScheduleKeys(Strict):
    """The learning-rate schedule and gradient clipping; the defaults change nothing (constant lr, no clip)."""

    schedule: Literal["constant", "cosine"] = Field("constant", description="cosine: decay to 0 over the fit")
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 over this many steps")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradients' global norm to this")


class TeacherTrainSpec(ScheduleKeys):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class ModelSpec(Strict):
    model: str = "mlp"
    params: dict[str, Any] = Field(default_factory=dict)


class TeacherSpec(ModelSpec):
    train: TeacherTrainSpec = TeacherTrainSpec()
    checkpoint: str | None = None


class SoftTargetSpec(Strict):
    shards: int = Field(4, ge=1)
    format: Literal["logits", "topk"] = "logits"
    top_k: int | None = Field(None, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    ensemble: Literal["mean_probs", "mean_logits"] = "mean_probs"
    max_retries: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _topk_needs_k(self) -> SoftTargetSpec:
        if self.format == "topk" and self.top_k is None:
            raise ValueError("format 'topk' needs top_k (the number of classes kept per row)")
        return self


class DistillSpec(Strict):
    loss: str = "kl"
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1)
    beta: float = Field(0.5, ge=0, le=1, description="generalized JSD mixture weight (loss: jsd)")
    baseline: bool = Field(False, description="causal_lm: also train the student on hard labels only (no KD)")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        from tasks.losses import LOSSES

        if v not in LOSSES:
            raise ValueError(f"unknown loss {v!r}; known: {', '.join(sorted(LOSSES))}")
        return v


class OptimizerSpec(ScheduleKeys):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)


class EarlyStoppingSpec(Strict):
    metric: str = "val_accuracy"
    patience: int = Field(5, ge=1)
    mode: Literal["max", "min"] | None = None

    @property
    def direction(self) -> str:
        if self.mode:
            return self.mode
        return "min" if "loss" in self.metric else "max"


class TrainSpec(Strict):
    epochs: int = Field(20, ge=1)
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


# What a trial can be judged on: the train loop's per-epoch metrics (read at the best epoch) and the size.
OBJECTIVE_METRICS = ("val_accuracy", "val_loss", "val_agreement", "train_loss", "train_kd", "train_ce",
                     "samples_per_s", "num_params", "val_perplexity")


class Objective(Strict):
    metric: str = "val_accuracy"
    direction: Literal["maximize", "minimize"] = "maximize"

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in OBJECTIVE_METRICS:
            raise ValueError(f"unknown metric {v!r}; known: {', '.join(OBJECTIVE_METRICS)}")
        return v


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

    @field_validator("select")
    @classmethod
    def _known_rule(cls, v: str) -> str:
        from orchestrator.search.selection import parse_select_rule

        parse_select_rule(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpec:
        from orchestrator.search.selection import check_rule

        metrics = [o.metric for o in self.objectives]
        if len(set(metrics)) < len(metrics):
            raise ValueError(f"objectives: a metric appears twice ({', '.join(metrics)})")
        if self.sampler == "cmaes" and len(metrics) > 1:
            raise ValueError("sampler: cmaes optimises one objective; use nsga2 or tpe for several")
        check_rule(self.select, [(o.metric, o.direction) for o in self.objectives])
        return self


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


# What a gate can compare: every metric a run records for the student (registry.py stores them as
# kdflow.<metric> tags on the version, so `kdflow promote` can re-check them later).
GATE_METRICS = ("test_accuracy", "retention", "num_params", "latency_ms", "model_bytes", "teacher_agreement",
                "teacher_test_accuracy", "samples_per_s", "epochs",
                # causal_lm (orchestrator/lm_run.py): perplexity_ratio is the student's over the teacher's
                "perplexity", "perplexity_ratio", "teacher_perplexity", "baseline_perplexity", "tokens_per_s")


GateRule = Annotated[str, BeforeValidator(lambda v: v if v is None else _gate(v))]


class GatesSpec(Strict):
    """`metric: "<op> number"` for any metric in GATE_METRICS, plus `beats_alias: ALIAS`."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    __pydantic_extra__: dict[str, GateRule | None] = Field(init=False)

    beats_alias: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_metrics(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k != "beats_alias" and k not in GATE_METRICS]
            if unknown:
                raise ValueError(f"no metric {unknown[0]!r} to gate on; known: {', '.join(GATE_METRICS)}, "
                                 "and beats_alias")
        return data

    def comparisons(self) -> dict[str, Gate]:
        """metric -> rule, in the order the YAML gives them."""
        return {k: Gate(v) for k, v in (self.model_extra or {}).items() if v is not None}


class PromoteSpec(Strict):
    alias: str = "champion"
    gates: GatesSpec = GatesSpec()


class RegistrySpec(Strict):
    model: str | None = None
    promote: PromoteSpec | None = None


class Workflow(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    task: Literal["classification", "causal_lm"] = Field(
        "classification", description="the task kind (tasks/kinds): rows -> a class, or causal language models")
    seed: int = 0
    storage: StorageSpec = StorageSpec()
    tracking: TrackingSpec = TrackingSpec()
    data: DataSpec = DataSpec()
    teacher: TeacherSpec | list[TeacherSpec] = TeacherSpec(params={"hidden": [256, 256]})
    soft_targets: SoftTargetSpec = SoftTargetSpec()
    student: ModelSpec = ModelSpec(params={"hidden": [32]})
    distill: DistillSpec = DistillSpec()
    train: TrainSpec = TrainSpec()
    search: SearchSpec | None = None
    registry: RegistrySpec = RegistrySpec()

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
    def _keys_of_this_task(self) -> Workflow:
        """A key the workflow's task kind does not read is an error naming it, never silently ignored."""
        d, default = self.data, DataSpec()

        def changed(keys: tuple[str, ...]) -> list[str]:  # set to anything but its default
            return [f"data.{k}" for k in keys if getattr(d, k) != getattr(default, k)]

        if self.task == "causal_lm":
            wrong = changed(CLASSIFICATION_DATA_KEYS)
            if "teacher" in self.model_fields_set and not isinstance(self.teacher, list) and self.teacher.checkpoint:
                wrong.append("teacher.checkpoint")
            if wrong:
                raise ValueError(f"{wrong[0]}: a classification key, but task is causal_lm")
            from tasks.losses import TOKEN_LOSSES

            if self.distill.loss not in TOKEN_LOSSES:
                raise ValueError(f"distill.loss: {self.distill.loss!r} has no per-token form for causal_lm; "
                                 f"use one of {', '.join(TOKEN_LOSSES)}")
            if self.registry.promote and self.registry.promote.gates.beats_alias:
                raise ValueError("registry.promote.gates.beats_alias: not available for causal_lm yet (gate on "
                                 "perplexity or perplexity_ratio)")
            if "source" not in d.model_fields_set:
                d.source = "python-stdlib"
            for key in ("teacher", "student"):
                if key not in self.model_fields_set:
                    raise ValueError(f"{key}: a causal_lm workflow names its {key} (e.g. model: llama, params: "
                                     "{layers: 2, width: 64, heads: 4})")
        else:
            wrong = changed(LM_DATA_KEYS)
            if self.distill.baseline:
                wrong.append("distill.baseline")
            if wrong:
                raise ValueError(f"{wrong[0]}: a causal_lm key, but task is {self.task} (set task: causal_lm)")
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
                                     "soft_targets"):
                raise ValueError(f"search.space.{key}: only student, distill and train keys can be searched "
                                 "(the teacher and soft targets are computed once per search)")
            if key.startswith("student.params.") and (unknown := _unknown_model_param(self.student.model, key)):
                raise ValueError(f"search.space.{key}: {unknown}")
            samples = param.choices if isinstance(param, CategoricalParam) else [param.low, param.high]
            for sample in samples:  # both ends of a range, every choice: a trial must never be invalid
                trial = copy.deepcopy(base)
                try:
                    set_dotted(trial, key, sample, must_exist=not key.startswith("student.params."))
                    Workflow.model_validate(trial)
                except (KeyError, ValidationError) as exc:
                    raise ValueError(f"search.space.{key}: not a valid workflow key for value {sample!r} "
                                     f"({_short(exc)})") from None
        return self


def _unknown_model_param(model: str, key: str) -> str | None:
    """For a built-in family: why student.params.NAME is not one of its parameters (None if it is)."""
    import inspect

    from tasks.models import MODELS

    name = key.split(".")[2]
    if model not in MODELS:
        return None  # a user factory: checked when it is built
    params = inspect.signature(MODELS[model]).parameters
    if name in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    known = [p for p in params if p not in ("num_features", "num_classes")]
    return f"{model} has no parameter {name!r} (it takes {', '.join(known)})"


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in exc.errors())
    return str(exc).strip("'\"")


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or str(part).endswith("Spec"):
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


def validate(raw: dict[str, Any], source: str = "workflow") -> Workflow:
    """Validate a raw mapping; every problem is reported with its YAML path, all at once."""
    try:
        return Workflow.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = _loc(err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling against docs/workflow-reference.yaml or `kdflow schema`)"
            lines.append(f"  {loc}: {msg}")
        raise UserError(f"{source}: invalid workflow\n" + "\n".join(lines)) from None


def workflow_schema() -> dict[str, Any]:
    """The JSON Schema of a workflow file (what `kdflow schema` prints); unknown keys are errors there too."""
    schema = Workflow.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kdflow workflow"
    return schema


def load_workflow(path: str | Path, overrides: list[str] | None = None) -> Workflow:
    raw = load_raw(path)
    for key, value in parse_overrides(overrides or []):
        try:
            set_dotted(raw, key, value)
        except KeyError as exc:
            raise UserError(f"cannot set {key}: {_short(exc)}", where="--set") from None
    return validate(raw, source=str(path))
