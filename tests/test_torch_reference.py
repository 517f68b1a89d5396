"""Our hand-written forward, backward and AdamW against PyTorch autograd and torch.optim.AdamW, in float64.

An independent check of what 01_single_core/verify.py proves with finite differences: PyTorch derives the
gradients its own way, so agreement to 1e-10 leaves no room for a wrong formula. PyTorch is optional.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the independent check of the "
                                            "hand-written backward against autograd is skipped")

from common.chapters import import_chapter  # noqa: E402
from common.checks import Report  # noqa: E402
from common.config import GPTConfig  # noqa: E402
from common.model import gpt_backward, gpt_forward, gpt_layout, init_params, objective, routing  # noqa: E402
from common.optim import AdamW, clip_grad_norm, decays  # noqa: E402

bench = import_chapter("01_single_core.bench")
CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11)
LAYOUT = gpt_layout(CFG)
TOL = 1e-10
BETAS, WEIGHT_DECAY, EPS = (0.9, 0.99), 0.1, 1e-8


def weights(seed=0):
    """float64 parameters moved off the initialisation (zero biases, unit gains), where wrong gradients hide."""
    params = init_params(CFG, seed, np.float64)
    params += np.random.default_rng(seed).normal(0.0, 0.1, params.shape)
    return params


def batch(seed):
    """Batch 3 x block 8 in which some tokens repeat, so their embedding gradients must add up."""
    rng = np.random.default_rng(100 + seed)
    idx = rng.integers(0, CFG.vocab_size, (3, CFG.block_size))
    idx[1, :3] = idx[0, 0]
    idx[2, -1] = idx[0, 0]
    return idx, rng.integers(0, CFG.vocab_size, idx.shape)


def ours(params, idx, targets):
    """Our loss, logits and flat gradient buffer."""
    p, grads = LAYOUT.views(params), np.zeros_like(params)
    logits, loss, cache = gpt_forward(p, idx, targets, CFG)
    gpt_backward(cache, p, LAYOUT.views(grads))
    return loss, logits, grads


def compare_with_autograd(params, model, idx, targets):
    """A Report with one row for the loss, one for the logits and one per gradient tensor."""
    loss, logits, grads = ours(params, idx, targets)
    model.zero_grad(set_to_none=True)
    t_logits, t_loss = model(torch.from_numpy(idx), torch.from_numpy(targets))
    t_loss.backward()
    report = Report(TOL)
    report.compare("loss", loss, t_loss.item())
    report.compare("logits", logits, t_logits.detach().numpy())
    g, t_g = LAYOUT.views(grads), bench.from_torch(model, LAYOUT.shapes, grad=True)
    for name in LAYOUT.shapes:
        report.compare(name, g[name], t_g[name])
    return report


def failures(report):
    return [name for name, ok in report.rows if not ok]


def test_loss_logits_and_every_gradient_match_pytorch_autograd_to_1e_10_in_float64():
    params = weights()
    model = bench.torch_model_from(LAYOUT.views(params), CFG).double()
    assert all(q.dtype == torch.float64 for q in model.parameters())
    report = compare_with_autograd(params, model, *batch(0))
    assert len(report.rows) == 2 + len(LAYOUT.shapes)
    assert failures(report) == []


def test_a_mixture_of_experts_with_tokens_dropped_matches_pytorch_computing_every_expert_on_every_token():
    """PyTorch runs every expert on every token and masks the sum with the kept choices; we dispatch. The loss
    compared is the objective: the cross-entropy plus the balance terms."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11, n_experts=4, top_k=2,
                    capacity_factor=1.0, aux_loss_coef=0.1)
    layout = gpt_layout(cfg)
    params = init_params(cfg, 0, np.float64) + np.random.default_rng(0).normal(0.0, 0.1, layout.size)
    p, grads = layout.views(params), np.zeros(layout.size)
    idx, targets = batch(1)
    logits, loss, cache = gpt_forward(p, idx, targets, cfg)
    gpt_backward(cache, p, layout.views(grads))
    assert any(r.kept.sum() < r.chosen.sum() for r in map(routing, cache[1]))      # some were over capacity
    model = bench.torch_model_from(p, cfg).double()
    t_logits, t_loss = model(torch.from_numpy(idx), torch.from_numpy(targets))
    t_loss.backward()
    report = Report(TOL)
    report.compare("objective", objective(loss, cache, cfg), t_loss.item())
    report.compare("logits", logits, t_logits.detach().numpy())
    g, t_g = layout.views(grads), bench.from_torch(model, layout.shapes, grad=True)
    for name in layout.shapes:
        report.compare(name, g[name], t_g[name])
    assert len(report.rows) == 2 + len(layout.shapes) and failures(report) == []


def test_the_autograd_comparison_reports_a_mismatch_when_one_weight_moves_by_one_part_in_a_million():
    params = weights()
    model = bench.torch_model_from(LAYOUT.views(params), CFG).double()
    LAYOUT.views(params)["h.1.mlp.c_fc.w"][3, 5] *= 1 + 1e-6
    failed = failures(compare_with_autograd(params, model, *batch(0)))
    assert {"loss", "logits", "h.1.mlp.c_fc.w"} <= set(failed)


def test_two_adamw_steps_on_clipped_gradients_match_torch_optim_adamw_to_1e_10_of_the_update():
    """Same gradients into both optimizers, clipped with a max norm they exceed; the second step exercises the
    moment estimates, which the first (where Adam is sign descent) cannot. The update, not only the parameter,
    is compared, so the tolerance is relative to the size of the step."""
    params = weights()
    start = params.copy()
    model = bench.torch_model_from(LAYOUT.views(params), CFG).double()
    groups = [{"params": [q for q in model.parameters() if q.dim() == 2], "weight_decay": WEIGHT_DECAY},
              {"params": [q for q in model.parameters() if q.dim() != 2], "weight_decay": 0.0}]
    t_opt = torch.optim.AdamW(groups, lr=0.0, betas=BETAS, eps=EPS)
    opt = AdamW(LAYOUT.mask(decays), *BETAS, WEIGHT_DECAY, eps=EPS, dtype=np.float64)
    max_norm = 0.05
    for step, lr in enumerate([1e-2, 3e-3]):
        _, _, grads = ours(params, *batch(step))
        for name, g in LAYOUT.views(grads).items():
            model.get_parameter(bench.torch_name(name)).grad = torch.from_numpy(
                np.array(g.T if bench.transposed(name, g.ndim) else g))
        t_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        norm = clip_grad_norm(grads, max_norm)
        assert norm > max_norm, f"step {step}: gradient norm {norm} does not exceed {max_norm}, nothing was clipped"
        assert t_norm == pytest.approx(norm, rel=1e-12)
        assert np.linalg.norm(grads) == pytest.approx(max_norm, rel=1e-5)
        for group in t_opt.param_groups:
            group["lr"] = lr
        opt.step(params, grads, lr)
        t_opt.step()

    report = Report(TOL)
    p, s, t_p = LAYOUT.views(params), LAYOUT.views(start), bench.from_torch(model, LAYOUT.shapes)
    for name in LAYOUT.shapes:
        report.compare(name, p[name], t_p[name])
        report.compare(f"{name} update", p[name] - s[name], t_p[name] - s[name])
    assert failures(report) == []
