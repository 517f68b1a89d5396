"""Benchmark the training step of 01_single_core/train.py: time, tokens/s, GFLOP/s, MFU and memory.
MFU is against this machine's measured float32 matmul peak; when PyTorch is installed, the same step in
PyTorch eager runs beside it, from the same weights and batches, with the same number of threads.

    OPENBLAS_NUM_THREADS=2 python 01_single_core/bench.py --config-name cpu --threads 2
    python 01_single_core/bench.py --config-name baby --threads 2 --json out/bench_baby.json

FLOPs per step = (6 N + 12 n_layer T C) * B T.  N = 12 n_layer C^2 + V C counts the weights that take part in
matmuls (c_attn, attn.c_proj, c_fc, mlp.c_proj and the tied LM head; not biases, LayerNorms or embedding
lookups): 2 FLOPs per multiply-add, the backward twice the forward. 12 n_layer T C per token is q k^T and
att v, forward and backward, over the full T x T scores: the causal half is not discounted (our attention
computes it, then masks it), as in PaLM's and nanoGPT's estimate_mfu.
"""
import argparse
import importlib.util
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from common.chapters import import_chapter
from common.config import ConfigError, GPTConfig, Parser, TrainConfig, exit_with
from common.memory import reuse_freed_memory
from common.model import gpt_layout, init_params

# name -> (model, batch size): nanoGPT's CPU config for tiny Shakespeare, and its shakespeare_char "baby GPT"
CONFIGS = {
    "cpu": (GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65), 12),
    "baby": (GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65), 64),
}
LR = 1e-3
EMBEDDINGS = ("wte", "wpe")


def flops_per_step(gpt_cfg, batch_size):
    C, T, L = gpt_cfg.n_embd, gpt_cfg.block_size, gpt_cfg.n_layer
    return (6 * (12 * L * C * C + gpt_cfg.vocab_size * C) + 12 * L * T * C) * batch_size * T


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sgemm_peak(n, repeats=5):
    """Best GFLOP/s of a float32 (n,n) @ (n,n): the ceiling a float32 training step could reach here."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    np.matmul(a, b, out=out)                        # untimed: starts the BLAS threads, touches the pages
    return 2 * n ** 3 / min(timed(lambda: np.matmul(a, b, out=out)) for _ in range(repeats)) / 1e9


def rss_mib():
    """Resident size now (Linux /proc/self/statm), unlike ru_maxrss, which only ever rises."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def time_steps(step, batches, warmup):
    """Run `warmup` untimed steps, then time one step(x, y) per remaining batch; also the RSS in between."""
    for x, y in batches[:warmup]:
        step(x, y)
    rss = rss_mib()
    return [timed(lambda: step(x, y)) for x, y in batches[warmup:]], rss


def summary(seconds, flops, tokens, peak):
    ms = np.array(seconds) * 1e3
    median = float(np.median(ms))
    gflops = flops / median / 1e6
    return {"ms_per_step": median, "ms_min": float(ms.min()), "ms_max": float(ms.max()),
            "ms_p25": float(np.percentile(ms, 25)), "ms_p75": float(np.percentile(ms, 75)),
            "tokens_per_s": tokens / median * 1e3, "gflops": gflops, "mfu": gflops / peak}


def bench_ours(gpt_cfg, train_cfg, batches, warmup):
    """The training step of 01_single_core/train.py on a model built exactly as its main() builds it."""
    train = import_chapter("01_single_core.train")
    malloc_tuned = reuse_freed_memory()          # as train.py's main() does; process-wide, so PyTorch gets it too
    state = train.build(gpt_cfg, train_cfg)
    losses = []

    def step(x, y):
        losses.append(train.train_step(state, (x, y), LR))

    seconds, rss_warm = time_steps(step, batches, warmup)
    return seconds, losses[0], {"rss_after_warmup_mib": rss_warm, "rss_after_steps_mib": rss_mib(),
                                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                "malloc_tuned": malloc_tuned}


# ----------------------------------------------------------------------------- the same model in PyTorch

def torch_name(name):
    """Our parameter name -> the PyTorch model's: "h.0.ln_1.w" -> "h.0.ln_1.weight", "wte" -> "wte.weight"."""
    if name in EMBEDDINGS:
        return name + ".weight"
    return name[:-2] + (".weight" if name.endswith(".w") else ".bias")


def transposed(name, ndim):
    """nn.Linear keeps its weight as (out, in); ours are (in, out). Embeddings are (rows, C) in both, and the
    experts' stacks (E, in, out) and biases (E, out) are ours."""
    return ndim == 2 and name not in EMBEDDINGS and name.endswith(".w")


