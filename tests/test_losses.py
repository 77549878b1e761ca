"""ctpo.losses against independent references: hand-computed cases, a float64 loop implementation
written straight from the formulas (autograd through it for gradients), and hypothesis properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctpo.losses import (
    LOSS_AGG_MODES,
    METHODS,
    PolicyLossConfig,
    agg_loss,
    compute_policy_loss,
    reference_policy_loss,
    register_method,
)

F64 = torch.float64
METHOD_NAMES = ["grpo", "seq", "gspo", "ctpo", "ctpo_fixed"]

# ---------------------------------------------------------------------------------------------
# Reference implementation: loops over tokens, float64, ratio space where the formula is in ratio
# space. Written from the paper's formulas (§2-3, restated in ctpo.losses' module docstring), not from
# ctpo.losses' code.
# ---------------------------------------------------------------------------------------------


def ref_agg(
    loss_mat, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None
):
    """verl 0.9.1 ``agg_loss`` semantics, one sequence at a time (empty batches: 0, where verl gives NaN)."""
    b, t = mask.shape
    n = [sum(float(mask[i, j]) for j in range(t)) for i in range(b)]
    nonempty = sum(1 for x in n if x > 0)
    if mode == "token-mean":
        denom = max(sum(n), 1) if batch_num_tokens is None else batch_num_tokens
        return sum(loss_mat[i, j] * mask[i, j] for i in range(b) for j in range(t)) / denom * dp_size
    if mode == "token-sum":
        return sum(loss_mat[i, j] * mask[i, j] for i in range(b) for j in range(t)) * dp_size
    g = max(nonempty, 1) if global_batch_size is None else global_batch_size
    total = 0.0
    for i in range(b):
        if n[i] == 0:
            continue
        s = sum(loss_mat[i, j] * mask[i, j] for j in range(t))
        total = total + (s / (n[i] + 1e-8) if mode == "seq-mean-token-mean" else s)
    out = total / g * dp_size
    if mode == "seq-mean-token-sum-norm":
        out = out / (t if loss_scale_factor is None else loss_scale_factor)
    return out


def ref_loss(
    old,
    new,
    adv,
    mask,
    *,
    method,
    clip_mode,
    clip_low=0.2,
    clip_high=0.2,
    eps_low=0.025,
    eps_high=0.05,
    gamma=0.5,
    dual_c=0.0,
    dual_eps=0.0,
    agg="token-mean",
    grad="current",
    position="policy",
    gbi=None,
    weights=None,
):
    """Per-token PPO surrogate with the method's weight; ``new`` is a float64 leaf (autograd).
    ``weights`` (B, T): rollout-correction weights, a constant factor on each token's surrogate."""
    b, t_len = mask.shape
    per_token = adv.dim() == 2
    rows = []
    for i in range(b):
        ells = [(new[i, j] - old[i, j]) if mask[i, j] else None for j in range(t_len)]
        valid = [e for e in ells if e is not None]
        total = sum(valid) if valid else torch.zeros((), dtype=F64)
        row, pos, prefix = [], 0, torch.zeros((), dtype=F64)
        for j in range(t_len):
            if not mask[i, j]:
                row.append(torch.zeros((), dtype=F64))
                continue
            pos += 1
            prefix = prefix + ells[j]
            log_w = {
                "grpo": ells[j],
                "seq": total,
                "gspo": total / max(len(valid), 1),
                "ctpo": prefix,
                "ctpo_fixed": prefix,
            }[method]
            if grad == "current":  # w = sg(ρ) · π/sg(π)
                w = torch.exp(log_w.detach()) * torch.exp(new[i, j] - new[i, j].detach())
            else:
                w = torch.exp(log_w)
            tt = pos if position == "policy" else j + 1
            if clip_mode == "fixed":
                w_clip = torch.clamp(w, 1 - clip_low, 1 + clip_high)
            elif clip_mode == "adaptive":
                w_clip = torch.clamp(w, math.exp(-eps_low * tt**gamma), math.exp(eps_high * tt**gamma))
            else:
                w_clip = w
            a = float(adv[i, j] if per_token else adv[i])
            surrogate = torch.maximum(-a * w, -a * w_clip)
            if a < 0 and (dual_c or dual_eps):
                c = dual_c if dual_c else math.exp(dual_eps * tt**gamma)
                surrogate = torch.minimum(surrogate, torch.tensor(-a * c, dtype=F64))
            if weights is not None:
                surrogate = surrogate * float(weights[i, j])
            row.append(surrogate)
        rows.append(row)
    loss_mat = [[rows[i][j] for j in range(t_len)] for i in range(b)]

    class M:  # indexable wrapper so ref_agg reads loss_mat[i, j]
        def __getitem__(self, ij):
            return loss_mat[ij[0]][ij[1]]

    return ref_agg(M(), mask.to(F64), agg, **(gbi or {}))


