"""Data as users have it, and models' inputs and outputs as they come.

A task's ``train``, ``val`` and ``test`` are each one of:

- a ``Split`` (tensors already in memory: ``x`` and labels ``y``), batched and shuffled here;
- a torch ``Dataset`` of ``(inputs, target)`` samples, batched here (in training by the
  experiment's ``train.batch_size``, shuffled by the run's seed; 512 at a time to evaluate);
- a torch ``DataLoader`` (or any re-iterable of batches), iterated as it is: batch size,
  shuffling and workers are the user's;
- a zero-argument callable returning an iterable of batches, called once per pass (data
  that is streamed).

A batch is ``(inputs, targets)``: inputs a tensor, a tuple of tensors (passed to the model
as positional arguments) or a dict of tensors (keyword arguments, e.g. ``input_ids`` and
``attention_mask``; a model whose ``forward`` takes one argument gets the dict itself), all
with the samples along their first dimension, and targets a tensor with one row per sample.
Nothing is copied into memory beyond the batch at hand (and the model outputs an evaluation
collects, one row per sample).

A model's output may be a tensor, a tuple or list (its first element), a dict (``"logits"``,
else its first value) or an object with ``.logits`` (Hugging Face's ``ModelOutput``):
``output_tensor`` is the rule distillation and evaluation share.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from slimsearch.errors import ConfigError


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` (N x ..., e.g. float32 features or int64 token ids) and targets ``y``:
    integer class labels (N,), or floats for a regression (N, or N x outputs), in memory."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y) or len(self.x) == 0:
            raise ConfigError(f"a data split needs as many labels as inputs and at least one "
                              f"sample; got {len(self.x)} inputs and {len(self.y)} labels")
        if self.y.is_floating_point():  # a regression's targets (its metrics check the rest)
            return
        if self.y.dim() != 1 or self.y.is_complex() or self.y.dtype == torch.bool:
            raise ConfigError(f"a data split's labels y must be a 1-D tensor of integer class "
                              f"indices (or floats, for a regression); got dtype "
                              f"{self.y.dtype} and shape {tuple(self.y.shape)}. Map your labels "
                              "to 0..classes-1 as torch.long, e.g. with "
                              "numpy.unique(labels, return_inverse=True)")
        if int(self.y.min()) < 0:
            raise ConfigError(f"a data split's labels y must be class indices from 0; found "
                              f"{int(self.y.min())}. Map your labels to 0..classes-1")

    def __len__(self) -> int:
        return len(self.y)


Inputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
#: What a task's split may be (see the module's doc).
DataSource = Split | Dataset | DataLoader | Iterable | Callable[[], Iterable]


# --- inputs: whatever form, one set of operations ------------------------------------------


def tensors_of(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors of ``inputs``, in order."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return list(inputs.values())
    return list(inputs)


def map_inputs(inputs: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """``inputs`` with ``fn`` applied to each tensor, in the same form."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: fn(v) for k, v in inputs.items()}
    return tuple(fn(v) for v in inputs)


