"""Print text sampled from a trained checkpoint (from any chapter: checkpoints are layout-independent).

    python 01_single_core/sample.py --out-dir out/single_core --start "ROMEO:" --max-new-tokens 300
"""
import json
from pathlib import Path

import numpy as np

from common.checkpoint import load_model
from common.config import ConfigError, Parser, exit_with
from common.data import load_meta
from common.model import generate, gpt_layout
from common.startup import refuse_several_processes


def main(argv=None):
    refuse_several_processes("01_single_core/sample.py", "sample once: python 01_single_core/sample.py")
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="out/single_core", help="folder holding ckpt.npz")
    parser.add_argument("--data-dir", help="dataset folder with meta.json (default: the one the run trained on)")
    parser.add_argument("--start", default="\n", help="text to continue")
    parser.add_argument("--num-samples", type=int, default=1, help="samples to print (default: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=500, help="characters to generate (default: 500)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature: below 1 sharper, above 1 more random (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest characters (default: 200)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampler (default: 1337)")
    try:
        args = parser.parse_args(argv)
        for name in ("temperature", "top_k", "num_samples"):
            if getattr(args, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        if args.max_new_tokens < 0:
            raise ConfigError(f"--max-new-tokens must be zero or positive, got {args.max_new_tokens}")
        if not args.start:
            raise ConfigError("--start must hold at least one character to continue from")
        ckpt = Path(args.out_dir) / "ckpt.npz"
        gpt_cfg, params, meta = load_model(ckpt)
        data_dir = args.data_dir or meta["train"]["data_dir"]
        chars = load_meta(data_dir)["chars"]
        if len(chars) != gpt_cfg.vocab_size:
            raise ConfigError(f"{ckpt} has a vocabulary of {gpt_cfg.vocab_size} symbols but {data_dir} has "
                              f"{len(chars)}; pass the --data-dir the model was trained on")
        stoi = {c: i for i, c in enumerate(chars)}
        unknown = sorted(set(args.start) - set(stoi))
        if unknown:
            raise ConfigError(f"--start contains characters outside the vocabulary: {json.dumps(''.join(unknown))}")
    except ConfigError as e:
        exit_with(e)
    p = gpt_layout(gpt_cfg).views(params)
    rng = np.random.default_rng(args.seed)
    for i in range(args.num_samples):
        idx = np.array([[stoi[c] for c in args.start]])
        out = generate(p, gpt_cfg, idx, args.max_new_tokens, rng, args.temperature, args.top_k)
        print("".join(chars[t] for t in out[0]))
        if i < args.num_samples - 1:
            print("---------------")


if __name__ == "__main__":
    main()
