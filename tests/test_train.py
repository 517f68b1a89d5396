"""01_single_core/train.py and sample.py end to end, as subprocesses on a tiny corpus and a tiny model."""
import json
import shutil

import numpy as np
import pytest

from common.metrics import read_metrics
from conftest import run

TRAIN, SAMPLE = "01_single_core/train.py", "01_single_core/sample.py"
TINY = ["--n-layer", 2, "--n-head", 2, "--n-embd", 16, "--block-size", 8, "--batch-size", 4,
        "--eval-iters", 2, "--eval-interval", 5, "--log-interval", 1]
TEN_STEPS = ("--max-iters", 10, "--dtype", "float32")
SIXTY_STEPS = ("--max-iters", 60, "--learning-rate", 1e-2, "--warmup-iters", 5, "--eval-interval", 20)


def train(data, out, *extra):
    result = run([TRAIN, "--data-dir", data, "--out-dir", out, *TINY, *extra])
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """trained(*flags) -> out-dir of a run with those flags, trained once per module and shared."""
    done = {}

    def get(*extra):
        if extra not in done:
            done[extra] = tmp_path_factory.mktemp("run")
            train(tiny_data, done[extra], *extra)
        return done[extra]
    return get


def train_losses(out):
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def val_losses(out):
    return [(r["step"], r["val_loss"]) for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]


def load_npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_same_seed_gives_bit_identical_losses_and_another_seed_does_not(tiny_data, trained, tmp_path):
    first = trained(*TEN_STEPS)
    train(tiny_data, tmp_path, *TEN_STEPS)
    other_seed = trained(*TEN_STEPS, "--seed", 2)
    assert len(train_losses(first)) == 10
    assert train_losses(tmp_path) == train_losses(first)
    assert val_losses(tmp_path) == val_losses(first)
    assert [loss for _, loss, _ in train_losses(other_seed)] != [loss for _, loss, _ in train_losses(first)]


@pytest.mark.parametrize("dtype, precision", [("float32", "fp32"), ("float64", "fp32"), ("float32", "bf16")])
def test_resumed_run_matches_an_uninterrupted_one_exactly(tiny_data, trained, tmp_path, dtype, precision):
    """(bf16: the checkpoint holds the float32 master weights, from which the 16-bit ones are rounded again.)"""
    flags = ("--dtype", dtype, "--precision", precision)
    straight = trained("--max-iters", 10, *flags)
    train(tiny_data, tmp_path, "--max-iters", 5, *flags)
    resumed = train(tiny_data, tmp_path, "--max-iters", 10, *flags, "--resume")
    assert "at step 5" in resumed.stdout

    assert train_losses(tmp_path) == train_losses(straight)          # exact floats, one line per step
    assert val_losses(tmp_path) == val_losses(straight)
    want, got = load_npz(straight / "ckpt.npz"), load_npz(tmp_path / "ckpt.npz")
    tensors = [k for k in want if k.startswith(("params/", "adam_m/", "adam_v/"))]
    assert set(got) == set(want) and len(tensors) == 3 * (2 + 2 * 12 + 2)
    for key in tensors:
        assert got[key].dtype == np.dtype(dtype), key
        assert np.array_equal(got[key], want[key]), key
    assert json.loads(got["meta"].tobytes())["adam_t"] == 10


def test_loss_falls_by_half_a_nat_within_sixty_steps(trained):
    val = [loss for _, loss in val_losses(trained(*SIXTY_STEPS))]
    assert len(val) == 4                                            # steps 0, 20, 40, 60
    assert val[-1] < val[0] - 0.5


