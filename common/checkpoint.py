"""Layout-independent checkpoints: full named tensors, AdamW state, step, config and sampler state in one .npz.

Whatever layout wrote it (one core, TP, ZeRO, pipeline stages), a checkpoint holds every parameter whole,
under its single-core name: `params/<name>`, `adam_m/<name>`, `adam_v/<name>`, and `meta` (JSON bytes).
Writes are atomic (a temp file in the same folder, then rename), so a crash never destroys the last one.
"""
import dataclasses
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from common.config import ConfigError, GPTConfig
from common.model import gpt_layout

FORMAT = 1


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read or was made for a different model."""


def save_checkpoint(path, tensors, meta):
    """Write {name: array} and a JSON-able meta dict to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(tensors)
    arrays["meta"] = np.frombuffer(json.dumps({"format": FORMAT, **meta}).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)           # mkstemp's file is private; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path):
    """(tensors, meta) from `path`, or a CheckpointError that says what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; train first or pass the right --out-dir")
    try:
        with np.load(path, allow_pickle=False) as f:
            tensors = {k: f[k] for k in f.files}
        meta = json.loads(tensors.pop("meta").tobytes())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, this code reads format {FORMAT}")
    bad = next((k for k, a in tensors.items() if a.dtype.kind == "f" and not np.isfinite(a).all()), None)
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite values in {bad}: the run that wrote it had "
                              f"diverged; use an earlier checkpoint or train again with a lower --learning-rate")
    return tensors, meta


def check_shapes(path, tensors, prefix, shapes):
    """Raise unless `tensors` holds exactly `prefix + name` with `shape` for every (name, shape)."""
    for name, shape in shapes.items():
        key = prefix + name
        if key not in tensors:
            raise CheckpointError(f"checkpoint {path} was made for a different model: it has no tensor {name}")
        if tensors[key].shape != tuple(shape):
            raise CheckpointError(f"checkpoint {path} was made for a different model: {name} has shape "
                                  f"{tensors[key].shape} there and {tuple(shape)} here")
    extra = sorted(k[len(prefix):] for k in tensors if k.startswith(prefix) and k[len(prefix):] not in shapes)
    if extra:
        raise CheckpointError(f"checkpoint {path} was made for a different model: unexpected tensors {extra[:3]}")


STATE = ("params", "adam_m", "adam_v")     # what a training checkpoint holds of every parameter


def model_state(params, opt):
    """{"params" | "adam_m" | "adam_v": flat buffer}: the three arrays of one layout a rank trains, whatever part
    of the model they hold (all of it, a shard, a stage). In mixed precision the parameters are the optimizer's
    float32 master, not the 16-bit weights rounded from it, so a checkpoint is the same whatever the precision."""
    return dict(zip(STATE, (getattr(opt, "master", params), opt.m, opt.v)))


def save_training_state(path, state, adam_t, step, gpt_cfg, train_cfg, loss_scale=None):
    """state: {"params" | "adam_m" | "adam_v": {name: the whole single-core tensor}}, whatever the layout;
    loss_scale: fp16's LossScaler.state() (common/optim.py), if the run has one."""
    tensors = {f"{kind}/{name}": a for kind in STATE for name, a in state[kind].items()}
    save_checkpoint(path, tensors, {
        "step": step, "adam_t": adam_t, **({"loss_scale": loss_scale} if loss_scale else {}),
        "model": dataclasses.asdict(gpt_cfg), "train": dataclasses.asdict(train_cfg),
        "sampler": {"seed": train_cfg.seed, "next_step": step},
    })


def read_training_state(path, shapes, max_iters):
    """(state, adam_t, step, loss_scale) as save_training_state wrote them (loss_scale None if it saved none),
    checked against the model's {name: shape} and against the run it is to continue (`--max-iters`)."""
    tensors, meta = load_checkpoint(path)
    state = {}
    for kind in STATE:
        check_shapes(path, tensors, kind + "/", shapes)
        state[kind] = {name: tensors[f"{kind}/{name}"] for name in shapes}
    if meta["step"] > max_iters:
        raise CheckpointError(f"{path} is at step {meta['step']}, beyond --max-iters {max_iters}; "
                              f"raise --max-iters to train further")
    return state, meta["adam_t"], meta["step"], meta.get("loss_scale")


def single_core_state(layout, params, opt):
    """The state of a single-core run: its flat buffers seen as named tensors."""
    return {kind: layout.views(flat) for kind, flat in model_state(params, opt).items()}


def load_training_state(path, layout, params, opt, max_iters):
    """Fill a single-core run's flat params and AdamW state in place; returns the step to continue from."""
    state, opt.t, step, _ = read_training_state(path, layout.shapes, max_iters)
    for kind, views in single_core_state(layout, params, opt).items():
        for name, view in views.items():
            view[...] = state[kind][name]
    return step


def load_model(path, dtype=np.float32):
    """(GPTConfig, flat params, meta) from a checkpoint, for sampling and evaluation."""
    tensors, meta = load_checkpoint(path)
    gpt_cfg = GPTConfig(**meta["model"])
    layout = gpt_layout(gpt_cfg)
    check_shapes(path, tensors, "params/", layout.shapes)
    flat = np.empty(layout.size, dtype=dtype)
    for name, view in layout.views(flat).items():
        view[...] = tensors["params/" + name]
    return gpt_cfg, flat, meta
