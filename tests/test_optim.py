"""Lion and Sophia-G against hand-written references of their update rules (numpy, float64)."""
import io
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from optim_lion import Lion  # noqa: E402
from optim_sophia import SophiaG, gnb_hessian_step, sample_labels  # noqa: E402


def _gnb(opt, logits_fn, generator=None, clip=1.0):
    """The estimate on one batch of logits: mean CE against labels sampled from them."""
    def backward():
        logits = logits_fn()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), sample_labels(logits, generator))
        loss.backward()
        return loss.item()
    return gnb_hessian_step(opt, backward, clip)



def _tensors(seed, shapes, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(s, generator=g, dtype=dtype) for s in shapes]


SHAPES = [(4, 3), (5,), (2, 3, 2)]


# ----- Lion -----------------------------------------------------------------------------------------

def lion_reference(p, grads, lr, b1, b2, wd, rms_scale=False):
    """The paper's algorithm box in numpy: decay, interpolate, sign step, momentum update."""
    p, m = p.copy(), np.zeros_like(p)
    for g in grads:
        step = lr * max(1e-3, np.sqrt(np.mean(p ** 2))) if rms_scale else lr
        p = p * (1 - lr * wd)
        c = b1 * m + (1 - b1) * g
        p = p - step * np.sign(c)
        m = b2 * m + (1 - b2) * g
    return p, m


def _run(opt, params, grad_seq, **step_kw):
    for grads in grad_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step(**step_kw)


@pytest.mark.parametrize("n_steps", [1, 5])
@pytest.mark.parametrize("foreach", [False, True])
def test_lion_matches_reference(n_steps, foreach):
    params = [p.requires_grad_() for p in _tensors(0, SHAPES)]
    start = [p.detach().numpy().copy() for p in params]
    grad_seq = [_tensors(100 + i, SHAPES) for i in range(n_steps)]
    opt = Lion(params, lr=0.03, betas=(0.8, 0.95), weight_decay=0.5, foreach=foreach)
    _run(opt, params, grad_seq)
    for i, p in enumerate(params):
        want_p, want_m = lion_reference(start[i], [gs[i].numpy() for gs in grad_seq], 0.03, 0.8, 0.95, 0.5)
        np.testing.assert_allclose(p.detach().numpy(), want_p, rtol=0, atol=1e-12)
        np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), want_m, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rms_scale", [False, True])
def test_lion_foreach_equals_per_tensor_exactly(rms_scale):
    grad_seq = [_tensors(200 + i, SHAPES, torch.float32) for i in range(6)]
    results = []
    for foreach in (False, True):
        params = [p.requires_grad_() for p in _tensors(1, SHAPES, torch.float32)]
        opt = Lion(params, lr=1e-2, weight_decay=0.3, rms_scale=rms_scale, foreach=foreach)
        _run(opt, params, grad_seq)
        results.append([(p.detach(), opt.state[p]["exp_avg"]) for p in params])
    for (p0, m0), (p1, m1) in zip(*results):
        assert torch.equal(p0, p1) and torch.equal(m0, m1)


def test_lion_weight_decay_applies_to_pre_step_weights():
    # lr*wd large enough that decaying before or after the sign step differ by lr*lr*wd = 0.01.
    lr, wd = 0.1, 1.0
    p = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.3, 0.7, -0.2], dtype=torch.float64)
    p.grad = g.clone()
    Lion([p], lr=lr, betas=(0.9, 0.99), weight_decay=wd).step()
    p0, s = np.array([1.0, -2.0, 0.5]), np.sign(g.numpy())
    decay_first = p0 * (1 - lr * wd) - lr * s
    decay_after = (p0 - lr * s) * (1 - lr * wd)
    np.testing.assert_allclose(p.detach().numpy(), decay_first, rtol=0, atol=1e-12)
    assert np.abs(p.detach().numpy() - decay_after).min() > 1e-3