def make_batch(b=3, t=10, seed=0, noise=0.3, left_pad=False, tool_span=True, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=F64) * 2
    new = old + noise * torch.randn(b, t, generator=g, dtype=F64)
    mask = torch.ones(b, t, dtype=torch.bool)
    for i in range(b):
        n = t - i  # right padding of i tokens
        mask[i, n:] = False
        if tool_span and n > 6:
            mask[i, 3:5] = False  # tool output in the middle
    if left_pad:
        mask[0] = torch.roll(mask[0], 2)
    adv = torch.randn(b, generator=g, dtype=F64)
    if per_token_adv:
        adv = adv[:, None] + 0.1 * torch.randn(b, t, generator=g, dtype=F64)
    return old, new, adv, mask


def ours(old, new, adv, mask, cfg, gbi=None, dtype=torch.float32):
    lp = new.detach().to(dtype).requires_grad_(True)
    loss, metrics = compute_policy_loss(old.to(dtype), lp, adv, mask, cfg, global_batch_info=gbi)
    loss.backward()
    return loss.detach().double(), lp.grad.double(), metrics


def reference(old, new, adv, mask, **kw):
    leaf = new.detach().clone().requires_grad_(True)
    loss = torch.as_tensor(ref_loss(old, leaf, adv, mask, **kw), dtype=F64)
    if not loss.requires_grad:  # no policy token at all
        return loss, torch.zeros_like(new)
    loss.backward()
    return loss.detach(), leaf.grad


def cfg_kwargs(cfg: PolicyLossConfig) -> dict:
    r = cfg.resolved()
    return dict(
        method=r.method,
        clip_mode=r.clip_mode,
        clip_low=r.clip_low,
        clip_high=r.clip_high,
        eps_low=r.eps_low,
        eps_high=r.eps_high,
        gamma=r.gamma,
        dual_c=r.dual_clip_c,
        dual_eps=r.dual_clip_eps,
        agg=r.loss_agg_mode,
        grad=r.grad,
        position=r.position,
    )


