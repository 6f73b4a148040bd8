"""The search space: student knobs, then per-layer sparsity, pruning method and bit width.

``SearchSpace`` knows no search engine: ``suggest`` takes anything with Optuna's
``suggest_categorical(name, choices)`` method, so Optuna and Ray Tune share it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from slimsearch.errors import ConfigError, did_you_mean
from slimsearch.experiment import SpaceConfig
from slimsearch.spaces.recipe import LayerRecipe, Recipe
from slimsearch.tasks import Task
from slimsearch.tasks.attention import attention_blocks
from slimsearch.tasks.data import Inputs, call_model, output_tensor
from slimsearch.tasks.tokens import token_embeddings

COMPRESSIBLE = (nn.Linear, nn.Conv2d)
#: At most this many student shapes are built to find the smallest.
MAX_STUDENTS_SIZED = 64


class Suggester(Protocol):
    """The one method of an Optuna trial the space uses."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class LayerInfo:
    """A compressible layer: its qualified name, type and whether its outputs may be removed."""

    name: str
    kind: str
    structured_ok: bool
    #: Inputs per output (in_features, or in_channels / groups * kernel area).
    fan_in: int = 0
    #: Weights in the layer (its bias not counted).
    weights: int = 0

    @property
    def outputs(self) -> int:
        """Its outputs (out_features or out_channels)."""
        return self.weights // max(self.fan_in, 1)


def compressible_layers(model: nn.Module, example_input: Inputs) -> list[LayerInfo]:
    """Linear and Conv2d layers in execution order; the one producing the model's output
    (the classifier head) may only be pruned unstructured, since its outputs are the classes.
    Structured pruning of an attention block's ``q_proj`` removes whole heads."""
    order: list[str] = []
    outputs: dict[str, Any] = {}  # the tensors themselves: ids of freed tensors get reused
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, COMPRESSIBLE):
            def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
                order.append(name)
                outputs[name] = out
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            final = output_tensor(call_model(model, example_input))
    finally:
        for h in hooks:
            h.remove()
    kinds = dict(model.named_modules())
    seen = list(dict.fromkeys(order))
    # In attention, structured pruning of q_proj removes whole heads, and k, v and the
    # output projection follow it; alone, their channels cannot go (tasks.attention).
    followers = {block.layer_name(role) for block in attention_blocks(model).values()
                 for role in ("k", "v", "out")}
    # The last layer run is the head even when forward post-processes its output.
    return [LayerInfo(n, type(kinds[n]).__name__,
                      structured_ok=outputs[n] is not final and n != seen[-1] and n not in followers,
                      fan_in=kinds[n].weight[0].numel(), weights=kinds[n].weight.numel())
            for n in seen]


