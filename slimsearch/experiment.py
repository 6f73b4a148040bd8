"""The experiment file: a TOML document parsed into frozen dataclasses.

Every key is checked before anything runs: an unknown key gets the closest valid one suggested,
a value of the wrong type or outside its range names the field, the value and what is allowed.
Things that need the task to check (student knob names, for instance) are checked by the search
space as soon as the task is built, still before any training.

    name = "digits_mlp"
    task = "digits-mlp"          # a built-in name, or "my_package.my_module:make_task"
    seed = 0
    metrics = ["f1_macro", "accuracy"]   # optional: replaces the task's own (the first is the
                                         # accuracy objective; slimsearch.tasks.metrics)

    [task_options]   keyword arguments of the task's maker, e.g. sequence_length = 128

    [search]   trials, sampler, timeout, storage, sensitivity, starts, refine, backend,
               ray_address, cpus_per_trial
    [space]    bits, sparsity, pruning, student_init, vocabulary, embedding_bits,
               [space.student] knob = [choices]
    [train]    teacher_epochs, distill_epochs, finetune_epochs, qat_epochs, batch_size, lr, ...
    [target]   device, batch_sizes, dtype, runtime, threads, cuda_graphs, max_cv, max_repeats
    [constraints]  max_accuracy_drop, max_size_bytes, max_latency_ms, early_stop_margin, ...
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimsearch.errors import ConfigError, did_you_mean

#: Weight bit widths a layer may be stored with; 32 means plain float32.
ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, 32)
#: Which rows of a text model's token table a student keeps: all, or those of the tokens its
#: training split uses (and the special tokens).
VOCABULARIES = ("all", "seen")
#: Seeds are 0 <= seed < MAX_SEED: trial N runs with seed + N, and numpy and scikit-learn take
#: seeds below 2**32, which leaves room for 2**31 trials.
MAX_SEED = 2**31
ACTIVATION_BITS = (8, 32)
WEIGHT_SCHEMES = ("symmetric", "asymmetric")
DISTILLATION_KEYS = ("temperature", "alpha", "epochs", "hint_weight", "hidden_weight", "lr")
#: "global": one magnitude threshold across all layers that chose it; "2:4" keeps the 2
#: largest of every 4 consecutive weights (half the weights, always).
PRUNING_METHODS = ("structured", "unstructured", "global", "2:4")
#: How structured pruning ranks channels (see compression.pruning.IMPORTANCE).
IMPORTANCE_CRITERIA = ("l1", "l2", "bn_scale", "taylor")
STUDENT_INITS = ("slice", "scratch")
SAMPLERS = ("auto", "tpe", "gp", "nsga2", "random")
DTYPES = ("fp32", "fp16", "bf16")


#: search.refine when the experiment does not say: on digits-cnn at batch 256, 100 trials,
#: 0.3 against 0 raised the hypervolume in two seeds of three (+4% on average) and left fewer
#: hand-made recipes undominated (benchmarks/RESULTS.md, "Does the search beat the expert?").
REFINE_DEFAULT = 0.3


@dataclass(frozen=True)
class SearchConfig:
    """How long and how the search runs."""

    trials: int = 20
    #: "auto" chooses by the space and the trials finished (see search.samplers); or by name.
    sampler: str = "auto"
    #: Wall-clock budget such as "90s", "30m", "8h" or a number of seconds; no new trial
    #: starts after it.
    timeout: str | float | None = None
    #: An Optuna storage URL; None = a journal file inside the run folder.
    storage: str | None = None
    #: Before the first trial, measure each layer's accuracy drop when compressed alone, show
    #: it in the report and start the search from recipes it suggests (search.sensitivity).
    sensitivity: bool = True
    #: Enqueue the pre-pass's teacher-shaped starting recipes (search.sensitivity) as the first
    #: trials. Off where the teacher's shape is far from the front and a teacher-sized trial
    #: costs minutes (a depth knob on a transformer: experiments/minilm_bbc.toml).
    starts: bool = True
    #: The share of trials (a fraction, after the first 10 completed) that refine the front:
    #: a Pareto trial with one layer's bits, sparsity or pruning method changed, guided by
    #: the sensitivity pre-pass (search.refine); the sampler proposes the others.
    refine: float = REFINE_DEFAULT
    #: "local": trials in processes on this machine; "ray": on a Ray cluster, told to the same
    #: study (pip install "slimsearch[ray]"). The names are search.backends.BACKENDS'; the
    #: search checks this one before anything runs.
    backend: str = "local"
    #: The Ray cluster to join ("auto" or "host:port"); None starts Ray on this machine.
    ray_address: str | None = None
    #: CPU cores each Ray trial asks for (it trains with that many threads); None = the
    #: cluster's CPUs shared by the trials at once (--workers), at most one node's, like the
    #: local backend's workers share this machine's.
    cpus_per_trial: int | None = None

    def __post_init__(self) -> None:
        _require(self.trials >= 1, "search.trials", self.trials, "an integer >= 1")
        _require(isinstance(self.refine, int | float) and 0 <= self.refine < 1, "search.refine",
                 self.refine, "a fraction of the trials, >= 0 and < 1 (0: the sampler alone)")
        _require(self.cpus_per_trial is None or self.cpus_per_trial >= 1,
                 "search.cpus_per_trial", self.cpus_per_trial, "an integer >= 1")
        _require(self.sampler in SAMPLERS, "search.sampler", self.sampler, f"one of {SAMPLERS}")
        if self.timeout is not None:
            parse_duration(self.timeout, field_name="search.timeout")


@dataclass(frozen=True)
class SpaceConfig:
    """The choices each trial draws from; per-layer choices apply to every compressible layer."""

    bits: tuple[int, ...] = (2, 4, 8, 32)
    sparsity: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    pruning: tuple[str, ...] = ("structured", "unstructured")
    #: Channel-importance criteria for structured pruning (one per recipe).
    importance: tuple[str, ...] = ("l2",)
    student_init: tuple[str, ...] = STUDENT_INITS
    #: Per-channel weight quantization: symmetric (zero at code 0) or asymmetric (zero point).
    weight_scheme: tuple[str, ...] = ("symmetric",)
    #: Activation bit widths: 8 = static int8 execution where it is measured faster.
    activations: tuple[int, ...] = (32,)
    #: Structured pruning keeps a multiple of this many channels (fast kernels like 8).
    channel_multiple: int = 1
    #: Student-architecture knob -> choices; empty = the task's own defaults.
    student: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    #: Searchable distillation settings: temperature, alpha, epochs -> choices; a setting left
    #: out takes its value from [train].
    distillation: dict[str, tuple[float, ...]] = field(default_factory=dict)
    #: 0: every layer chooses its own bits, sparsity and pruning. N > 0: the layers are put in
    #: N groups of similar sensitivity (search.sensitivity's pre-pass) that share those
    #: choices: a smaller space for short budgets.
    layer_groups: int = 0
    #: Token-table rows a student keeps (VOCABULARIES; "seen" needs a task that says where its
    #: model reads token ids) and the bits its embedding tables are stored with.
    vocabulary: tuple[str, ...] = ("all",)
    embedding_bits: tuple[int, ...] = (32,)

    def __post_init__(self) -> None:
        _require(self.layer_groups >= 0, "space.layer_groups", self.layer_groups,
                 "0 (each layer alone) or a number of groups >= 1")
        for name in ("bits", "sparsity", "pruning", "importance", "student_init", "activations",
                     "weight_scheme", "vocabulary", "embedding_bits"):
            _require(len(getattr(self, name)) >= 1, f"space.{name}", [], "a non-empty list of choices")
        for b in self.bits:
            _require(b in ALLOWED_BITS, "space.bits", b, f"bit widths from {ALLOWED_BITS}")
        for s in self.sparsity:
            _require(0.0 <= s <= 0.95, "space.sparsity", s, "fractions from 0.0 to 0.95")
        for b in self.embedding_bits:
            _require(b in ALLOWED_BITS, "space.embedding_bits", b,
                     f"bit widths from {ALLOWED_BITS}")
        for v in self.vocabulary:
            _require(v in VOCABULARIES, "space.vocabulary", v, f"values from {VOCABULARIES}")
        for p in self.pruning:
            _require(p in PRUNING_METHODS, "space.pruning", p, f"values from {PRUNING_METHODS}")
        for i in self.student_init:
            _require(i in STUDENT_INITS, "space.student_init", i, f"values from {STUDENT_INITS}")
        for w in self.weight_scheme:
            _require(w in WEIGHT_SCHEMES, "space.weight_scheme", w, f"values from {WEIGHT_SCHEMES}")
        for c in self.importance:
            _require(c in IMPORTANCE_CRITERIA, "space.importance", c,
                     f"values from {IMPORTANCE_CRITERIA}")
        for a in self.activations:
            _require(a in ACTIVATION_BITS, "space.activations", a, f"values from {ACTIVATION_BITS}")
        _require(self.channel_multiple >= 1, "space.channel_multiple", self.channel_multiple,
                 "an integer >= 1")
        for key, choices in self.distillation.items():
            _require(key in DISTILLATION_KEYS, f"space.distillation.{key}", choices,
                     f"a key from {DISTILLATION_KEYS}{did_you_mean(key, DISTILLATION_KEYS)}")
            limits = {"temperature": (lambda c: c > 0, "temperatures > 0"),
                      "alpha": (lambda c: 0 <= c <= 1, "fractions from 0 to 1"),
                      "epochs": (lambda c: c >= 0 and float(c).is_integer(), "whole numbers >= 0"),
                      "hint_weight": (lambda c: c >= 0, "weights >= 0"),
                      "hidden_weight": (lambda c: c >= 0, "weights >= 0"),
                      "lr": (lambda c: c > 0, "learning rates > 0")}.get(key)
            if limits is not None:
                _require(len(choices) >= 1 and all(limits[0](c) for c in choices),
                         f"space.distillation.{key}", list(choices), f"a non-empty list of {limits[1]}")
        for knob, choices in self.student.items():
            _require(
                isinstance(choices, tuple) and len(choices) >= 1,
                f"space.student.{knob}",
                choices,
                "a non-empty list of choices",
            )


@dataclass(frozen=True)
class TrainConfig:
    """Epoch counts and optimiser settings for the teacher and for every trial."""

    teacher_epochs: int = 40
    #: Distillation epochs for a student that differs from the teacher.
    distill_epochs: int = 10
    #: Fine-tune epochs after pruning (skipped when nothing was pruned).
    finetune_epochs: int = 3
    #: Quantization-aware epochs with a straight-through estimator when any layer is quantized (< 32 bits).
    qat_epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    #: Distillation softmax temperature and the weight of the distillation term (0-1).
    temperature: float = 4.0
    alpha: float = 0.7
    #: Weight of the feature (hint) loss on the head's input; 0 = logits only.
    hint_weight: float = 0.0
    #: Weight of the loss on the hidden states of mapped transformer layers (each student
    #: layer against the teacher layer it started from); 0 = none.
    hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        _require(self.hint_weight >= 0, "train.hint_weight", self.hint_weight, "a number >= 0")
        _require(self.hidden_weight >= 0, "train.hidden_weight", self.hidden_weight,
                 "a number >= 0")
        for name in ("teacher_epochs", "distill_epochs", "finetune_epochs", "qat_epochs"):
            _require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "an integer >= 0")
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _require(self.lr > 0, "train.lr", self.lr, "a positive learning rate")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        _require(self.temperature > 0, "train.temperature", self.temperature, "a number > 0")
        _require(0 <= self.alpha <= 1, "train.alpha", self.alpha, "a fraction from 0 to 1")


@dataclass(frozen=True)
class TargetConfig:
    """Where and how the deployed model runs: latency is measured here, the way it will run."""

    device: str = "auto"
    #: Batch sizes (samples per call) to time; the first is the latency objective, the others
    #: are reported beside it.
    batch_sizes: tuple[int, ...] = (1,)
    #: Precision the model executes in: fp32, or fp16/bf16 (weights and activations cast).
    dtype: str = "fp32"
    #: torch (eager), torchscript (traced and frozen) or onnxruntime (CPU): what is sized,
    #: timed and exported is this runtime's own file. The names are runtimes.RUNTIMES', which
    #: also checks what each can serve (device, dtype) before anything runs.
    runtime: str = "torch"
    #: torch intra-op threads (or onnxruntime intra-op threads) while timing on CPU.
    threads: int = 1
    #: Replay the model as a captured CUDA graph (torch runtime on CUDA; saves the launch
    #: overhead that dominates small models). Ignored on CPU.
    cuda_graphs: bool = False
    #: CUDA: a latency measurement whose median moved more than this between its blocks of
    #: samples (coefficient of variation of the block medians, a fraction) is repeated, up to
    #: ``max_repeats`` times; the steadiest one is kept. (On the CPU every model is timed
    #: against the teacher, to an interval of its own: timing.paired.)
    max_cv: float = 0.1
    max_repeats: int = 1

    def __post_init__(self) -> None:
        _require(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            "target.device",
            self.device,
            "'auto', 'cpu', 'cuda' or 'cuda:N'",
        )
        _require(len(self.batch_sizes) >= 1 and all(b >= 1 for b in self.batch_sizes)
                 and len(set(self.batch_sizes)) == len(self.batch_sizes),
                 "target.batch_sizes", list(self.batch_sizes),
                 "a list of distinct integers >= 1, the objective's first, e.g. [1, 256]")
        _require(self.dtype in DTYPES, "target.dtype", self.dtype, f"one of {DTYPES}")
        _require(self.threads >= 1, "target.threads", self.threads, "an integer >= 1")
        _require(0 < self.max_cv, "target.max_cv", self.max_cv, "a fraction > 0, e.g. 0.1")
        _require(self.max_repeats >= 0, "target.max_repeats", self.max_repeats, "an integer >= 0")

    @property
    def batch_size(self) -> int:
        """The batch size of the latency objective."""
        return self.batch_sizes[0]


@dataclass(frozen=True)
class ConstraintsConfig:
    """What a deployable model must meet. Trials that miss are kept (and shown) but are not
    on the Pareto front; the sampler learns to avoid them (Optuna's constraint support)."""

    #: Validation accuracy may be at most this far below the teacher's (a fraction: 0.01 is
    #: one percentage point).
    max_accuracy_drop: float | None = None
    #: The deployable file may be at most this many bytes.
    max_size_bytes: int | None = None
    #: Latency at the objective batch size may be at most this many milliseconds.
    max_latency_ms: float | None = None
    #: A trial whose validation accuracy, checked during training, is more than this below
    #: what max_accuracy_drop allows is stopped early (PRUNED) as hopeless; None (the
    #: default): never. Off unless set, because the stages after the one judged climb far:
    #: at 0.05, 22 of the 37 digits-cnn trials it stopped met max_accuracy_drop = 0.05 when
    #: built to the end (benchmarks/stage_curves.py --stopped, benchmarks/RESULTS.md).
    early_stop_margin: float | None = None
    #: ...checked after this many epochs of each training stage, or half the stage where
    #: that is later (a student distilled for 15 epochs is still climbing after 2).
    early_stop_after_epochs: int = 2

    def __post_init__(self) -> None:
        if self.max_accuracy_drop is not None:
            _require(0 <= self.max_accuracy_drop, "constraints.max_accuracy_drop",
                     self.max_accuracy_drop, "a drop of 0 or more in the task's first metric: "
                     "for accuracy a fraction, e.g. 0.01 for one point")
        if self.max_size_bytes is not None:
            _require(self.max_size_bytes > 0, "constraints.max_size_bytes", self.max_size_bytes,
                     "a number of bytes > 0")
        if self.max_latency_ms is not None:
            _require(self.max_latency_ms > 0, "constraints.max_latency_ms", self.max_latency_ms,
                     "a number of milliseconds > 0")
        if self.early_stop_margin is not None:
            _require(0 <= self.early_stop_margin < 1, "constraints.early_stop_margin",
                     self.early_stop_margin, "a fraction from 0 to 1, or leave it out")
        _require(self.early_stop_after_epochs >= 1, "constraints.early_stop_after_epochs",
                 self.early_stop_after_epochs, "an integer >= 1")

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.max_accuracy_drop, self.max_size_bytes,
                                           self.max_latency_ms))


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment file, fully validated."""

    name: str
    task: str
    seed: int = 0
    description: str = ""
    #: The task's metrics by name, replacing its own (``tasks.metrics.BUILT_IN``; the first is
    #: the accuracy objective); None keeps the task's. Checked when the task is built.
    metrics: tuple[str, ...] | None = None
    #: Keyword arguments of the task's maker (``[task_options]``; minilm-bbc:
    #: ``sequence_length``), checked against its signature when the task is built.
    task_options: dict[str, Any] = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    #: Folder of the experiment file; plug-in task modules are imported from here too.
    base_dir: Path = field(default=Path("."), compare=False)

    def __post_init__(self) -> None:
        # A plain folder name: "." or ".." would make the run folder runs/ or the current one.
        _require(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.name) is not None, "name",
                 self.name, "a plain folder name of letters, digits, '_', '-' and '.', not "
                 "starting with '.' or '-' (it names the run folder runs/<name>)")
        _require(0 <= self.seed < MAX_SEED, "seed", self.seed,
                 f"an integer from 0 to {MAX_SEED - 1} (trial N is seeded with seed + N)")
        _require(bool(self.task), "task", self.task, "a built-in task name or 'module:function'")
        if self.space.layer_groups and not self.search.sensitivity:
            raise ConfigError(f"space.layer_groups = {self.space.layer_groups} groups layers by "
                              "the sensitivity pre-pass, but search.sensitivity = false; turn "
                              "it on, or set space.layer_groups = 0")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every setting (the run folder stores it to detect changes)."""
        data = dataclasses.asdict(self)
        data.pop("base_dir")
        return data

    def with_overrides(self, **changes: Any) -> ExperimentConfig:
        """A copy with top-level fields replaced (``search=...``); validation runs again."""
        return dataclasses.replace(self, **changes)


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment TOML file; raise ``ConfigError`` on any bad key or value."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"experiment file {str(path)!r} is a folder; give the .toml file in "
                          "it. List the shipped ones with: slimsearch list")
    if not path.is_file():
        raise ConfigError(f"experiment file {str(path)!r} does not exist. List the shipped ones "
                          "with: slimsearch list")
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
                          "TOML files are UTF-8: save it with that encoding") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"experiment file {str(path)!r} cannot be read: {exc.strerror}") from exc
    raw.setdefault("name", path.stem)
    return parse_experiment(raw, base_dir=path.resolve().parent, source=str(path))