def assert_close(a, b, rtol=2e-5, atol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("clip_mode", ["fixed", "adaptive", "none"])
def test_matches_reference_default_clipping(method, clip_mode):
    old, new, adv, mask = make_batch(seed=1)
    cfg = PolicyLossConfig(method=method, clip_mode=clip_mode)
    loss, grad, _ = ours(old, new, adv, mask, cfg)
    ref_l, ref_g = reference(old, new, adv, mask, **cfg_kwargs(cfg))
    assert_close(loss, ref_l)
    assert_close(grad, ref_g)


@pytest.mark.parametrize("method", ["grpo", "ctpo", "gspo"])
@pytest.mark.parametrize("dual", [{"dual_clip_c": 0.0}, {"dual_clip_c": 1.5}, {"dual_clip_eps": 0.05}])
@pytest.mark.parametrize("position", ["policy", "absolute"])
def test_matches_reference_dual_and_position(method, dual, position):
    old, new, adv, mask = make_batch(seed=2, noise=0.5, left_pad=True)
    cfg = PolicyLossConfig(method=method, position=position, **dual)
    loss, grad, _ = ours(old, new, adv, mask, cfg)
    ref_l, ref_g = reference(old, new, adv, mask, **cfg_kwargs(cfg))
    assert_close(loss, ref_l)
    assert_close(grad, ref_g)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize(
    "gbi", [None, {"dp_size": 4, "batch_num_tokens": 50, "global_batch_size": 7, "loss_scale_factor": 3}]
)
def test_every_aggregation_mode(mode, gbi):
    old, new, adv, mask = make_batch(b=4, t=9, seed=3)
    mask[3] = False  # a fully masked sequence is excluded from the seq-mean modes
    cfg = PolicyLossConfig(method="ctpo", loss_agg_mode=mode)
    loss, grad, _ = ours(old, new, adv, mask, cfg, gbi=gbi)
    ref_l, ref_g = reference(old, new, adv, mask, gbi=gbi, **cfg_kwargs(cfg))
    assert_close(loss, ref_l)
    assert_close(grad, ref_g)
    # the standalone verl-compatible agg_loss
    lm = torch.randn(4, 9, dtype=F64)
    assert_close(
        agg_loss(lm, mask, mode, **(gbi or {})),
        torch.as_tensor(ref_agg(lm, mask.to(F64), mode, **(gbi or {}))),
    )


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("grad", ["current", "prefix"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_rollout_correction_weights_scale_each_tokens_loss(method, grad, mode):
    """VERL's rollout correction: loss_t <- w_t * loss_t before aggregation, w a constant (no gradient)."""
    old, new, adv, mask = make_batch(b=4, t=12, seed=11, noise=0.4)
    g = torch.Generator().manual_seed(5)
    seq_w = torch.rand(4, 1, generator=g, dtype=F64) * 4.0  # one weight per sequence, as rollout_is=sequence
    weights = (seq_w * mask).to(F64)
    cfg = PolicyLossConfig(method=method, loss_agg_mode=mode, grad=grad)
    kw = cfg_kwargs(cfg)
    lp = new.detach().clone().requires_grad_(True)
    w_leaf = weights.clone().requires_grad_(True)
    loss, _ = compute_policy_loss(old, lp, adv, mask, cfg, rollout_is_weights=w_leaf)
    loss.backward()
    r_loss, r_grad = reference(old, new, adv, mask, weights=weights, **kw)
    assert_close(loss.detach(), r_loss, rtol=1e-10, atol=1e-12)
    assert_close(lp.grad, r_grad, rtol=1e-10, atol=1e-12)
    assert w_leaf.grad is None  # the weights are constants
    plain, _ = compute_policy_loss(old, new.detach().clone(), adv, mask, cfg)
    assert not torch.allclose(loss.detach(), plain)  # the weights matter
    per_seq, _ = compute_policy_loss(
        old, new.detach().clone(), adv, mask, cfg, rollout_is_weights=seq_w[:, 0]
    )
    assert_close(per_seq, loss.detach(), rtol=1e-12, atol=0)  # (B,) broadcasts like (B, T)


def test_per_token_advantages_match_reference():
    old, new, adv, mask = make_batch(seed=4, per_token_adv=True)
    for method in METHOD_NAMES:
        cfg = PolicyLossConfig(method=method)
        loss, grad, _ = ours(old, new, adv, mask, cfg)
        ref_l, ref_g = reference(old, new, adv, mask, **cfg_kwargs(cfg))
        assert_close(loss, ref_l)
        assert_close(grad, ref_g)
        _, _, m_row = ours(old, new, adv[:, :1].expand_as(adv).contiguous(), mask, cfg)
        _, _, m_vec = ours(old, new, adv[:, 0], mask, cfg)
        assert m_row["clip/frac"] == pytest.approx(m_vec["clip/frac"])


# ---------------------------------------------------------------------------------------------
# Structural properties
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("clip_mode", ["fixed", "adaptive", "none"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_on_policy_equals_vanilla_policy_gradient(method, clip_mode, mode):
    _, new, adv, mask = make_batch(seed=5)
    cfg = PolicyLossConfig(method=method, clip_mode=clip_mode, loss_agg_mode=mode)
    loss, grad, metrics = ours(new, new, adv, mask, cfg, dtype=F64)
    # vanilla PG: loss = −agg(A · log π) up to a constant; value −agg(A), gradient −agg-weight · A
    leaf = new.clone().requires_grad_(True)
    vanilla = ref_agg(-adv[:, None] * torch.exp(leaf - leaf.detach()), mask.to(F64), mode)
    vanilla.backward()
    assert_close(loss, vanilla.detach(), rtol=1e-6)
    assert_close(grad, leaf.grad, rtol=1e-6)
    assert metrics["clip/frac"] == 0.0
    assert metrics["ratio/mean"] == pytest.approx(1.0)
    assert metrics["ratio/approx_kl"] == pytest.approx(0.0)


def test_first_token_cumulative_ratio_equals_token_ratio():
    """At t = 1, ρ_{1:1} = r_1: with advantage only on each row's first policy token, ctpo_fixed == grpo."""
    old, new, _, mask = make_batch(seed=6, noise=0.4, left_pad=True)
    first = (mask.cumsum(-1) == 1) & mask
    adv = torch.where(first, torch.tensor([1.5, -2.0, 0.7], dtype=F64)[:, None], torch.zeros((), dtype=F64))
    for clip_mode in ["fixed", "adaptive", "none"]:
        a = ours(old, new, adv, mask, PolicyLossConfig(method="ctpo_fixed", clip_mode=clip_mode))
        b = ours(old, new, adv, mask, PolicyLossConfig(method="grpo", clip_mode=clip_mode))
        assert_close(a[0], b[0])
        assert_close(a[1], b[1])
        assert a[2]["clip/frac"] == b[2]["clip/frac"]


def test_adaptive_with_gamma_zero_is_a_fixed_log_space_clip():
    old, new, adv, mask = make_batch(seed=7, noise=0.5)
    el, eh, ed = 0.1, 0.2, 0.3
    adaptive = PolicyLossConfig(
        method="ctpo", clip_mode="adaptive", gamma=0.0, eps_low=el, eps_high=eh, dual_clip_eps=ed
    )
    fixed = PolicyLossConfig(
        method="ctpo",
        clip_mode="fixed",
        clip_low=1 - math.exp(-el),
        clip_high=math.exp(eh) - 1,
        dual_clip_c=math.exp(ed),
    )
    a, b = ours(old, new, adv, mask, adaptive), ours(old, new, adv, mask, fixed)
    assert_close(a[0], b[0])
    assert_close(a[1], b[1])
    for key in ["clip/frac_low", "clip/frac_high", "clip/frac_dual"]:
        assert a[2][key] == pytest.approx(b[2][key])
    assert a[2]["clip/frac"] > 0


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("grad", ["current", "prefix"])
def test_masked_tokens_get_zero_grad_and_do_not_advance_t(method, grad):
    """A sequence with tool tokens in the middle == the same sequence with them removed."""
    g = torch.Generator().manual_seed(8)
    t = 12
    old = -torch.rand(2, t, generator=g, dtype=F64)
    new = old + 0.4 * torch.randn(2, t, generator=g, dtype=F64)
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[:, 4:7] = False  # tool output
    mask[1, 10:] = False  # and padding
    old[~mask] = 5.0  # arbitrary finite junk on mask-0 tokens must not matter
    new[~mask] = -7.0
    adv = torch.tensor([0.8, -1.1], dtype=F64)
    cfg = PolicyLossConfig(method=method, grad=grad, loss_agg_mode="seq-mean-token-sum")
    loss, grad_full, _ = ours(old, new, adv, mask, cfg)
    assert torch.all(grad_full[~mask] == 0.0)
    # compacted: policy tokens only, right-padded
    idx = [torch.nonzero(mask[i]).flatten() for i in range(2)]
    old_c, new_c = torch.zeros(2, t, dtype=F64), torch.zeros(2, t, dtype=F64)
    mask_c = torch.zeros(2, t, dtype=torch.bool)
    for i in range(2):
        k = len(idx[i])
        old_c[i, :k], new_c[i, :k], mask_c[i, :k] = old[i, idx[i]], new[i, idx[i]], True
    loss_c, grad_c, _ = ours(old_c, new_c, adv, mask_c, cfg)
    assert_close(loss, loss_c)
    for i in range(2):
        assert_close(grad_full[i, idx[i]], grad_c[i, : len(idx[i])])


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_left_and_right_padding_agree(method, mode):
    g = torch.Generator().manual_seed(9)
    b, n, pad = 3, 8, 3
    old = -torch.rand(b, n, generator=g, dtype=F64)
    new = old + 0.3 * torch.randn(b, n, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    z = torch.zeros(b, pad, dtype=F64)
    right = [torch.cat([old, z], 1), torch.cat([new, z], 1)]
    left = [torch.cat([z, old], 1), torch.cat([z, new], 1)]
    mr = torch.cat([torch.ones(b, n), torch.zeros(b, pad)], 1).bool()
    ml = torch.cat([torch.zeros(b, pad), torch.ones(b, n)], 1).bool()
    cfg = PolicyLossConfig(method=method, loss_agg_mode=mode)
    lr_, gr, _ = ours(*right, adv, mr, cfg)
    ll, gl, _ = ours(*left, adv, ml, cfg)
    assert_close(lr_, ll)
    assert_close(gr[:, :n], gl[:, pad:])
    assert torch.all(gl[:, :pad] == 0) and torch.all(gr[:, n:] == 0)


@pytest.mark.parametrize("method", ["ctpo", "seq", "gspo", "ctpo_fixed"])
@pytest.mark.parametrize("clip_mode", ["fixed", "adaptive"])
def test_prefix_gradient_matches_autograd_of_naive_prefix_product(method, clip_mode):
    """grad="prefix" differentiates the whole product Π_{k≤t} π/μ (here: a literal running product)."""
    old, new, adv, mask = make_batch(seed=10, noise=0.3)
    cfg = PolicyLossConfig(method=method, clip_mode=clip_mode, grad="prefix")
    loss, grad, _ = ours(old, new, adv, mask, cfg)
    r = cfg.resolved()
    leaf = new.detach().clone().requires_grad_(True)
    ratio = torch.exp(leaf - old)  # per-token ratios π/μ
    b, t_len = mask.shape
    terms = []
    for i in range(b):
        valid = [j for j in range(t_len) if mask[i, j]]
        full = math.prod([ratio[i, j] for j in valid]) if valid else 1.0
        running = torch.ones((), dtype=F64)
        for pos, j in enumerate(valid, start=1):
            running = running * ratio[i, j]
            w = {"ctpo": running, "ctpo_fixed": running, "seq": full, "gspo": full ** (1.0 / len(valid))}[
                method
            ]
            if clip_mode == "fixed":
                w_clip = torch.clamp(w, 1 - r.clip_low, 1 + r.clip_high)
            else:
                w_clip = torch.clamp(w, math.exp(-r.eps_low * pos**0.5), math.exp(r.eps_high * pos**0.5))
            a = float(adv[i])
            s = torch.maximum(-a * w, -a * w_clip)
            if a < 0 and (r.dual_clip_c or r.dual_clip_eps):
                c = r.dual_clip_c or math.exp(r.dual_clip_eps * pos**0.5)
                s = torch.minimum(s, torch.tensor(-a * c, dtype=F64))
            terms.append(s)
    ref = sum(terms) / mask.sum()
    ref.backward()
    assert_close(loss, ref.detach())
    assert_close(grad, leaf.grad)
    if method in ("ctpo", "seq"):  # differs from the Prop. 1 estimator off-policy
        _, grad_current, _ = ours(old, new, adv, mask, PolicyLossConfig(method=method, clip_mode=clip_mode))
        assert not torch.allclose(grad, grad_current)


# ---------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------


def test_clip_fractions_and_values_by_hand():
    """grpo, ratio range [0.8, 1.2], dual clip c = 3; ratios chosen so each branch fires once."""
    ratios = torch.tensor([[1.5, 0.5, 1.0, 9.0], [0.5, 1.5, 4.0, 9.0], [2.0, 0.1, 1.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]] * 3, dtype=torch.bool)  # the 9.0 column is padding
    adv = torch.tensor([1.0, -1.0, 0.0], dtype=F64)
    old = torch.full_like(ratios, -1.0)
    new = old + torch.log(ratios)
    cfg = PolicyLossConfig(method="grpo", clip_mode="fixed", clip_low=0.2, clip_high=0.2, dual_clip_c=3.0)
    loss, grad, m = ours(old, new, adv, mask, cfg, dtype=F64)
    # A = +1: −min(w, 1.2) -> −1.2 (clipped high), −0.5, −1.0 ; A = −1: max(w, 0.8) -> 0.8 (clipped low),
    # 1.5, min(4.0, 3.0) = 3.0 (dual) ; A = 0: 0.
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.0 + 0.8 + 1.5 + 3.0) / 9)
    expected = torch.tensor([[0, -0.5, -1.0, 0], [0, 1.5, 0, 0], [0, 0, 0, 0]], dtype=F64) / 9
    assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    assert m["clip/frac_high"] == pytest.approx(1 / 9)
    assert m["clip/frac_low"] == pytest.approx(1 / 9)
    assert m["clip/frac_dual"] == pytest.approx(1 / 9)
    assert m["clip/frac"] == pytest.approx(3 / 9)
    valid = ratios[mask]
    assert m["ratio/mean"] == pytest.approx(valid.mean().item())
    assert m["ratio/max"] == pytest.approx(4.0)
    assert m["ratio/p50"] == pytest.approx(torch.quantile(valid, 0.5).item())
    assert m["ratio/p05"] == pytest.approx(torch.quantile(valid, 0.05).item())
    assert m["ratio/log_mean"] == pytest.approx(valid.log().mean().item())
    assert m["ratio/approx_kl"] == pytest.approx(-valid.log().mean().item())
    assert m["ratio/tokens"] == 9.0
    assert all(isinstance(v, float) for v in m.values())


def test_position_scaled_dual_clip_by_hand():
    """ctpo, A < 0: the dual threshold at position t is exp(0.05·√t)."""
    t = torch.arange(1, 5, dtype=F64)
    d = 0.05 * t.sqrt()
    # cumulative log-ratios just above the threshold at t = 2 and 4, just below at t = 1 and 3
    log_rho = torch.stack([d[0] - 0.01, d[1] + 0.01, d[2] - 0.01, d[3] + 0.01])
    ell = torch.diff(log_rho, prepend=torch.zeros(1, dtype=F64))
    old = torch.full((1, 4), -2.0, dtype=F64)
    new = old + ell
    cfg = PolicyLossConfig(method="ctpo", loss_agg_mode="token-sum")  # release defaults: dual_clip_eps 0.05
    loss, grad, m = ours(
        old, new, torch.tensor([-2.0], dtype=F64), torch.ones(1, 4, dtype=torch.bool), cfg, dtype=F64
    )
    w = torch.exp(log_rho)
    expected_value = 2.0 * (w[0] + torch.exp(d[1]) + w[2] + torch.exp(d[3]))
    assert loss.item() == pytest.approx(expected_value.item())
    assert_close(grad, (2.0 * w * torch.tensor([1, 0, 1, 0], dtype=F64))[None], rtol=1e-12, atol=1e-12)
    assert m["clip/frac_dual"] == pytest.approx(0.5)
    assert m["clip/frac_low"] == 0.0 and m["clip/frac_high"] == 0.0


def test_method_defaults_follow_verl_and_the_ctpo_release():
    r = PolicyLossConfig(method="ctpo").resolved()
    assert (r.clip_mode, r.eps_low, r.eps_high, r.gamma, r.dual_clip_eps) == (
        "adaptive",
        0.025,
        0.05,
        0.5,
        0.05,
    )
    g = PolicyLossConfig(method="grpo").resolved()
    assert (g.clip_mode, g.clip_low, g.clip_high, g.dual_clip_c) == ("fixed", 0.2, 0.2, 3.0)
    s = PolicyLossConfig(method="gspo").resolved()
    assert (s.clip_low, s.clip_high, s.dual_clip_c, s.dual_clip_eps) == (3e-4, 4e-4, 0.0, 0.0)
    f = PolicyLossConfig(method="ctpo_fixed").resolved()
    assert (f.clip_mode, f.clip_low, f.clip_high) == ("fixed", g.clip_low, g.clip_high)
    # an explicit dual setting replaces the method's: ctpo with a constant dual clip
    assert PolicyLossConfig(method="ctpo", dual_clip_c=2.0).resolved().dual_clip_eps == 0.0


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_clip_mode_none_is_the_pure_is_estimator(method):
    """clip_mode="none" turns the method's default dual clip off too: one token, ratio 5, A = -1.

    Pure IS gives loss -(5 · -1) = 5; grpo's default dual clip (c = 3) would give 3, ctpo's
    position-scaled one exp(0.05) ≈ 1.05. An explicit dual clip is still honoured.
    """
    old = torch.zeros(1, 1)
    new = torch.full((1, 1), math.log(5.0))
    adv = torch.full((1,), -1.0)
    mask = torch.ones(1, 1)
    loss, _ = compute_policy_loss(old, new, adv, mask, PolicyLossConfig(method=method, clip_mode="none"))
    assert loss.item() == pytest.approx(5.0, rel=1e-6)
    cfg = PolicyLossConfig(method=method, clip_mode="none", dual_clip_c=3.0)
    assert compute_policy_loss(old, new, adv, mask, cfg)[0].item() == pytest.approx(3.0, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("clip_mode", ["adaptive", "none"])
def test_long_sequence_numerics(dtype, method, clip_mode):
    """T = 32,768 with per-token log-ratio noise std 1: the cumulative sum reaches hundreds."""
    g = torch.Generator().manual_seed(11)
    b, t = 2, 32768
    old = (-torch.rand(b, t, generator=g) * 3).to(dtype)
    new = (old.float() + torch.randn(b, t, generator=g)).to(dtype).requires_grad_(True)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 20000:] = False
    adv = torch.tensor([1.0, -1.0])
    for grad in ["current", "prefix"]:
        cfg = PolicyLossConfig(method=method, clip_mode=clip_mode, grad=grad)
        loss, metrics = compute_policy_loss(old, new, adv, mask, cfg)
        loss.backward()
        assert torch.isfinite(loss) and new.grad.dtype == dtype
        assert torch.isfinite(new.grad.float()).all()
        assert torch.all(new.grad[~mask] == 0)
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        new.grad = None


def test_non_finite_input_is_a_clear_error():
    old, new, adv, mask = make_batch()
    new = new.clone()
    new[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="inf/nan"):
        compute_policy_loss(old, new.requires_grad_(), adv, mask, PolicyLossConfig(method="grpo"))


# ---------------------------------------------------------------------------------------------
# Registry and errors
# ---------------------------------------------------------------------------------------------


def test_register_custom_method_works_through_compute_policy_loss():
    def geometric_prefix_log_ratio(log_ratio, mask):
        return log_ratio.cumsum(-1) / mask.cumsum(-1).clamp(min=1)

    name = "test_geomean"
    try:
        register_method(name, geometric_prefix_log_ratio, clip_mode="fixed", clip_low=0.1, clip_high=0.1)
        assert name in METHODS
        with pytest.raises(ValueError, match="already registered"):
            register_method(name, geometric_prefix_log_ratio)
        old, new, adv, mask = make_batch(seed=12)
        loss, grad, m = ours(old, new, adv, mask, {"method": name})
        # reference: geometric mean of the prefix ratios, fixed clip 0.1, Prop. 1 gradient
        leaf = new.detach().clone().requires_grad_(True)
        terms = []
        for i in range(mask.shape[0]):
            s, k = 0.0, 0
            for j in range(mask.shape[1]):
                if not mask[i, j]:
                    continue
                s, k = s + float(new[i, j] - old[i, j]), k + 1
                w = math.exp(s / k) * torch.exp(leaf[i, j] - leaf[i, j].detach())
                a = float(adv[i])
                terms.append(torch.maximum(-a * w, -a * torch.clamp(w, 0.9, 1.1)))
        ref = sum(terms) / mask.sum()
        ref.backward()
        assert_close(loss, ref.detach())
        assert_close(grad, leaf.grad)
        assert 0.0 <= m["clip/frac"] <= 1.0
        register_method(name, geometric_prefix_log_ratio, clip_mode="adaptive", overwrite=True)
        assert PolicyLossConfig(method=name).resolved().clip_mode == "adaptive"
    finally:
        METHODS.pop(name, None)


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        (
            lambda a: {**a, "old": a["old"][:, :-1]},
            ValueError,
            r"old_log_prob has shape .* \(batch, response_len\)",
        ),
        (lambda a: {**a, "mask": a["mask"][:-1]}, ValueError, r"response_mask has shape .* aligned"),
        (lambda a: {**a, "adv": a["adv"][:-1]}, ValueError, r"advantages has shape .*expected \(batch,\)"),
        (lambda a: {**a, "adv": a["adv"][None]}, ValueError, r"advantages has shape"),
        (
            lambda a: {**a, "new": a["new"][0], "old": a["old"][0], "mask": a["mask"][0]},
            ValueError,
            r"unsqueeze\(0\)",
        ),
        (
            lambda a: {**a, "cfg": PolicyLossConfig(method="nope")},
            ValueError,
            r"unknown method 'nope'.*register_method",
        ),
        (
            lambda a: {**a, "cfg": PolicyLossConfig(clip_mode="tight")},
            ValueError,
            r"clip_mode='tight'.*one of",
        ),
        (
            lambda a: {**a, "cfg": PolicyLossConfig(loss_agg_mode="mean")},
            ValueError,
            r"loss_agg_mode='mean'.*one of",
        ),
        (lambda a: {**a, "cfg": PolicyLossConfig(grad="all")}, ValueError, r"grad='all'"),
        (lambda a: {**a, "cfg": PolicyLossConfig(position="x")}, ValueError, r"position='x'"),
        (lambda a: {**a, "cfg": PolicyLossConfig(dual_clip_c=0.5)}, ValueError, r"dual_clip_c must be > 1"),
        (
            lambda a: {**a, "cfg": PolicyLossConfig(dual_clip_c=2.0, dual_clip_eps=0.1)},
            ValueError,
            "at most one",
        ),
        (
            lambda a: {**a, "cfg": {"method": "ctpo", "eps": 0.1}},
            ValueError,
            r"unknown PolicyLossConfig field.*eps",
        ),
        (lambda a: {**a, "gbi": {"dp": 2}}, ValueError, r"unknown global_batch_info key.*dp_size"),
        (lambda a: {**a, "new": a["new"].long()}, TypeError, "floating point"),
    ],
)
def test_bad_input_is_a_clear_error(change, error, pattern):
    old, new, adv, mask = make_batch()
    args = change({"old": old, "new": new, "adv": adv, "mask": mask, "cfg": PolicyLossConfig(), "gbi": None})
    with pytest.raises(error, match=pattern):
        compute_policy_loss(
            args["old"], args["new"], args["adv"], args["mask"], args["cfg"], global_batch_info=args["gbi"]
        )


def test_mask_and_advantage_layouts_agree():
    """bool / int64 (verl's attention-mask slice) / float masks, and (B,), (B, 1), (B, T) advantages."""
    old, new, adv, mask = make_batch(seed=15)
    cfg = PolicyLossConfig(method="ctpo")
    base = ours(old, new, adv, mask, cfg)
    for m in (mask.long(), mask.float()):
        for a in (adv[:, None], adv[:, None].expand(mask.shape).contiguous()):
            other = ours(old, new, a, m, cfg)
            assert_close(other[0], base[0], rtol=1e-6, atol=1e-7)
            assert_close(other[1], base[1], rtol=1e-6, atol=1e-7)
            assert other[2] == pytest.approx(base[2])


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 4)])
@pytest.mark.parametrize("grad", ["current", "prefix"])
def test_empty_batches_give_zero_loss(shape, grad):
    lp = torch.zeros(shape, requires_grad=True)
    mask = torch.zeros(shape, dtype=torch.bool)  # (2, 4): no policy token at all
    loss, m = compute_policy_loss(
        torch.zeros(shape), lp, torch.ones(shape[0]), mask, PolicyLossConfig(grad=grad)
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.all(lp.grad == 0)
    assert m["ratio/tokens"] == 0.0 and m["clip/frac"] == 0.0


def test_config_round_trips_through_a_dict():
    cfg = PolicyLossConfig(method="ctpo", clip_mode="adaptive", gamma=0.4, ratio_quantiles=(0.5,))
    assert PolicyLossConfig.from_dict(cfg.to_dict()) == cfg
    _, _, m = ours(*make_batch(), cfg.to_dict())
    assert "ratio/p50" in m and "ratio/p05" not in m


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


@st.composite
def batches(draw):
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) < draw(st.floats(0.3, 1.0))
    old = -torch.rand(b, t, generator=g, dtype=F64) * 3
    new = old + draw(st.floats(0.0, 1.0)) * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    return old, new, adv, mask