def inputs_to(inputs: Inputs, device: torch.device | str,
              dtype: torch.dtype | None = None) -> Inputs:
    """``inputs`` on ``device``; floating-point tensors also in ``dtype`` (token ids and masks
    keep theirs)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)
    return map_inputs(inputs, move)


def batch_len(inputs: Inputs) -> int:
    """How many samples ``inputs`` holds (its first tensor's first dimension)."""
    return int(tensors_of(inputs)[0].shape[0])


def take(inputs: Inputs, index: slice | torch.Tensor) -> Inputs:
    """The samples ``index`` of ``inputs`` (a slice, or a tensor of indices)."""
    return map_inputs(inputs, lambda t: t[index])


def concat(parts: list[Inputs]) -> Inputs:
    """Batches of one form joined along the samples."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(first)))


def takes_keywords(model: Callable[..., Any], inputs: Mapping[str, Any]) -> bool:
    """Whether ``model`` takes the dict ``inputs`` as keyword arguments (its forward has
    ``**kwargs``, parameters of those names, or more than one parameter) rather than as its
    one argument."""
    target = model.forward if isinstance(model, nn.Module) else model
    return _takes_keywords(getattr(target, "__func__", target), tuple(inputs))


@functools.lru_cache(maxsize=256)
def _takes_keywords(function: Callable[..., Any], keys: tuple[str, ...]) -> bool:
    try:  # by the function, not the instance: read once per model class
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a compiled or scripted callable: as Hugging Face does
        return True
    if parameters and parameters[0].name == "self":
        parameters = parameters[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return True
    named = [p for p in parameters
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return len(named) != 1 or set(keys) <= {p.name for p in named}


def call_model(model: Callable[..., Any], inputs: Inputs) -> Any:
    """``model`` on ``inputs``: a tensor as the argument, a tuple as positional arguments, a
    dict as keyword arguments (or as the one argument of a forward that takes one)."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs) if takes_keywords(model, inputs) else model(inputs)
    return model(*inputs)


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor a model's output stands for (see the module's doc)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):  # ModelOutput is a Mapping too; "logits" first
        if "logits" in output:
            return output_tensor(output["logits"])
        if output:
            return output_tensor(next(iter(output.values())))
    elif isinstance(output, tuple | list):
        if output:
            return output_tensor(output[0])
    elif isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    raise TypeError(f"the model returned {type(output).__name__}; slimsearch takes a tensor, a "
                    "tuple or list (its first element), a dict ('logits' or its first value) or "
                    "an object with .logits")


def describe(inputs: Inputs) -> str:
    """The form of ``inputs`` in words, for messages and records."""
    def one(t: torch.Tensor) -> str:
        return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
    if isinstance(inputs, torch.Tensor):
        return one(inputs)
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {one(v)}" for k, v in inputs.items()) + "}"
    return "(" + ", ".join(one(t) for t in inputs) + ")"