def torch_model_from(p, gpt_cfg):
    """nanoGPT's GPT as an nn.Module, with our names, holding copies of our named views `p` in their dtype.
    Attention is F.scaled_dot_product_attention(is_causal=True), as nanoGPT uses it: scale 1/sqrt(head size).
    With experts, every expert runs on every token and the router's kept choices mask the sum (a computation
    unlike common/moe.py's dispatch), and the loss returned is the objective, balance terms included."""
    import torch                    # here only: PyTorch is optional, and loading it would swell our memory figures
    from torch import nn
    from torch.nn import functional as F
    C, nh, E, k = gpt_cfg.n_embd, gpt_cfg.n_head, gpt_cfg.n_experts, gpt_cfg.top_k

    class Stack(nn.Module):
        def __init__(self, fan_in, fan_out):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(E, fan_in, fan_out))
            self.bias = nn.Parameter(torch.empty(E, fan_out))

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.router, self.experts = nn.Linear(C, E, bias=False), nn.Module()
            self.experts.c_fc, self.experts.c_proj = Stack(C, 4 * C), Stack(4 * C, C)

        def forward(self, h):
            B, T, _ = h.shape
            probs = F.softmax(self.router(h), dim=-1)                                   # (B,T,E)
            onehot = F.one_hot(torch.sort(-probs, dim=-1, stable=True).indices[..., :k], E)   # (B,T,k,E)
            queue = onehot.transpose(1, 2).reshape(B, k * T, E)                          # first choices first
            place = queue.cumsum(dim=1) * queue
            cap = math.ceil(gpt_cfg.capacity_factor * T * k / E)
            kept = ((place > 0) & (place <= cap)).reshape(B, k, T, E).sum(dim=1)        # (B,T,E) 0 or 1
            fc, proj = self.experts.c_fc, self.experts.c_proj
            hidden = F.gelu(torch.einsum("btc,ecf->btef", h, fc.weight) + fc.bias, approximate="tanh")
            y = torch.einsum("btef,efc->btec", hidden, proj.weight) + proj.bias         # (B,T,E,C)
            self.aux = E * (onehot.sum(dim=(1, 2)) / (T * k) * probs.mean(dim=1)).sum(dim=-1).mean()
            return (y * (probs * kept)[..., None]).sum(dim=2)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(C), nn.Module(), nn.LayerNorm(C)
            self.attn.c_attn, self.attn.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)   # plain containers, only
            self.mlp = Experts() if E else nn.Module()                                  # for nanoGPT's names
            if not E:
                self.mlp.c_fc, self.mlp.c_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B, T, _ = x.shape
            qkv = self.attn.c_attn(self.ln_1(x)).view(B, T, 3, nh, C // nh)            # packed [q | k | v]
            q, k, v = qkv.permute(2, 0, 3, 1, 4)                                        # each (B,nh,T,hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)                # (B,nh,T,hs)
            x = x + self.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
            if E:
                return x + self.mlp(self.ln_2(x))
            return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(gpt_cfg.vocab_size, C), nn.Embedding(gpt_cfg.block_size, C)
            self.h = nn.ModuleList(Block() for _ in range(gpt_cfg.n_layer))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe.weight[:idx.shape[1]]                   # (B,T,C)
            for block in self.h:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)                    # tied head: (B,T,C) @ (C,V)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
            return logits, loss + gpt_cfg.aux_loss_coef * sum(block.mlp.aux for block in self.h) if E else loss

    model = GPT().to(torch.from_numpy(p["wte"]).dtype)
    with torch.no_grad():
        for name, value in p.items():
            w = torch.from_numpy(np.array(value))
            model.get_parameter(torch_name(name)).copy_(w.T if transposed(name, w.ndim) else w)
    return model


def from_torch(model, names, grad=False):
    """The model's parameters (or their .grad) as NumPy arrays under our names, in our (in, out) orientation."""
    arrays = {name: model.get_parameter(torch_name(name)) for name in names}
    arrays = {name: (t.grad if grad else t).detach().numpy() for name, t in arrays.items()}
    return {name: a.T if transposed(name, a.ndim) else a for name, a in arrays.items()}