def test_sample_continues_the_start_text_with_the_requested_number_of_vocabulary_characters(tiny_data, trained):
    result = run([SAMPLE, "--out-dir", trained(*SIXTY_STEPS), "--max-new-tokens", 50, "--start", "ANNA"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    text = result.stdout[:-1]
    chars = json.loads((tiny_data / "meta.json").read_text())["chars"]
    assert text.startswith("ANNA") and len(text) == 4 + 50
    assert set(text) <= set(chars)


def test_metrics_have_one_line_per_step_and_a_val_line_per_evaluation(trained):
    records = read_metrics(trained(*TEN_STEPS) / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(10))
    for r in steps:
        assert set(r) == {"step", "loss", "lr", "ms", "tokens_per_s"}
        assert np.isfinite([r["loss"], r["lr"], r["ms"], r["tokens_per_s"]]).all() and r["tokens_per_s"] > 0
    evals = [r for r in records if "loss" not in r]
    assert [r["step"] for r in evals] == [0, 5, 10]
    assert all(set(r) == {"step", "val_loss"} for r in evals)


EXPERTS = ("--n-experts", 4, "--top-k", 2, "--capacity-factor", 1.0)


@pytest.mark.parametrize("dtype, precision", [("float64", "fp32"), ("float32", "bf16")])
def test_a_mixture_of_experts_trains_logs_its_routing_resumes_exactly_and_samples(tiny_data, trained, tmp_path,
                                                                                   dtype, precision):
    flags = (*EXPERTS, "--dtype", dtype, "--precision", precision)
    straight = trained("--max-iters", 10, *flags)
    train(tiny_data, tmp_path, "--max-iters", 5, *flags)
    train(tiny_data, tmp_path, "--max-iters", 10, *flags, "--resume")
    assert train_losses(tmp_path) == train_losses(straight)
    want, got = load_npz(straight / "ckpt.npz"), load_npz(tmp_path / "ckpt.npz")
    assert "params/h.1.mlp.experts.c_fc.w" in want and set(got) == set(want)
    assert all(np.array_equal(got[key], want[key]) for key in want if key != "meta")
    steps = [r for r in read_metrics(straight / "metrics.jsonl") if "loss" in r]
    chosen = 2 * 4 * 8 * 2                      # blocks x rows x tokens x choices
    for r in steps:
        load = np.array(r["expert_load"])       # assignments each expert computed, per block
        assert load.shape == (2, 4) and load.sum() == round((1 - r["dropped"]) * chosen)
        assert 0 <= r["dropped"] < 1 and 0 < r["aux_loss"] < 4
    assert any(r["dropped"] > 0 for r in steps)
    result = run([SAMPLE, "--out-dir", straight, "--max-new-tokens", 20, "--start", "ANNA"])
    assert result.returncode == 0 and len(result.stdout) == 4 + 20 + 1, result.stderr


def write(path, text):
    path.write_text(text)
    return path


def other_model_checkpoint(tmp_path, trained):
    """An out-dir holding the checkpoint of the n_embd 16 model, to be resumed as an n_embd 32 one."""
    shutil.copy(trained(*TEN_STEPS) / "ckpt.npz", tmp_path / "ckpt.npz")
    return [TRAIN, "--resume", "--n-embd", 32]


def corrupt_checkpoint(tmp_path, trained):
    (tmp_path / "ckpt.npz").write_bytes(b"\x00garbage" * 100)
    return [SAMPLE]


# case -> (make(tmp_path, trained) -> [script, *flags], words the one error line must contain)
BAD_INPUTS = {
    "n_embd_not_divisible_by_n_head": (lambda d, t: [TRAIN, "--n-embd", 10, "--n-head", 4], ["--n-embd", "--n-head"]),
    "unsupported_dtype": (lambda d, t: [TRAIN, "--dtype", "float16"], ["--dtype", "float16"]),
    "zero_batch_size": (lambda d, t: [TRAIN, "--batch-size", 0], ["--batch-size"]),
    "unknown_flag": (lambda d, t: [TRAIN, "--n-layers", 2], ["--n-layers"]),
    "missing_config_file": (lambda d, t: [TRAIN, "--config", d / "nope.json"], ["--config", "nope.json"]),
    "config_with_unknown_key": (lambda d, t: [TRAIN, "--config", write(d / "c.json", '{"n_layyer": 2}')],
                                ["c.json", "n_layyer"]),
    "config_with_wrong_type": (lambda d, t: [TRAIN, "--config", write(d / "c.json", '{"learning_rate": "high"}')],
                               ["learning_rate"]),
    "missing_data_dir": (lambda d, t: [TRAIN, "--data-dir", d / "nonexistent"], ["nonexistent", "prepare.py"]),
    "resume_without_checkpoint": (lambda d, t: [TRAIN, "--resume"], ["--resume", "ckpt.npz"]),
    "resume_checkpoint_of_another_model": (other_model_checkpoint, ["ckpt.npz", "different model", "wte"]),
    "vocab_size_below_the_data": (lambda d, t: [TRAIN, "--vocab-size", 5], ["--vocab-size"]),
    "sample_corrupt_checkpoint": (corrupt_checkpoint, ["ckpt.npz", "corrupt"]),
    "sample_missing_checkpoint": (lambda d, t: [SAMPLE], ["ckpt.npz", "does not exist"]),
    "sample_start_outside_vocabulary": (lambda d, t: [SAMPLE, "--out-dir", t(*TEN_STEPS), "--start", "ANNA~"],
                                        ["--start", "~"]),
    "sample_empty_start": (lambda d, t: [SAMPLE, "--out-dir", t(*TEN_STEPS), "--start", ""], ["--start"]),
    "block_size_longer_than_val_split": (lambda d, t: [TRAIN, "--block-size", 5000], ["--block-size", "val"]),
    "vocab_size_above_the_data": (lambda d, t: [TRAIN, "--vocab-size", 500], ["--vocab-size"]),
    "top_k_above_the_experts": (lambda d, t: [TRAIN, "--n-experts", 4, "--top-k", 5], ["--top-k", "--n-experts"]),
    "resume_beyond_max_iters": (lambda d, t: [TRAIN, "--out-dir", t(*TEN_STEPS), "--resume", "--max-iters", 5],
                                ["--max-iters", "step 10"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_error_line_naming_the_flag_or_file(tiny_data, trained, tmp_path, case):
    make, mentions = BAD_INPUTS[case]
    script, *args = make(tmp_path, trained)
    # flags from the case come last, so they win over the common ones (argparse keeps the last)
    common_args = ["--data-dir", tiny_data, *TINY, "--max-iters", 1] if script == TRAIN else []
    result = run([script, "--out-dir", tmp_path, *common_args, *args])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in mentions:
        assert word in lines[0]
