"""Experiment files: every shipped one loads, and bad input is named precisely."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from slimsearch.errors import ConfigError
from slimsearch.experiment import ALLOWED_BITS, ExperimentConfig, load_experiment, parse_duration
from slimsearch.spaces import SearchSpace
from slimsearch.tasks import make_task

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "experiments").glob("*.toml"))

MINIMAL = 'name = "t"\ntask = "digits-mlp"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(text)
    return path


def test_there_are_shipped_experiments() -> None:
    assert SHIPPED, "experiments/*.toml should hold at least one example"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_experiment_loads_and_its_space_builds(path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))  # a plug-in task adds its folder; undo that
    config = load_experiment(path)
    assert isinstance(config, ExperimentConfig)
    assert config.base_dir == path.resolve().parent
    task = make_task(config.task, seed=config.seed, base_dir=config.base_dir)
    space = SearchSpace(task, config.space)  # checks student knobs against the task's factory
    assert space.baselines()


def test_defaults_and_name_from_the_file(tmp_path: Path) -> None:
    config = load_experiment(write(tmp_path, 'task = "digits-mlp"\n'))
    assert config.name == "experiment" and config.search.trials == 20
    assert config.to_dict()["space"]["bits"] == (2, 4, 8, 32)


def test_lists_become_tuples_and_ints_become_floats(tmp_path: Path) -> None:
    config = load_experiment(write(tmp_path, MINIMAL + "[space]\nsparsity = [0, 0.5]\nbits = [5, 32]\n"
                                             "[train]\nlr = 1\n"))
    assert config.space.sparsity == (0.0, 0.5) and isinstance(config.space.sparsity[0], float)
    assert config.space.bits == (5, 32)
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "[space]\nbitz = [4, 8]\n")
    with pytest.raises(ConfigError, match="bitz") as info:
        load_experiment(path)
    message = str(info.value)
    assert "Did you mean 'bits'" in message
    assert str(path) in message


def test_a_retired_key_is_ignored_with_a_warning_that_says_why(tmp_path: Path) -> None:
    # experiment files (and run folders) from before the ratio to the teacher set it
    with pytest.warns(UserWarning, match="target.quiet_wait_s is ignored: CPU latency is timed"):
        config = load_experiment(write(tmp_path, MINIMAL + "[target]\nquiet_wait_s = 1.0\n"))
    assert not hasattr(config.target, "quiet_wait_s")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="seeds.*Did you mean 'seed'"):
        load_experiment(write(tmp_path, MINIMAL + "seeds = 3\n"))


@pytest.mark.parametrize("line", ['trials = "ten"', "trials = 2.5", "trials = true"])
def test_wrong_type_names_the_field(tmp_path: Path, line: str) -> None:
    with pytest.raises(ConfigError, match=r"search\.trials") as info:
        load_experiment(write(tmp_path, MINIMAL + f"[search]\n{line}\n"))
    assert "int" in str(info.value)


def test_out_of_range_value_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"search\.trials = 0"):
        load_experiment(write(tmp_path, MINIMAL + "[search]\ntrials = 0\n"))
    with pytest.raises(ConfigError, match=r"space\.sparsity"):
        load_experiment(write(tmp_path, MINIMAL + "[space]\nsparsity = [0.0, 0.99]\n"))
    with pytest.raises(ConfigError, match=r"target\.device"):
        load_experiment(write(tmp_path, MINIMAL + '[target]\ndevice = "tpu"\n'))


def test_layer_groups_need_the_sensitivity_pre_pass(tmp_path: Path) -> None:
    grouped = load_experiment(write(tmp_path, MINIMAL + "[space]\nlayer_groups = 2\n"))
    assert grouped.space.layer_groups == 2 and grouped.search.sensitivity
    with pytest.raises(ConfigError, match=r"space\.layer_groups = 2 .*search\.sensitivity = false"):
        load_experiment(write(tmp_path, MINIMAL + "[search]\nsensitivity = false\n\n"
                                                  "[space]\nlayer_groups = 2\n"))
    with pytest.raises(ConfigError, match=r"space\.layer_groups"):
        load_experiment(write(tmp_path, MINIMAL + "[space]\nlayer_groups = -1\n"))


def test_bit_width_5_is_allowed_but_16_is_not(tmp_path: Path) -> None:
    assert 5 in ALLOWED_BITS and 16 not in ALLOWED_BITS
    assert load_experiment(write(tmp_path, MINIMAL + "[space]\nbits = [5]\n")).space.bits == (5,)
    with pytest.raises(ConfigError, match=r"space\.bits") as info:
        load_experiment(write(tmp_path, MINIMAL + "[space]\nbits = [4, 16]\n"))
    assert "16" in str(info.value)


def test_missing_task_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="task"):
        load_experiment(write(tmp_path, 'name = "t"\n'))
    with pytest.raises(ConfigError, match="TOML"):
        load_experiment(write(tmp_path, "name = \n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "nope.toml")


@pytest.mark.parametrize(("text", "seconds"),
                         [("8h", 28800), ("1h30m", 5400), ("90s", 90), ("30m", 1800), ("2d", 172800),
                          ("45", 45), ("1.5h", 5400)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "", "10x", "1h 30m", "h", "0s", "-5m", "5m3"])
def test_parse_duration_rejects_non_durations(text: str) -> None:
    with pytest.raises(ConfigError, match="search.timeout"):
        parse_duration(text, field_name="search.timeout")


def test_bad_timeout_in_a_file_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"search\.timeout"):
        load_experiment(write(tmp_path, MINIMAL + '[search]\ntimeout = "abc"\n'))


def test_unknown_task_lists_the_built_in_tasks() -> None:
    with pytest.raises(ConfigError) as info:
        make_task("digits-mpl", seed=0)
    message = str(info.value)
    assert "digits-cnn" in message and "digits-mlp" in message
    assert "Did you mean 'digits-mlp'" in message


def test_unknown_plugin_module_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ConfigError, match="no_such_module"):
        make_task("no_such_module:make_task", seed=0, base_dir=tmp_path)


def test_plugin_without_the_function_or_returning_the_wrong_type(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "plugin_for_slimsearch_tests.py").write_text(
        "def make_task(seed):\n    return 'not a task'\n")
    try:
        with pytest.raises(ConfigError, match="make_tsk.*Did you mean 'make_task'"):
            make_task("plugin_for_slimsearch_tests:make_tsk", seed=0, base_dir=tmp_path)
        with pytest.raises(ConfigError, match="not slimsearch.Task"):
            make_task("plugin_for_slimsearch_tests:make_task", seed=0, base_dir=tmp_path)
    finally:
        sys.modules.pop("plugin_for_slimsearch_tests", None)


def test_the_readme_examples_are_valid_experiments(tmp_path: Path) -> None:
    """The README's experiment file and its [constraints] example parse as they are written."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    full = next(b for b in blocks if b.startswith("name ="))
    constraints = next(b for b in blocks if b.startswith("[constraints]"))
    config = load_experiment(write(tmp_path, full + "\n" + constraints))
    assert config.constraints.max_size_bytes == 50_000
    assert config.target.batch_sizes == (1, 256) and config.search.sampler == "auto"
