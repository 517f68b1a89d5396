"""Configuration: default < JSON file < flag, boolean flags, and a ConfigError naming the flag for each mistake."""
import ast
import dataclasses
import json

import pytest

from common.chapters import ROOT, chapters, import_chapter, offering
from common.config import (EXPERTS, ConfigError, GPTConfig, ParallelConfig, Parser, TrainConfig, add_config_args,
                           config_from_args)


def parse(argv):
    parser = Parser()
    add_config_args(parser, GPTConfig, TrainConfig)
    return config_from_args(parser.parse_args([str(a) for a in argv]), GPTConfig, TrainConfig)


def write_json(tmp_path, values):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    return path


def test_a_flag_overrides_the_json_file_which_overrides_the_default(tmp_path):
    path = write_json(tmp_path, {"n_layer": 3, "n_embd": 32, "dtype": "float64", "learning_rate": 3e-3})
    gpt, train = parse(["--config", path, "--n-layer", 5, "--dtype", "float32"])
    assert (gpt.n_layer, train.dtype) == (5, "float32")                  # flag beats JSON
    assert (gpt.n_embd, train.learning_rate) == (32, 3e-3)               # JSON beats default
    assert (gpt.n_head, train.batch_size) == (GPTConfig().n_head, TrainConfig().batch_size)


def test_an_integer_in_json_is_accepted_for_a_float_field(tmp_path):
    _, train = parse(["--config", write_json(tmp_path, {"learning_rate": 1, "min_lr": 0})])
    assert train.learning_rate == 1.0 and isinstance(train.learning_rate, float)


@pytest.mark.parametrize("json_value, argv, want", [
    (None, [], False),
    (None, ["--resume"], True),
    (None, ["--no-resume"], False),
    (True, [], True),
    (True, ["--no-resume"], False),
    (False, ["--resume"], True),
])
def test_resume_is_a_boolean_flag_with_a_negation(tmp_path, json_value, argv, want):
    config = ["--config", write_json(tmp_path, {"resume": json_value})] if json_value is not None else []
    _, train = parse(config + argv)
    assert train.resume is want


def test_every_field_of_both_configs_has_a_dashed_flag():
    parser = Parser()
    add_config_args(parser, GPTConfig, TrainConfig)
    flags = {s for action in parser._actions for s in action.option_strings}
    for cls in (GPTConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in flags


@pytest.mark.parametrize("argv, named", [
    (["--n-layer", 0], "--n-layer"),
    (["--n-head", 0], "--n-head"),
    (["--n-embd", -8], "--n-embd"),
    (["--block-size", 0], "--block-size"),
    (["--vocab-size", -1], "--vocab-size"),
    (["--n-embd", 10, "--n-head", 4], "--n-head"),
    (["--batch-size", 0], "--batch-size"),
    (["--eval-interval", 0], "--eval-interval"),
    (["--eval-iters", 0], "--eval-iters"),
    (["--log-interval", 0], "--log-interval"),
    (["--max-iters", -1], "--max-iters"),
    (["--warmup-iters", -1], "--warmup-iters"),
    (["--lr-decay-iters", -1], "--lr-decay-iters"),
    (["--dtype", "float16"], "--dtype"),
    (["--min-lr", 0.1, "--learning-rate", 0.01], "--min-lr"),
    (["--beta1", 1.0], "--beta1"),
    (["--beta2", -0.1], "--beta2"),
    (["--weight-decay", -0.1], "--weight-decay"),
    (["--grad-clip", -1], "--grad-clip"),
    (["--warmup-iters", 10, "--lr-decay-iters", 5], "--warmup-iters"),
    (["--n-layer", "two"], "--n-layer"),
    (["--n-layers", 2], "--n-layers"),
])
def test_each_invalid_value_raises_config_error_naming_the_flag(argv, named):
    with pytest.raises(ConfigError) as error:
        parse(argv)
    assert named in str(error.value)


@pytest.mark.parametrize("text, named, names_path", [
    (None, "does not exist", True),
    ("{not json", "not valid JSON", True),
    ('{"n_layyer": 2}', "n_layyer", True),
    ('{"n_embd": "16"}', "n_embd", False),
    ('{"n_layer": 2.0}', "n_layer", False),
    ('{"resume": 1}', "resume", False),
])
def test_each_bad_json_file_raises_config_error_naming_the_problem(tmp_path, text, named, names_path):
    path = tmp_path / "config.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=named) as error:
        parse(["--config", path])
    if names_path:
        assert str(path) in str(error.value)


@pytest.mark.parametrize("text", ["3", "[]", "null"])
def test_a_json_file_that_is_not_an_object_raises_config_error(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="--config"):
        parse(["--config", path])


def test_common_names_no_chapter_and_each_chapter_declares_the_parallel_flags_it_implements():
    """A chapter is found by its folder; its train.py's FLAGS say what it offers. No code in common names one
    (docstrings may, as examples)."""
    folders = chapters()
    assert folders[0] == "01_single_core" and len(folders) >= 6
    for path in sorted((ROOT / "common").glob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        named = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
                 and id(node) not in docstrings and any(folder in node.value for folder in folders)]
        assert not named, (path.name, named)
    parallel = {f.name for f in dataclasses.fields(ParallelConfig)}
    for folder in folders:
        flags = import_chapter(f"{folder}.train").FLAGS
        assert set(flags) <= parallel | set(EXPERTS) and len(set(flags)) == len(flags), (folder, flags)
    assert offering("n_experts")[0] == "01_single_core"
    assert offering("schedule") == ["05_pipeline", "06_3d"] and offering("tp") == ["02_tensor_parallel", "06_3d"]
    assert all(offering(name) for name in parallel), [name for name in parallel if not offering(name)]


def test_a_chapter_defines_the_choices_of_its_own_settings(tmp_path):
    pipeline = import_chapter("05_pipeline.train")
    offer = dict(chapter="05_pipeline", flags=pipeline.FLAGS, choices={"schedule": pipeline.sched.SCHEDULES})
    parser = Parser()
    add_config_args(parser, GPTConfig, TrainConfig, ParallelConfig, **offer)
    with pytest.raises(ConfigError, match="invalid choice: 'zb-h2'"):
        parser.parse_args(["--schedule", "zb-h2"])
    path = write_json(tmp_path, {"schedule": "zb-h2"})
    with pytest.raises(ConfigError, match="schedule .--schedule. must be one of afab, 1f1b, interleaved, zb-h1"):
        config_from_args(parser.parse_args(["--config", str(path)]), GPTConfig, TrainConfig, ParallelConfig, **offer)