class SearchSpace:
    """Choices for one task, validated against it; ``suggest`` turns a trial into a Recipe."""

    def __init__(self, task: Task, config: SpaceConfig) -> None:
        self.task = task
        self.config = config
        knobs = dict(task.student_choices)
        for knob, choices in config.student.items():
            if knob not in task.teacher_kwargs:
                raise ConfigError(
                    f"space.student.{knob}: task {task.name!r} has no student knob {knob!r}."
                    f"{did_you_mean(knob, task.teacher_kwargs)} Its knobs: "
                    f"{', '.join(task.teacher_kwargs)}")
            knobs[knob] = tuple(choices)
        self.student_choices: dict[str, tuple[Any, ...]] = knobs
        self._layers: dict[str, list[LayerInfo]] = {}
        #: Layer name -> group name, for layers that share their choices (``set_groups``).
        self.groups: dict[str, str] = {}
        #: Layers the search never prunes (``set_not_prunable``).
        self.not_prunable: frozenset[str] = frozenset()
        #: Layers the search never prunes structurally, and why (``set_not_structured``).
        self.not_structured: dict[str, str] = {}
        # Build every choice of every knob once (the others at the teacher's values), so a
        # value the factory rejects fails here, before any training.
        for knob, choices in self.student_choices.items():
            for value in choices:
                self.layers_for(dict(self.task.teacher_kwargs, **{knob: value}))
        self._check_embedding_choices()

    def _check_embedding_choices(self) -> None:
        """``space.vocabulary`` "seen" needs a task that names its token-id input, read by an
        embedding table; ``space.embedding_bits`` below 32 needs an embedding table."""
        wants_seen = "seen" in self.config.vocabulary
        if not wants_seen and all(b == 32 for b in self.config.embedding_bits):
            return
        model = self.task.build_model(**self.task.teacher_kwargs).eval()
        if not any(isinstance(m, nn.Embedding) for m in model.modules()):
            raise ConfigError(f"space.embedding_bits = {list(self.config.embedding_bits)}, "
                              f"space.vocabulary = {list(self.config.vocabulary)}: task "
                              f"{self.task.name!r}'s model has no nn.Embedding; remove them")
        if not wants_seen:
            return
        vocabulary = self.task.vocabulary
        if vocabulary is None:
            raise ConfigError(f"space.vocabulary = {list(self.config.vocabulary)}: task "
                              f"{self.task.name!r} does not say where its model reads token "
                              "ids; give its Task vocabulary=slimsearch.Vocabulary(input="
                              "'input_ids', unknown=<[UNK] id>, keep=(<special ids>)), or "
                              "set space.vocabulary = [\"all\"]")
        try:
            found = token_embeddings(model, self.task.example_inputs(1), vocabulary.input)
        except (KeyError, IndexError) as exc:
            found, why = [], f" ({exc})"
        else:
            why = ""
        if not found:
            raise ConfigError(f"space.vocabulary = {list(self.config.vocabulary)}: no "
                              f"nn.Embedding of task {self.task.name!r}'s model looks up its "
                              f"input {vocabulary.input!r} (the task's vocabulary.input){why}; "
                              "name the input that holds the token ids")

    def layers_for(self, student: dict[str, Any]) -> list[LayerInfo]:
        """The compressible layers of the student built with knob values ``student``."""
        key = json.dumps(student, sort_keys=True)
        if key not in self._layers:
            try:
                model = self.task.build_model(**student)
                self._layers[key] = compressible_layers(model.eval(), self.task.example_inputs(1))
            except Exception as exc:
                raise ConfigError(f"space.student = {student}: the task's model factory failed "
                                  f"with these knob values: {type(exc).__name__}: {exc}") from exc
            if not self._layers[key]:
                raise ConfigError(f"task {self.task.name!r}: the model has no Linear or Conv2d "
                                  "layer to compress")
        return self._layers[key]

    def set_groups(self, groups: dict[str, str]) -> None:
        """Let the layers of each group share one set of choices: their Optuna parameters
        are named after the group (Optuna gives a name the same value within a trial). A
        member that can take only some of the pruning methods (no 2:4 where its fan-in is not
        a multiple of 4, no structured pruning of the class outputs) gets a pruning parameter
        named after that list (``_pruning_choice``), so it shares its pruning method with the
        members that have the same list only; bits and sparsity stay shared by all."""
        self.groups = dict(groups)

    def set_not_structured(self, blocked: dict[str, str]) -> None:
        """Never prune these layers structurally (``{name: why}``, from
        ``compression.pruning.structured_blockers``): they keep the other methods."""
        self.not_structured = dict(blocked)

    def set_not_prunable(self, names: set[str]) -> None:
        """Never prune these layers (sparsity 0, no parameter suggested): the model's forward
        failed with them pruned (the sensitivity pre-pass found it)."""
        self.not_prunable = frozenset(names)

    def _key(self, layer: str) -> str:
        """The prefix of a layer's parameters: its group's name, or its own."""
        return self.groups.get(layer, layer)

    def suggest(self, trial: Suggester) -> Recipe:
        """Draw a Recipe: knobs first, then each layer of that student (a conditional space)."""
        student = dict(self.task.teacher_kwargs)
        for knob, choices in self.student_choices.items():
            student[knob] = trial.suggest_categorical(f"student.{knob}", choices)
        init = self._student_init(student) or trial.suggest_categorical(
            "student.init", self.config.student_init)
        layers = {}
        for info in self.layers_for(student):
            key = self._key(info.name)
            sparsity = 0.0 if info.name in self.not_prunable else \
                trial.suggest_categorical(f"{key}.sparsity", self.config.sparsity)
            method = "unstructured"  # the label of an unpruned layer; it prunes nothing
            if sparsity > 0:
                # Always the full choice list: Optuna rejects a parameter whose choices change.
                choice = self._pruning_choice(info)
                method = choice[1][0] if choice[0] is None else trial.suggest_categorical(*choice)
                if method == "2:4":
                    sparsity = 0.5  # the pattern fixes the amount
            bits = trial.suggest_categorical(f"{key}.bits", self.config.bits)
            layers[info.name] = LayerRecipe(sparsity=float(sparsity), pruning=method, bits=int(bits))
        activations = self.config.activations[0] if len(self.config.activations) == 1 else \
            trial.suggest_categorical("activation_bits", self.config.activations)
        importance = self.config.importance[0] if len(self.config.importance) == 1 else \
            trial.suggest_categorical("importance", self.config.importance)
        scheme = self.config.weight_scheme[0] if len(self.config.weight_scheme) == 1 else \
            trial.suggest_categorical("weight_scheme", self.config.weight_scheme)
        distillation = {key: choices[0] if len(choices) == 1 else
                        trial.suggest_categorical(f"distillation.{key}", choices)
                        for key, choices in self.config.distillation.items()}
        vocabulary = self.config.vocabulary[0] if len(self.config.vocabulary) == 1 else \
            trial.suggest_categorical("vocabulary", self.config.vocabulary)
        embedding_bits = self.config.embedding_bits[0] if len(self.config.embedding_bits) == 1 \
            else trial.suggest_categorical("embedding_bits", self.config.embedding_bits)
        return Recipe(student=student, student_init=init, layers=layers,
                      activation_bits=int(activations), importance=importance,
                      distillation=distillation, weight_scheme=scheme, vocabulary=vocabulary,
                      embedding_bits=int(embedding_bits))

    def _student_init(self, student: dict[str, Any]) -> str | None:
        """The init when there is no choice to make, else None. A teacher-shaped student
        starts from the teacher whenever "slice" is allowed: from scratch it would only be
        a worse copy of the teacher."""
        if len(self.config.student_init) == 1:
            return self.config.student_init[0]
        if student == dict(self.task.teacher_kwargs):
            return "slice"
        return None

    def _methods(self, info: LayerInfo) -> tuple[str, ...]:
        """Pruning methods this layer may use: no structured pruning of the class outputs or
        of a layer it cannot shrink (``not_structured``), no 2:4 where the inputs per output
        are not a multiple of 4 (a 1-channel 3x3 conv has 9)."""
        return tuple(m for m in self.config.pruning
                     if (m != "structured" or (info.structured_ok
                                               and info.name not in self.not_structured))
                     and (m != "2:4" or info.fan_in % 4 == 0)) or ("unstructured",)

    def _pruning_choice(self, info: LayerInfo) -> tuple[str | None, tuple[str, ...]]:
        """(Optuna parameter name, methods) for this layer; the name is None when there is
        only one method. Optuna wants one choice list per parameter name, so a layer that can
        take only some of the configured methods gets a name that says which."""
        methods = self._methods(info)
        if len(methods) == 1:
            return None, methods
        if methods == self.config.pruning:
            return f"{self._key(info.name)}.pruning", methods
        return f"{self._key(info.name)}.pruning[{','.join(methods)}]", methods

    def baselines(self) -> dict[str, Recipe]:
        """The recipes an expert tries first, by name, in this order: ``teacher`` (as-is),
        ``uniform-int8`` (every layer at 8 bits), structured pruning of every layer that
        allows it at the space's sparsities nearest 50% and 75% with 8-bit weights
        (``structured-50%-int8``, ...), ``4-bit-weights``, the two together
        (``structured-50%-4-bit``), all with int8 activations where the space has them;
        ``weight-only-4-bit`` (4-bit weights, float activations: what an LLM's user tries
        first), where that differs from ``4-bit-weights``; ``half-width-student``: the
        teacher sliced to the width choices nearest half its own (``half_width_student``), float;
        ``half-width-student-int8``: the same student with 8-bit weights (distil, then
        quantize: DistilBERT with PyTorch's dynamic int8 is what a user of a transformer tries
        next), and ``half-width-structured-50%-int8``: that student pruned as
        ``structured-50%-int8`` too (every method stacked). Derived from this space's choices;
        only those it can express, without repeats (a space without 32 bits cannot enqueue
        the teacher). In a grouped space a member that cannot lose whole outputs shares its
        group's sparsity, pruned unstructured."""
        config = self.config
        teacher = dict(self.task.teacher_kwargs)
        int8_acts = min(config.activations)  # 8 where the space has it (ACTIVATION_BITS)
        vocabulary = "all" if "all" in config.vocabulary else config.vocabulary[0]

        def embedding_bits(bits: int) -> int:  # the layers' bits where the space has them
            choices = config.embedding_bits
            return bits if bits in choices else 32 if 32 in choices else max(choices)

        def uniform(*, bits: int, acts: int, sparsity: float = 0.0, student: dict | None = None,
                    pruning: str = "unstructured") -> Recipe:
            student = student or teacher
            infos = self.layers_for(student)
            # In a grouped space the members share one sparsity: where a group prunes, a
            # member that cannot take ``pruning`` prunes by another of its methods, as
            # ``suggest`` would give it (a BERT group mixes queries, which lose whole heads,
            # with keys and values, which cannot alone).
            pruned_groups = {self.groups.get(i.name) for i in infos
                             if pruning in self._methods(i) and i.name not in self.not_prunable}
            layers = {}
            for info in infos:
                methods = self._methods(info)
                method = pruning if pruning in methods else (
                    methods[0] if self.groups.get(info.name) in pruned_groups - {None} else None)
                pruned = sparsity > 0 and info.name not in self.not_prunable and method is not None
                layers[info.name] = LayerRecipe(sparsity=sparsity if pruned else 0.0,
                                                pruning=method if pruned else "unstructured",
                                                bits=bits)
            return Recipe(student=student, student_init="slice", layers=layers,
                          activation_bits=acts, importance=config.importance[0],
                          distillation={k: c[0] for k, c in config.distillation.items()},
                          weight_scheme=config.weight_scheme[0], vocabulary=vocabulary,
                          embedding_bits=embedding_bits(bits))

        candidates = {"teacher": uniform(bits=32, acts=32),
                      "uniform-int8": uniform(bits=8, acts=int8_acts)}
        near = {target: min((s for s in config.sparsity if s > 0),
                            key=lambda s: abs(s - target), default=0.0) for target in (0.5, 0.75)}
        for sparsity in near.values():
            candidates[f"structured-{sparsity:.0%}-int8"] = uniform(
                bits=8, acts=int8_acts, sparsity=sparsity, pruning="structured")
        candidates["4-bit-weights"] = uniform(bits=4, acts=int8_acts)
        candidates["weight-only-4-bit"] = uniform(bits=4, acts=32)
        candidates[f"structured-{near[0.5]:.0%}-4-bit"] = uniform(
            bits=4, acts=int8_acts, sparsity=near[0.5], pruning="structured")
        if (half := self.half_width_student()) is not None:
            candidates["half-width-student"] = uniform(bits=32, acts=32, student=half)
            candidates["half-width-student-int8"] = uniform(bits=8, acts=int8_acts, student=half)
            candidates[f"half-width-structured-{near[0.5]:.0%}-int8"] = uniform(
                bits=8, acts=int8_acts, student=half, sparsity=near[0.5], pruning="structured")
        chosen: dict[str, Recipe] = {}
        for label, recipe in candidates.items():
            if self.contains(recipe) and recipe not in chosen.values():
                chosen[label] = recipe
        return chosen

    def half_width_student(self) -> dict[str, Any] | None:
        """The teacher's knobs with each width knob (a numeric knob named ``*width*``; every
        numeric knob when none is) at its choice nearest half the teacher's value; None when
        that is the teacher itself. A knob that narrows nothing but the layer feeding the head
        keeps the teacher's value where another knob narrows the rest: MobileNetV2 (Sandler et
        al., 2018) narrows every layer but that one, which keeps its width for accuracy, and
        so does the expert's half-width CNN (digits-cnn's conv stages at half, its hidden fc
        layer whole)."""
        teacher = dict(self.task.teacher_kwargs)
        numeric = {k: v for k, v in self.student_choices.items()
                   if isinstance(teacher.get(k), int | float)
                   and all(isinstance(c, int | float) for c in v)}
        widths = {k: v for k, v in numeric.items() if "width" in k} or numeric
        halved = {k: value for k, v in widths.items()
                  if (value := min(v, key=lambda c: abs(c - teacher[k] / 2))) != teacher[k]}
        layers = self.layers_for(teacher)  # in execution order: the head is the last one run
        feeding_head = {layers[-2].name} if len(layers) > 1 else set()
        kept = {k for k, value in halved.items()
                if self._reshaped(teacher, dict(teacher, **{k: value})) == feeding_head}
        if kept != set(halved):
            halved = {k: v for k, v in halved.items() if k not in kept}
        return dict(teacher, **halved) if halved else None

    def _reshaped(self, teacher: dict[str, Any], student: dict[str, Any]) -> set[str]:
        """The layers whose outputs differ between the two (in one of them only, or in number)."""
        def outputs(knobs: dict[str, Any]) -> set[tuple[str, int]]:
            return {(i.name, i.outputs) for i in self.layers_for(knobs)}
        return {name for name, _ in outputs(teacher) ^ outputs(student)}

    def contains(self, recipe: Recipe) -> bool:
        """True when ``suggest`` can return ``recipe`` (every value is one of the choices)."""
        if any(recipe.student.get(k) not in v for k, v in self.student_choices.items()):
            return False
        if recipe.activation_bits not in self.config.activations:
            return False
        if recipe.importance not in self.config.importance:
            return False
        if recipe.weight_scheme not in self.config.weight_scheme:
            return False
        if (recipe.vocabulary not in self.config.vocabulary
                or recipe.embedding_bits not in self.config.embedding_bits):
            return False
        if set(recipe.distillation) != set(self.config.distillation) or any(
                recipe.distillation[k] not in c for k, c in self.config.distillation.items()):
            return False
        fixed_init = self._student_init(recipe.student)
        if recipe.student_init not in ((fixed_init,) if fixed_init else self.config.student_init):
            return False
        infos = {i.name: i for i in self.layers_for(recipe.student)}
        if set(recipe.layers) != set(infos):
            return False
        for name, layer in recipe.layers.items():
            if layer.bits not in self.config.bits:
                return False
            if layer.pruning == "2:4" and layer.sparsity > 0:
                if layer.sparsity != 0.5 or not any(s > 0 for s in self.config.sparsity):
                    return False
            elif layer.sparsity not in self.config.sparsity:
                return False
            if layer.sparsity > 0 and layer.pruning not in self._methods(infos[name]):
                return False
            if layer.sparsity > 0 and name in self.not_prunable:
                return False
        try:  # grouped layers must agree, parameter by parameter
            self.params_of(recipe)
        except ValueError:
            return False
        return True

    def params_of(self, recipe: Recipe) -> dict[str, Any]:
        """The Optuna parameters that make ``suggest`` return ``recipe`` (for enqueueing).
        A ValueError when layers of one group disagree (``contains`` says False then)."""
        seen: dict[str, Any] = {}

        def put(name: str, value: Any) -> None:
            if name in seen and seen[name] != value:
                raise ValueError(f"recipe gives {name} both {seen[name]!r} and {value!r}: its "
                                 "layers of one group must make the same choices")
            seen[name] = value
        params: dict[str, Any] = {f"student.{k}": recipe.student[k] for k in self.student_choices}
        if self._student_init(recipe.student) is None:
            params["student.init"] = recipe.student_init
        if len(self.config.activations) > 1:
            params["activation_bits"] = recipe.activation_bits
        if len(self.config.importance) > 1:
            params["importance"] = recipe.importance
        if len(self.config.weight_scheme) > 1:
            params["weight_scheme"] = recipe.weight_scheme
        if len(self.config.vocabulary) > 1:
            params["vocabulary"] = recipe.vocabulary
        if len(self.config.embedding_bits) > 1:
            params["embedding_bits"] = recipe.embedding_bits
        params.update({f"distillation.{key}": recipe.distillation[key]
                       for key, choices in self.config.distillation.items() if len(choices) > 1})
        infos = {i.name: i for i in self.layers_for(recipe.student)}
        for name, layer in recipe.layers.items():
            key = self._key(name)
            sparsity = layer.sparsity
            if layer.pruning == "2:4" and layer.sparsity > 0:  # any positive choice leads there
                sparsity = min(s for s in self.config.sparsity if s > 0)
            if name not in self.not_prunable:
                put(f"{key}.sparsity", sparsity)
            parameter = self._pruning_choice(infos[name])[0]
            if layer.sparsity > 0 and parameter is not None:
                put(parameter, layer.pruning)
            put(f"{key}.bits", layer.bits)
        return params | seen

    def min_weight_bytes(self) -> int:
        """A lower bound on the file of any model this space can produce: the weights of its
        smallest student, every layer at the highest sparsity and the fewest bits, with no
        bias, scale, index or header counted. Used to refuse a size constraint no trial can
        meet; it is never reported as a size. 0 when there are too many student shapes to
        build them all (the bound would not be one)."""
        if math.prod(len(c) for c in self.student_choices.values()) > MAX_STUDENTS_SIZED:
            return 0
        students = [dict(self.task.teacher_kwargs, **dict(zip(self.student_choices, c,
                                                                strict=True)))
                    for c in itertools.product(*self.student_choices.values())]
        weights = min(sum(i.weights for i in self.layers_for(s)) for s in students)
        kept = 1.0 - max(max(self.config.sparsity), 0.5 if "2:4" in self.config.pruning else 0.0)
        return int(weights * kept * min(self.config.bits) / 8)

    def fingerprint(self) -> str:
        """A short hash of the choices; a run refuses to continue with a different space."""
        data = {"task": self.task.name, "student": self.student_choices,
                "config": {k: getattr(self.config, k)
                           for k in ("bits", "sparsity", "pruning", "importance", "student_init",
                                     "activations", "channel_multiple", "distillation",
                                     "weight_scheme")}}
        # only where set: older run folders keep their fingerprint
        if self.config.layer_groups:
            data["config"]["layer_groups"] = self.config.layer_groups
        if self.config.vocabulary != ("all",):
            data["config"]["vocabulary"] = self.config.vocabulary
        if self.config.embedding_bits != (32,):
            data["config"]["embedding_bits"] = self.config.embedding_bits
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