def parse_experiment(raw: dict[str, Any], *, base_dir: Path, source: str) -> ExperimentConfig:
    """Build an ``ExperimentConfig`` from an already-parsed TOML table."""
    sections = {"search": SearchConfig, "space": SpaceConfig, "train": TrainConfig,
                "target": TargetConfig, "constraints": ConstraintsConfig}
    try:
        top = _build(ExperimentConfig, raw, prefix="", nested=sections, skip={"base_dir"})
        return dataclasses.replace(top, base_dir=base_dir)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def parse_duration(text: str, *, field_name: str = "timeout") -> float:
    """Parse "45s", "30m", "8h", "1h30m" or a plain number of seconds into seconds (> 0)."""
    text = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        if float(text) <= 0:
            raise ConfigError(f"{field_name}: {text!r} must be longer than zero")
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ConfigError(f"{field_name}: {text!r} is not a duration; write e.g. '90s', '30m', "
                          "'8h' or '1h30m'")
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    seconds = sum(float(n) * unit[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"{field_name}: {text!r} must be longer than zero")
    return seconds


def _require(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name} = {value!r} is not allowed; expected {allowed}")


#: Keys that once had a meaning and no longer do: an experiment (or a run folder) that still
#: sets one loads, with a warning that says why it is ignored.
RETIRED_KEYS = {
    "target.quiet_wait_s": "CPU latency is timed against the teacher in the same moments now "
                           "(timing.paired), so no measurement waits for a quiet machine",
}


def _build(cls: type, table: Any, *, prefix: str, nested: dict[str, type] | None = None,
           skip: set[str] | None = None) -> Any:
    """Instantiate dataclass ``cls`` from ``table``, checking unknown keys and types."""
    where = prefix.rstrip(".") or "the experiment"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in (skip or set())]
    for key in list(table):
        if f"{prefix}{key}" in RETIRED_KEYS:
            warnings.warn(f"{prefix}{key} is ignored: {RETIRED_KEYS[prefix + key]}; remove it "
                          "from the experiment file", stacklevel=2)
            table = {k: v for k, v in table.items() if k != key}
        elif key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}' in {where}."
                              f"{did_you_mean(key, names)} Valid keys: {', '.join(names)}")
    kwargs: dict[str, Any] = {}
    for name in names:
        if name not in table:
            continue
        if nested and name in nested:
            kwargs[name] = _build(nested[name], table[name], prefix=f"{name}.")
        else:
            kwargs[name] = _coerce(table[name], hints[name], f"{prefix}{name}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name in names and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key {prefix}{missing[0]!r} in {where}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, field_name: str) -> Any:
    """Check ``value`` against a type hint; lists become tuples so configs stay frozen."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, field_name)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{field_name} = {value!r} should be a list, e.g. [1, 2]")
        item = typing.get_args(hint)[0]
        return tuple(value if item is Any else [_coerce(v, item, field_name) for v in value])
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{field_name} = {value!r} should be a table")
        return {k: _coerce(v, typing.get_args(hint)[1], f"{field_name}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):  # TOML has inf and nan; no setting means them
            raise ConfigError(f"{field_name} = {value!r} is not allowed; expected a finite number")
        return float(value)
    if hint is Path:
        return Path(value)
    if hint is Any or (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{field_name} = {value!r} has the wrong type; expected {hint.__name__}")