@pytest.mark.parametrize("foreach", [False, True])
def test_lion_rms_scale_formula(foreach):
    # One tensor with rms ~ 2 and one with rms below the 1e-3 floor.
    params = [p.requires_grad_() for p in (_tensors(2, [(6,)], scale=2.0) + _tensors(3, [(4,)], scale=1e-5))]
    start = [p.detach().numpy().copy() for p in params]
    grad_seq = [_tensors(300 + i, [(6,), (4,)]) for i in range(3)]
    opt = Lion(params, lr=0.05, weight_decay=0.1, rms_scale=True, foreach=foreach)
    _run(opt, params, grad_seq)
    for i, p in enumerate(params):
        grads = [gs[i].numpy() for gs in grad_seq]
        want_p, _ = lion_reference(start[i], grads, 0.05, 0.9, 0.99, 0.1, rms_scale=True)
        np.testing.assert_allclose(p.detach().numpy(), want_p, rtol=0, atol=1e-12)
    # The floor matters for the tiny tensor: a step of lr*1e-3 per coordinate, not lr*rms.
    assert np.sqrt(np.mean(start[1] ** 2)) < 1e-3


def test_lion_sparse_grad_matches_dense():
    torch.manual_seed(0)
    sparse, dense = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Embedding(10, 3)
    dense.load_state_dict(sparse.state_dict())
    idx = torch.tensor([1, 4, 4, 7])
    for emb in (sparse, dense):
        opt = Lion(emb.parameters(), lr=0.01)  # foreach=None: sparse falls back to the per-tensor path
        for _ in range(3):
            emb(idx).pow(2).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=0, atol=1e-7)


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1e-3), "lr"), (dict(betas=(1.0, 0.99)), "betas[0]"),
    (dict(betas=(0.9, -0.1)), "betas[1]"), (dict(weight_decay=-0.1), "weight_decay"),
])
def test_lion_bad_args(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[")):
        Lion([torch.zeros(2, requires_grad=True)], **kwargs)


# ----- Sophia-G -------------------------------------------------------------------------------------

def sophia_reference(p, events, lr, b1, b2, rho, wd, bs):
    """events: ('step', g) or ('hess', g_hat). Returns p, m, h after all of them."""
    p, m, h = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for kind, g in events:
        if kind == "hess":
            h = b2 * h + (1 - b2) * g * g
            continue
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        ratio = np.minimum(np.abs(m) / (rho * bs * h + 1e-15), 1.0)
        p = p - lr * np.sign(m) * ratio
    return p, m, h


def _sophia_events(opt, params, events):
    for kind, grads in events:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if kind == "hess":
            opt.update_hessian()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)


def test_sophia_zero_hessian_is_sign_step():
    lr, wd = 0.02, 0.1
    params = [p.requires_grad_() for p in _tensors(4, SHAPES)]
    start = [p.detach().clone() for p in params]
    grads = _tensors(400, SHAPES)
    opt = SophiaG(params, lr=lr, weight_decay=wd, bs=1024)
    _sophia_events(opt, params, [("step", grads)])
    for p, p0, g in zip(params, start, grads):
        torch.testing.assert_close(p.detach(), p0 * (1 - lr * wd) - lr * torch.sign(g), rtol=0, atol=1e-12)
    assert opt.win_rate == 0.0  # every coordinate clipped at ratio 1


def test_sophia_matches_reference_with_hessian():
    lr, b1, b2, rho, wd, bs = 0.01, 0.9, 0.8, 0.05, 0.2, 64
    params = [p.requires_grad_() for p in _tensors(5, SHAPES)]
    start = [p.detach().numpy().copy() for p in params]
    kinds = ["hess", "step", "step", "hess", "step", "step", "hess", "step"]
    events = [(k, _tensors(500 + i, SHAPES, scale=0.3 if k == "step" else 0.1)) for i, k in enumerate(kinds)]
    opt = SophiaG(params, lr=lr, betas=(b1, b2), rho=rho, weight_decay=wd, bs=bs)
    _sophia_events(opt, params, events)
    for i, p in enumerate(params):
        ev = [(k, gs[i].numpy()) for k, gs in events]
        want_p, want_m, want_h = sophia_reference(start[i], ev, lr, b1, b2, rho, wd, bs)
        np.testing.assert_allclose(opt.state[p]["hessian"].numpy(), want_h, rtol=1e-12, atol=0)
        np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), want_m, rtol=1e-12, atol=0)
        np.testing.assert_allclose(p.detach().numpy(), want_p, rtol=0, atol=1e-10)
    # The case must exercise both branches of the clip, or it would not test the ratio.
    assert 0.0 < opt.win_rate < 1.0