def bench_torch(gpt_cfg, train_cfg, batches, warmup, threads):
    """The same step in PyTorch eager: zero_grad, forward, backward, clip_grad_norm_, AdamW with our decay groups."""
    import torch
    torch.set_num_threads(threads)
    init = init_params(gpt_cfg, train_cfg.seed, np.dtype(train_cfg.dtype))
    model = torch_model_from(gpt_layout(gpt_cfg).views(init), gpt_cfg)
    groups = [{"params": [q for q in model.parameters() if q.dim() == 2], "weight_decay": train_cfg.weight_decay},
              {"params": [q for q in model.parameters() if q.dim() != 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(train_cfg.beta1, train_cfg.beta2), eps=1e-8)
    losses = []

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        opt.step()
        losses.append(loss.item())

    return time_steps(step, batches, warmup)[0], losses[0], torch.__version__


# ----------------------------------------------------------------------------- main

def positive(text):
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return int(text)


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-name", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--steps", type=positive, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=positive, default=5, help="untimed steps first, at least one: the "
                                                                  "first step allocates (default 5)")
    parser.add_argument("--threads", type=positive, help="BLAS and PyTorch threads (default: "
                                                         "$OPENBLAS_NUM_THREADS, else every core)")
    parser.add_argument("--peak-size", type=positive, default=2048, help="n of the (n,n) sgemm peak (default 2048)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch side-by-side")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--json", help="also write the figures to this file")
    try:
        args = parser.parse_args(argv)
        if args.threads and os.environ.get("OPENBLAS_NUM_THREADS") != str(args.threads):
            if argv is not None:        # called from Python, where starting the process again would end the caller
                raise ConfigError(f"--threads {args.threads} needs OPENBLAS_NUM_THREADS={args.threads} set before "
                                  f"NumPy loads; set it, or run bench.py as a script")
            # OpenBLAS reads its thread count once, when NumPy loads it: start this script again with it set
            os.environ.update(OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
            os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]])
    except ConfigError as e:
        exit_with(e)
    threads = args.threads or int(os.environ.get("OPENBLAS_NUM_THREADS") or os.cpu_count())

    gpt_cfg, batch_size = CONFIGS[args.config_name]
    train_cfg = TrainConfig(batch_size=batch_size, learning_rate=LR, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    # random tokens: the cost of a step does not depend on them, and no dataset is needed
    batches = [tuple(rng.integers(0, gpt_cfg.vocab_size, (2, batch_size, gpt_cfg.block_size)))
               for _ in range(args.warmup + args.steps)]
    flops, tokens = flops_per_step(gpt_cfg, batch_size), batch_size * gpt_cfg.block_size

    # our steps run first: ru_maxrss is a high-water mark, and the sgemm matrices and PyTorch would raise it
    seconds, loss0, memory = bench_ours(gpt_cfg, train_cfg, batches, args.warmup)
    peak = sgemm_peak(args.peak_size)
    report = {"config": args.config_name, **vars(gpt_cfg), "batch_size": batch_size, "dtype": train_cfg.dtype,
              "threads": threads, "steps": args.steps, "warmup": args.warmup, "peak_size": args.peak_size,
              "sgemm_peak_gflops": peak, "gflop_per_step": flops / 1e9,
              **summary(seconds, flops, tokens, peak), **memory, "first_loss": loss0, "torch": None}
    no_torch = "skipped (--no-torch)" if args.no_torch else None
    if not no_torch and importlib.util.find_spec("torch") is None:
        no_torch = "not installed: no side-by-side"
    if not no_torch:
        t_seconds, t_loss0, version = bench_torch(gpt_cfg, train_cfg, batches, args.warmup, threads)
        t = report["torch"] = {"version": version, **summary(t_seconds, flops, tokens, peak), "first_loss": t_loss0}
        t["ours_over_torch"] = report["ms_per_step"] / t["ms_per_step"]
    print_report(report, no_torch)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def print_report(r, why_no_torch):
    def timing(s):
        return (f"median {s['ms_per_step']:.2f} ms/step (min {s['ms_min']:.2f}, IQR {s['ms_p25']:.2f}-"
                f"{s['ms_p75']:.2f}, max {s['ms_max']:.2f}); {s['tokens_per_s']:,.0f} tokens/s, "
                f"{s['gflops']:.1f} GFLOP/s, MFU {100 * s['mfu']:.1f}%")
    growth = r["rss_after_steps_mib"] - r["rss_after_warmup_mib"]
    verdict = "no per-step growth" if growth < 1 else f"GROWS {1024 * growth / r['steps']:.0f} KiB/step"
    print(f"config {r['config']}: {r['n_layer']} layers, {r['n_head']} heads, {r['n_embd']} dims, block "
          f"{r['block_size']}, batch {r['batch_size']}, vocab {r['vocab_size']}, {r['dtype']}, threads {r['threads']}")
    n = r["peak_size"]
    print(f"sgemm peak   {r['sgemm_peak_gflops']:.1f} GFLOP/s (float32 ({n},{n}) @ ({n},{n}), best of 5)")
    print(f"model        {r['gflop_per_step']:.4f} GFLOP/step (6 N BT + 12 L T C BT, causal half not discounted)")
    print(f"ours         {timing(r)}; {r['steps']} steps after {r['warmup']} warm-up")
    print(f"memory       peak RSS {r['peak_rss_mib']:.1f} MiB; RSS {r['rss_after_warmup_mib']:.1f} MiB after warm-up, "
          f"{r['rss_after_steps_mib']:.1f} MiB after {r['steps']} steps ({growth:+.1f} MiB: {verdict}); glibc "
          f"malloc {'tuned as train.py tunes it (for both sides)' if r['malloc_tuned'] else 'untuned'}")
    t = r["torch"]
    if t is None:
        print(f"PyTorch      {why_no_torch}")
        return
    print(f"PyTorch      {t['version']} eager, scaled_dot_product_attention: {timing(t)}")
    print(f"ours/PyTorch {t['ours_over_torch']:.2f}x the time per step (first-step loss {r['first_loss']:.5f} "
          f"ours, {t['first_loss']:.5f} PyTorch)")


if __name__ == "__main__":
    main()
