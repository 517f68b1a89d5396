"""Checkpoints: exact round trips, atomic writes, and a CheckpointError naming the file for every bad one."""
import dataclasses
import os

import numpy as np
import pytest

import common.checkpoint
from common.checkpoint import (CheckpointError, load_checkpoint, load_model, load_training_state, save_checkpoint,
                               save_training_state, single_core_state)
from common.config import GPTConfig, TrainConfig
from common.model import gpt_layout
from common.optim import AdamW, decays

CFG = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=5, vocab_size=11)


def random_state(cfg, dtype, seed=0):
    """(layout, params, opt) with every number random, so a field left out of a round trip shows."""
    rng = np.random.default_rng(seed)
    layout = gpt_layout(cfg)
    params = rng.normal(size=layout.size).astype(dtype)
    opt = AdamW(layout.mask(decays), 0.9, 0.99, 0.1, dtype=dtype)
    opt.m[:] = rng.normal(size=layout.size)
    opt.v[:] = rng.random(layout.size)
    opt.t = int(rng.integers(1, 1000))
    return layout, params, opt


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_state_round_trips_params_adam_moments_t_and_step_exactly(tmp_path, dtype):
    path = tmp_path / "ckpt.npz"
    layout, params, opt = random_state(CFG, dtype)
    save_training_state(path, single_core_state(layout, params, opt), opt.t, 42, CFG, TrainConfig(seed=7))

    _, params2, opt2 = random_state(CFG, dtype, seed=1)
    assert load_training_state(path, layout, params2, opt2, 10**9) == 42
    np.testing.assert_array_equal(params2, params)
    np.testing.assert_array_equal(opt2.m, opt.m)
    np.testing.assert_array_equal(opt2.v, opt.v)
    assert opt2.t == opt.t

    cfg, flat, meta = load_model(path, dtype)
    assert cfg == CFG and meta["step"] == 42 and meta["train"]["seed"] == 7
    np.testing.assert_array_equal(flat, params)


@pytest.mark.parametrize("interrupt", [OSError("disk full"), KeyboardInterrupt()])
def test_a_write_failing_midway_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch,
                                                                                     interrupt):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"x": np.arange(5.0)}, {"step": 1})
    before = path.read_bytes()

    def failing_savez(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise interrupt

    monkeypatch.setattr(common.checkpoint.np, "savez", failing_savez)
    with pytest.raises(type(interrupt)):
        save_checkpoint(path, {"x": np.zeros(5)}, {"step": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]
    monkeypatch.undo()
    tensors, meta = load_checkpoint(path)
    assert meta["step"] == 1 and np.array_equal(tensors["x"], np.arange(5.0))


def garbage(path):
    path.write_bytes(bytes(range(256)) * 4)


def truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path):
    path.write_bytes(b"")


def flipped_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF                                     # inside a tensor: caught by the zip CRC
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [garbage, truncated, empty, flipped_byte])
def test_a_damaged_file_raises_checkpoint_error_naming_the_path(tmp_path, damage):
    path = tmp_path / "ckpt.npz"
    layout, params, opt = random_state(CFG, np.float32)
    save_training_state(path, single_core_state(layout, params, opt), opt.t, 3, CFG, TrainConfig())
    damage(path)
    with pytest.raises(CheckpointError, match="corrupt") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_a_missing_file_raises_checkpoint_error_naming_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as error:
        load_checkpoint(tmp_path / "nope.npz")
    assert str(tmp_path / "nope.npz") in str(error.value)


def test_an_unknown_format_version_is_refused(tmp_path):
    save_checkpoint(tmp_path / "ckpt.npz", {}, {"format": common.checkpoint.FORMAT + 1})
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(tmp_path / "ckpt.npz")


@pytest.mark.parametrize("change, named", [
    (dict(n_embd=16), "wte has shape"),
    (dict(n_layer=2), "no tensor h.1.ln_1.w"),
    (dict(vocab_size=12), "wte has shape"),
])
def test_a_checkpoint_of_another_model_raises_checkpoint_error_naming_the_tensor(tmp_path, change, named):
    path = tmp_path / "ckpt.npz"
    layout, params, opt = random_state(CFG, np.float32)
    save_training_state(path, single_core_state(layout, params, opt), opt.t, 3, CFG, TrainConfig())
    other = dataclasses.replace(CFG, **change)
    layout2, params2, opt2 = random_state(other, np.float32)
    with pytest.raises(CheckpointError, match=named) as error:
        load_training_state(path, layout2, params2, opt2, 10**9)
    assert str(path) in str(error.value)


def test_a_checkpoint_of_a_bigger_model_names_the_unexpected_tensors(tmp_path):
    path = tmp_path / "ckpt.npz"
    bigger = dataclasses.replace(CFG, n_layer=2)
    layout, params, opt = random_state(bigger, np.float32)
    save_training_state(path, single_core_state(layout, params, opt), opt.t, 3, bigger, TrainConfig())
    layout2, params2, opt2 = random_state(CFG, np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['h\.1\."):
        load_training_state(path, layout2, params2, opt2, 10**9)


def test_a_checkpoint_gets_the_permissions_of_any_file_the_user_writes(tmp_path):
    umask = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ckpt.npz", {"x": np.zeros(3)}, {})
    finally:
        os.umask(umask)
    assert (tmp_path / "ckpt.npz").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]            # no temporary file left behind