def test_sophia_update_hessian_ema():
    b2 = 0.7
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = SophiaG([p], betas=(0.9, b2), bs=1)
    g1 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g2 = torch.tensor([3.0, 0.0, -1.0], dtype=torch.float64)
    for g in (g1, g2):
        p.grad = g
        opt.update_hessian()
    want = b2 * (1 - b2) * np.array([1.0, 4.0, 0.25]) + (1 - b2) * np.array([9.0, 0.0, 1.0])
    np.testing.assert_allclose(opt.state[p]["hessian"].numpy(), want, rtol=1e-14)
    assert torch.equal(p.detach(), torch.zeros(3, dtype=torch.float64))  # no weight change


def test_sophia_win_rate_hand_computed():
    # b1 = b2 = 0: m = g and h = g_hat**2 exactly; rho = bs = 1, so ratio = |m| / h.
    a = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    c = torch.zeros(5, dtype=torch.float64, requires_grad=True)  # no grad: must not count
    opt = SophiaG([a, b, c], lr=0.1, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0, bs=1)
    a.grad, b.grad = torch.tensor([2.0, 0.5, 1.0, 2.0]).double(), torch.tensor([1.0, 1.0]).double()
    opt.update_hessian()  # h_a = [4, .25, 1, 4], h_b = [1, 1]
    a.grad, b.grad = torch.tensor([1.0, -1.0, 0.5, 2.0]).double(), torch.tensor([3.0, -0.1]).double()
    opt.step()
    # ratios: a -> [.25, 4, .5, .5], b -> [3, .1]; below 1 (not clipped): 3 + 1 of 6 coordinates.
    assert opt.win_rate == pytest.approx(4 / 6, abs=1e-12)
    np.testing.assert_allclose(a.detach().numpy(), -0.1 * np.array([0.25, -1.0, 0.5, 0.5]), atol=1e-12)
    assert c.grad is None and c not in opt.state


def test_sophia_win_rate_counts_m_and_h_zero_as_clipped():
    # The authors count |m| >= rho*bs*h as clipped: where m = h = 0 (a zero gradient, no estimate yet)
    # the coordinate is clipped, not a "win". Before, 0 / 1e-15 < 1 counted it as not clipped.
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = SophiaG([p], lr=0.1, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0, bs=1)
    p.grad = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    opt.update_hessian()  # h = 1 everywhere
    p.grad = torch.tensor([0.5, 0.0, 2.0, 0.5], dtype=torch.float64)
    opt.step()  # |m| < h on coordinates 0 and 3; coordinate 1 has m = 0 < h: not clipped either
    assert opt.win_rate == pytest.approx(3 / 4)
    q = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = SophiaG([q], lr=0.1, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0, bs=1)
    q.grad = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    opt.step()  # h = 0: every coordinate is clipped, the two with m = 0 included
    assert opt.win_rate == 0.0


def test_sophia_bad_args():
    with pytest.raises(ValueError, match="rho"):
        SophiaG([torch.zeros(2, requires_grad=True)], rho=-1.0, bs=1)
    with pytest.raises(ValueError, match="bs"):
        SophiaG([torch.zeros(2, requires_grad=True)], bs=0)
    with pytest.raises(TypeError, match="bs"):
        SophiaG([torch.zeros(2, requires_grad=True)])  # required: the authors' silent default is wrong