# --- splits -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """One split of a task, as slimsearch reads it (see the module's doc).

    ``batches`` yields ``(inputs, targets, index)``: ``index`` is the samples' positions in
    the split when slimsearch batches it (a ``Split``, a ``Dataset`` with a length: see
    ``indexed``), so that per-sample tensors computed once, such as the teacher's outputs,
    can be looked up; else None."""

    name: str
    source: Any

    @property
    def in_memory(self) -> Split | None:
        """The split's tensors when it is a ``Split``."""
        return self.source if isinstance(self.source, Split) else None

    @property
    def indexed(self) -> bool:
        """Whether ``batches`` gives each batch's sample positions: a ``Split``, or a map-style
        ``Dataset`` with a length (slimsearch draws its order). A DataLoader, an iterable or a
        callable comes in the user's order, which slimsearch does not know."""
        return self.in_memory is not None or _sized_map_style(self.source)

    def batches(self, *, batch_size: int = 512,
                shuffle: torch.Generator | None = None) -> Iterator[tuple[Inputs, torch.Tensor,
                                                                          torch.Tensor | None]]:
        """One pass over the split. ``batch_size`` and ``shuffle`` (a generator: shuffle with
        it) apply where slimsearch batches (a ``Split``, a ``Dataset``); a DataLoader or a
        callable's iterable comes as the user made it."""
        split = self.in_memory
        if split is not None:
            n = len(split)
            if shuffle is None:  # in order: views of the tensors, no copy
                for start in range(0, n, batch_size):
                    end = min(n, start + batch_size)
                    yield split.x[start:end], split.y[start:end], torch.arange(start, end)
                return
            order = torch.randperm(n, generator=shuffle)
            for start in range(0, n, batch_size):
                index = order[start:start + batch_size]
                yield split.x[index], split.y[index], index
            return
        if _sized_map_style(self.source):  # batched here, by positions drawn here
            n = len(self.source)
            order = (torch.randperm(n, generator=shuffle) if shuffle is not None
                     else torch.arange(n))
            positions = [order[start:start + batch_size] for start in range(0, n, batch_size)]
            loader = DataLoader(self.source, batch_sampler=[p.tolist() for p in positions])
            for position, (batch, index) in enumerate(zip(loader, positions, strict=True)):
                inputs, targets = check_batch(batch, self.name, position)
                yield inputs, targets, index
            return
        for position, batch in enumerate(self._iterable(batch_size, shuffle)):
            inputs, targets = check_batch(batch, self.name, position)
            yield inputs, targets, None

    def _in_order(self) -> Data:
        """This split read in a fixed order: a shuffling DataLoader over a map-style Dataset
        as the same batches of the Dataset in its own order, without worker processes (what
        ``head``, ``targets`` and ``fingerprint`` read, so that every process, trial and
        resumed run sees the same first samples and the same digest)."""
        source = self.source
        if (isinstance(source, DataLoader) and not isinstance(source.dataset, IterableDataset)
                and source.batch_size is not None):
            return Data(self.name, DataLoader(source.dataset, batch_size=source.batch_size,
                                              collate_fn=source.collate_fn))
        return self

    def _iterable(self, batch_size: int, shuffle: torch.Generator | None) -> Iterable:
        source = self.source
        if isinstance(source, IterableDataset):  # samples, in the order it gives them
            return DataLoader(source, batch_size=batch_size)
        if isinstance(source, Dataset) and not isinstance(source, Iterable):  # no length
            return DataLoader(source, batch_size=batch_size, shuffle=shuffle is not None,
                              generator=shuffle)
        if callable(source) and not isinstance(source, Iterable):
            return source()
        return source

    def head(self, samples: int) -> tuple[Inputs, torch.Tensor]:
        """The split's first ``samples`` samples (fewer if it has fewer), in a fixed order."""
        parts, targets, have = [], [], 0
        for inputs, y, _ in self._in_order().batches(batch_size=samples):
            if parts and _shapes(inputs) != _shapes(parts[0]):
                raise ConfigError(
                    f"the {self.name} split's batches hold inputs of different shapes "
                    f"({describe(parts[0])}, then {describe(inputs)}), and {samples} samples "
                    "span more than one batch: pad every batch to one length (for a tokenizer, "
                    "padding='max_length' with the experiment's sequence length)")
            parts.append(inputs)
            targets.append(y)
            have += len(y)
            if have >= samples:
                break
        if not parts:
            raise ConfigError(f"the {self.name} split gave no batch; give it at least one sample")
        return take(concat(parts), slice(0, samples)), torch.cat(targets)[:samples]

    def example(self, batch_size: int) -> Inputs:
        """A real batch of exactly ``batch_size`` samples: the split's first samples, repeated
        when it has fewer (for tracing and timing)."""
        inputs, _ = self.head(batch_size)
        have = batch_len(inputs)
        if have < batch_size:
            repeats = -(-batch_size // have)
            inputs = take(concat([inputs] * repeats), slice(0, batch_size))
        return map_inputs(inputs, lambda t: t.clone())

    def targets(self) -> torch.Tensor:
        """Every target of the split, in a fixed order (one pass)."""
        split = self.in_memory
        if split is not None:
            return split.y
        found = [y for _, y, _ in self._in_order().batches()]
        if not found:
            raise ConfigError(f"the {self.name} split gave no batch; give it at least one sample")
        return torch.cat(found)

    def fingerprint(self) -> str:
        """A digest of the split's contents, read in a fixed order (``_in_order``) and summed
        over samples, so that a loader that shuffles anyway (an iterable) gives the same
        digest: what a cache of results on it is keyed by. (Random augmentation in a Dataset
        changes it: such a split is digested anew, and its teacher trained anew, every run.)"""
        split = self.in_memory
        if split is not None:  # in the split's order, as the teacher's logits are stored
            digest = hashlib.sha256()
            for tensor in (split.x, split.y):
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            return digest.hexdigest()[:16]
        total, count = 0, 0
        for inputs, targets, _ in self._in_order().batches():
            for i in range(len(targets)):
                digest = hashlib.sha256()
                for tensor in itertools.chain(tensors_of(take(inputs, slice(i, i + 1))),
                                              [targets[i:i + 1]]):
                    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
                total = (total + int.from_bytes(digest.digest()[:8], "big")) % 2**64
                count += 1
        return f"{total:016x}-{count}"


def _sized_map_style(source: Any) -> bool:
    """A map-style ``Dataset`` (indexed by position) that knows its length."""
    if not isinstance(source, Dataset) or isinstance(source, IterableDataset | Iterable):
        return False
    try:
        len(source)
    except TypeError:
        return False
    return True


def _shapes(inputs: Inputs) -> list[tuple[int, ...]]:
    """The shape of each tensor of ``inputs`` past the samples' dimension."""
    return [tuple(t.shape[1:]) for t in tensors_of(inputs)]


def check_batch(batch: Any, split: str, position: int) -> tuple[Inputs, torch.Tensor]:
    """``(inputs, targets)`` of one batch, or ``ConfigError`` saying what is wrong with it."""
    where = f"the {split} split's batch {position}"
    fix = ("make the DataLoader (or Dataset) give (inputs, targets), inputs a tensor, a tuple "
           "of tensors or a dict of tensors, e.g. a collate_fn returning "
           "({'input_ids': ..., 'attention_mask': ...}, labels)")
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        kind = (f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, tuple | list)
                else f"a {type(batch).__name__}")
        raise ConfigError(f"{where} is {kind}, not (inputs, targets): {fix}")
    inputs, targets = batch
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if isinstance(inputs, Mapping):
        inputs = dict(inputs)
    parts = tensors_of(inputs) if isinstance(inputs, torch.Tensor | tuple | dict) else None
    if not parts or not all(isinstance(t, torch.Tensor) for t in parts):
        raise ConfigError(f"{where} has inputs of type {type(inputs).__name__}"
                          f"{'' if parts is None else ' holding non-tensors'}: {fix}")
    if isinstance(inputs, dict) and not all(isinstance(k, str) for k in inputs):
        raise ConfigError(f"{where} has a dict of inputs with keys that are not names: {fix}")
    if not isinstance(targets, torch.Tensor):
        raise ConfigError(f"{where} has targets of type {type(targets).__name__}, not a tensor: "
                          "give the targets as a tensor (torch.as_tensor(labels))")
    sizes = {int(t.shape[0]) if t.dim() else -1 for t in parts}
    if len(sizes) != 1 or -1 in sizes or targets.dim() == 0 or len(targets) not in sizes:
        raise ConfigError(f"{where}: inputs {describe(inputs)} and targets "
                          f"{describe(targets)} do not hold the same number of samples along "
                          "their first dimension: batch the samples along dimension 0")
    return inputs, targets


def as_data(source: Any, name: str) -> Data:
    """``source`` as a ``Data``, or ``ConfigError`` naming the split when it is none of the
    forms slimsearch reads."""
    if isinstance(source, Data):
        return source
    readable = (isinstance(source, Split | Dataset | DataLoader | Iterable) or callable(source))
    if not readable or isinstance(source, torch.Tensor | str | bytes | Mapping):
        raise ConfigError(f"the task's {name} split is a {type(source).__name__}; give a "
                          "slimsearch.Split(x, y), a torch Dataset or DataLoader of (inputs, "
                          "targets), or a function returning an iterable of such batches")
    if isinstance(source, Iterator) and not isinstance(source, Dataset):
        raise ConfigError(f"the task's {name} split is a {type(source).__name__}, which can be "
                          "iterated only once; slimsearch reads a split once per epoch and "
                          "evaluation: give a function that returns a fresh one "
                          f"({name}=lambda: my_batches()) or a DataLoader")
    return Data(name, source)