@settings(max_examples=30, deadline=None)
@given(
    batch=batches(),
    method=st.sampled_from(METHOD_NAMES),
    clip_mode=st.sampled_from(["fixed", "adaptive", "none"]),
    mode=st.sampled_from(LOSS_AGG_MODES),
)
def test_property_matches_reference(batch, method, clip_mode, mode):
    old, new, adv, mask = batch
    cfg = PolicyLossConfig(method=method, clip_mode=clip_mode, loss_agg_mode=mode)
    loss, grad, m = ours(old, new, adv, mask, cfg, dtype=F64)
    ref_l, ref_g = reference(old, new, adv, mask, **cfg_kwargs(cfg))
    assert_close(loss, ref_l, rtol=1e-9, atol=1e-9)
    assert_close(grad, ref_g, rtol=1e-9, atol=1e-9)
    assert torch.all(grad[~mask] == 0)
    assert 0.0 <= m["clip/frac"] <= 1.0
    assert m["clip/frac"] == pytest.approx(m["clip/frac_low"] + m["clip/frac_high"] + m["clip/frac_dual"])
    assert m["ratio/tokens"] == float(mask.sum())


@settings(max_examples=25, deadline=None)
@given(batch=batches(), method=st.sampled_from(METHOD_NAMES), junk=st.floats(-50, 50))
def test_property_values_on_masked_tokens_do_not_matter(batch, method, junk):
    old, new, adv, mask = batch
    cfg = PolicyLossConfig(method=method)
    a = ours(old, new, adv, mask, cfg, dtype=F64)
    old2, new2 = old.clone(), new.clone()
    old2[~mask], new2[~mask] = junk, -junk
    b = ours(old2, new2, adv, mask, cfg, dtype=F64)
    assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
    assert_close(a[1], b[1], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# On a GPU (deselected by default; `pytest -m gpu`)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_cuda_matches_cpu(method):
    old, new, adv, mask = make_batch(b=5, t=40, seed=13, per_token_adv=False)
    for mode in ["token-mean", "seq-mean-token-mean"]:
        cfg = PolicyLossConfig(method=method, loss_agg_mode=mode)
        cpu = ours(old.float(), new.float(), adv.float(), mask, cfg)
        gpu = ours(old.float().cuda(), new.float().cuda(), adv.float().cuda(), mask.cuda(), cfg)
        assert_close(gpu[0].cpu(), cpu[0])
        assert_close(gpu[1].cpu(), cpu[1])
        for k, v in cpu[2].items():
            assert gpu[2][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    g = torch.Generator().manual_seed(14)
    t = 32768
    old = (-torch.rand(2, t, generator=g) * 3).bfloat16().cuda()
    new = (old.float() + torch.randn(2, t, generator=g).cuda()).bfloat16().requires_grad_(True)
    loss, metrics = compute_policy_loss(
        old,
        new,
        torch.tensor([1.0, -1.0]).cuda(),
        torch.ones(2, t, dtype=torch.bool).cuda(),
        PolicyLossConfig(method=method),
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(new.grad.float()).all()
    assert all(math.isfinite(v) for v in metrics.values())


# ---------------------------------------------------------------------------------------------
# The fused pass against ctpo.losses' own readable implementation, for every registered method
# ---------------------------------------------------------------------------------------------


def _off_policy_batch(dtype, per_token_adv, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t = 7, 48
    old = -torch.rand(b, t, generator=g, dtype=F64) * 3
    new = old + 0.15 * torch.randn(b, t, generator=g, dtype=F64)
    new[0, 3] += 25.0  # beyond max_log_weight: the guard
    adv = torch.randn(b, t if per_token_adv else 1, generator=g, dtype=F64).squeeze(-1)
    adv[1] = 0.0  # a zero advantage: no gradient, no clip counted
    mask = torch.ones(b, t, dtype=torch.bool)
    for i in range(b):
        mask[i, t - 5 * i :] = False
        mask[i, 8 + i : 12 + i] = False
    mask[-1] = False  # an empty row
    return old.to(dtype), new.to(dtype), adv.to(dtype), mask


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(
    "options",
    [
        {"clip_mode": "fixed"},
        {"clip_mode": "adaptive", "gamma": 0.7},
        {"clip_mode": "none"},
        {"dual_clip_c": 2.0, "loss_agg_mode": "seq-mean-token-mean"},
        {"dual_clip_eps": 0.05, "clip_mode": "adaptive", "loss_agg_mode": "seq-mean-token-sum-norm"},
        {"position": "absolute", "loss_agg_mode": "token-sum"},
    ],
)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_fused_pass_equals_the_readable_reference(method, options, per_token_adv):
    """Value, gradient and every metric of compute_policy_loss equal reference_policy_loss (float64)."""
    old, new, adv, mask = _off_policy_batch(F64, per_token_adv)
    cfg = PolicyLossConfig(method=method, **options)
    gbi = {"dp_size": 2, "batch_num_tokens": 150.0} if options.get("loss_agg_mode") is None else None
    results = []
    for fn in (compute_policy_loss, reference_policy_loss):
        log_prob = new.clone().requires_grad_(True)
        loss, metrics = fn(old, log_prob, adv, mask, cfg, global_batch_info=gbi)
        loss.backward()
        results.append((loss.detach(), log_prob.grad, metrics))
    (fused, fused_grad, fused_m), (ref, ref_grad, ref_m) = results
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert list(fused_m) == list(ref_m)
    assert fused_m == pytest.approx(ref_m, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fused_pass_equals_the_reference_in_float32_and_bfloat16(method):
    for dtype in (torch.float32, torch.bfloat16):
        old, new, adv, mask = _off_policy_batch(dtype, per_token_adv=False, seed=1)
        grads, losses = [], []
        for fn in (compute_policy_loss, reference_policy_loss):
            log_prob = new.clone().requires_grad_(True)
            loss, _ = fn(old, log_prob, adv, mask, PolicyLossConfig(method=method))
            loss.backward()
            losses.append(loss.detach())
            grads.append(log_prob.grad.float())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