# ----- Gauss-Newton-Bartlett estimator --------------------------------------------------------------

V = 5


def _one_hot_model():
    # logits = x @ W.T = 100 * one_hot(perm[token]): softmax is one-hot to ~1e-44.
    perm = torch.tensor([2, 0, 4, 1, 3])
    W = (100.0 * torch.eye(V, dtype=torch.float64)[perm].T).contiguous().requires_grad_()
    tokens = torch.tensor([[0, 1, 2, 3, 4, 0], [3, 3, 1, 4, 2, 2]])  # (B, T)
    x = F.one_hot(tokens, V).double()  # (B, T, V)
    return W, x, perm[tokens]


def test_sample_labels_one_hot_is_argmax():
    W, x, argmax = _one_hot_model()
    logits = x @ W.T  # (B, T, V)
    assert torch.equal(logits.argmax(-1), argmax)
    labels = sample_labels(logits, torch.Generator().manual_seed(0))
    assert torch.equal(labels, argmax.reshape(-1))


def test_gnb_changes_only_hessian():
    W, x, _ = _one_hot_model()
    opt = SophiaG([W], lr=1e-3, bs=12)
    W.grad = torch.full_like(W, 0.01)
    opt.update_hessian()
    opt.step()  # nonzero m and h, so "unchanged" below means something
    opt.zero_grad(set_to_none=True)
    W0, m0, h0 = W.detach().clone(), opt.state[W]["exp_avg"].clone(), opt.state[W]["hessian"].clone()
    loss = _gnb(opt, lambda: x @ W.T, generator=torch.Generator().manual_seed(0))
    assert loss < 1e-40  # every sampled label was the argmax; one miss would cost ~100/12
    assert torch.equal(W.detach(), W0) and torch.equal(opt.state[W]["exp_avg"], m0)
    assert not torch.equal(opt.state[W]["hessian"], h0)
    assert W.grad is None


def test_gnb_matches_reference():
    b2, clip = 0.9, 0.05
    W = torch.randn(V, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64).requires_grad_()
    x = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    opt = SophiaG([W], betas=(0.9, b2), bs=1)
    W.grad = torch.ones_like(W)  # stale grad: must be discarded, not added to the estimator's
    loss = _gnb(opt, lambda: x @ W.T, generator=torch.Generator().manual_seed(8), clip=clip)

    W_ref = W.detach().clone().requires_grad_()
    logits = (x @ W_ref.T).reshape(-1, V)
    probs = logits.detach().softmax(-1)
    y_hat = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(8)).squeeze(-1)
    want_loss = F.cross_entropy(logits, y_hat)
    (g,) = torch.autograd.grad(want_loss, W_ref)
    assert g.norm() > clip  # so the clip is exercised
    g = g * clip / (g.norm() + 1e-6)  # clip_grad_norm_'s coefficient
    assert loss == pytest.approx(want_loss.item(), rel=1e-12)
    torch.testing.assert_close(opt.state[W]["hessian"], (1 - b2) * g * g, rtol=1e-10, atol=0)
    assert not opt.state[W]["exp_avg"].any()


# ----- both: checkpoint round-trip and a small problem ----------------------------------------------

def _make(kind, params):
    if kind == "lion":
        groups = [dict(params=params[:2], weight_decay=0.1), dict(params=params[2:], rms_scale=True)]
        return Lion(groups, lr=1e-2)
    return SophiaG([dict(params=params[:2]), dict(params=params[2:], rho=0.1)], lr=1e-2, bs=256)


def _train(kind, opt, params, start, n):
    for i in range(start, start + n):
        for p, g in zip(params, _tensors(600 + i, SHAPES, torch.float32)):
            p.grad = g
        if kind == "lion":
            opt.step()
        else:
            opt.step()
            if i % 3 == 2:  # the Hessian hook, as the loop calls it: after the step
                for p, g in zip(params, _tensors(700 + i, SHAPES, torch.float32, scale=0.1)):
                    p.grad = g
                opt.update_hessian()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["lion", "sophia"])
def test_state_dict_round_trip_is_bit_identical(kind):
    params = [p.requires_grad_() for p in _tensors(9, SHAPES, torch.float32)]
    opt = _make(kind, params)
    _train(kind, opt, params, 0, 5)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = [p.clone().requires_grad_() for p in ckpt["params"]]
    opt2 = _make(kind, resumed)
    opt2.load_state_dict(ckpt["optimizer"])
    _train(kind, opt, params, 5, 6)  # the uninterrupted run
    _train(kind, opt2, resumed, 5, 6)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], opt2.state[q][key])


def _softmax_problem():
    g = torch.Generator().manual_seed(10)
    X = torch.randn(256, 8, generator=g)
    y = (X @ torch.randn(8, 4, generator=g)).argmax(-1)
    W = torch.zeros(8, 4, requires_grad=True)
    return X, y, W, lambda: F.cross_entropy(X @ W, y)


def test_lion_lowers_loss():
    X, y, W, loss_fn = _softmax_problem()
    opt = Lion([W], lr=0.02)
    first = loss_fn().item()
    for _ in range(50):
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss_fn().item() < 0.5 * first


def test_sophia_lowers_loss():
    X, y, W, loss_fn = _softmax_problem()
    opt = SophiaG([W], lr=0.02, weight_decay=0.0, bs=len(X))
    gen = torch.Generator().manual_seed(11)
    first = loss_fn().item()
    for it in range(50):
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % 10 == 9:
            fresh = X[torch.randperm(len(X), generator=gen)[:64]]
            _gnb(opt, lambda: fresh @ W, generator=gen)
    assert loss_fn().item() < 0.5 * first
    assert opt.win_rate is not None


def test_sophia_win_rate_stays_the_last_steps_after_update_hessian():
    # Counted lazily from m and h, but before update_hessian moves h on: still the step's 3 of 4.
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = SophiaG([p], lr=0.1, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0, bs=1)
    p.grad = torch.ones(4, dtype=torch.float64)
    opt.update_hessian()
    p.grad = torch.tensor([0.5, 0.0, 2.0, 0.5], dtype=torch.float64)
    opt.step()
    p.grad = torch.full((4,), 1e-3, dtype=torch.float64)
    opt.update_hessian()  # h = 1e-6: counted now, every coordinate would be clipped
    assert opt.win_rate == pytest.approx(3 / 4)


def test_sampled_label_loss_is_one_pass_with_the_mean_loss_gradient(monkeypatch):
    """The estimate's loss: one forward (labels drawn from each chunk's logits as they are computed),
    the mean cross entropy over the targets >= 0, and its gradient, as F.cross_entropy gives them."""
    import optim_sophia
    from model import GPT, GPTConfig
    monkeypatch.setattr(optim_sophia, "sample_labels", lambda logits, generator=None: logits.argmax(-1))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=29, n_layer=1, n_head=2, n_embd=16, compile_loss=False))
    x = torch.randint(0, 29, (3, 8), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    y[:, -1] = -1
    passes, hidden = [], model.hidden
    monkeypatch.setattr(model, "hidden", lambda *a: passes.append(1) or hidden(*a))
    loss = optim_sophia.sampled_label_loss(model, (x,), y)
    got = torch.autograd.grad(loss, list(model.parameters()))
    assert len(passes) == 1
    logits = hidden(x) @ model.lm_head.weight.t()
    labels = torch.where(y >= 0, logits.argmax(-1), -1)
    want_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-1)
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=0)
    for g, w in zip(got, torch.autograd.grad(want_loss, list(model.parameters()))):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
