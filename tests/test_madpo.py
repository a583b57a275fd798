"""madpo.py, reward_model.py, data/reviews/pairs.py and the study (studies/madpo.py, studies/madpo_report.py):
the losses against hand computations and the issue's check values, the masks, the reward model's read
position, the reference-log-prob cache, the sampler on model.generate's KV cache, the config's stage
scoping, when the study reuses a stage, a stage stopped by a signal, a folder in use, and a --quick end-to-end run of
the study."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import madpo  # noqa: E402
import reward_model  # noqa: E402
import runs  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from configurator import ConfigError, UserError, cli, parse  # noqa: E402
from data.reviews import pairs as task  # noqa: E402
from data.loader import DataError, file_sha256  # noqa: E402
from data.reviews.pairs import EOS, PAD  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from studies import madpo as study  # noqa: E402
from studies import madpo_report as report  # noqa: E402


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def tiny_gpt(seed=0, block_size=32):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=256, n_layer=2, n_head=2, n_embd=32, block_size=block_size, compile_loss=False))
    return model.eval()


def ctx_for(tmp_path):
    """The part of train.RunContext the objectives read outside the loop."""
    return SimpleNamespace(device=torch.device('cpu'), out_dir=tmp_path, rt=SimpleNamespace(print=print), step=0)


# ----- the losses -------------------------------------------------------------------------------------

def test_dpo_loss_check_values():
    h = torch.tensor([2.0, 0.0, -3.0])
    got = madpo.dpo_loss(h, 0.1)
    assert got[0].item() == pytest.approx(0.598139, abs=1e-6)
    assert got[1].item() == pytest.approx(math.log(2), abs=1e-7)
    assert got[2].item() == pytest.approx(math.log(1 + math.exp(0.3)), abs=1e-6)


def test_cdpo_by_hand_and_eps_0_is_dpo():
    """-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h) at beta 0.1, eps 0.1, h 2:
    0.9 log(1 + e^-0.2) + 0.1 log(1 + e^0.2) = 0.598139 + 0.1 * 0.2."""
    h = torch.tensor([2.0, 0.0, -3.0], dtype=torch.float64)
    got = madpo.cdpo_loss(h, 0.1, 0.1)
    assert got[0].item() == pytest.approx(0.9 * math.log(1 + math.exp(-0.2)) + 0.1 * math.log(1 + math.exp(0.2)), abs=1e-12)
    assert got[0].item() == pytest.approx(0.618139, abs=1e-6)
    assert got[1].item() == pytest.approx(math.log(2), abs=1e-12)          # h = 0: both terms log 2
    assert got[2].item() == pytest.approx(0.9 * math.log(1 + math.exp(0.3)) + 0.1 * math.log(1 + math.exp(-0.3)), abs=1e-12)
    assert torch.equal(madpo.cdpo_loss(h, 0.1, 0.0), madpo.dpo_loss(h, 0.1))
    with pytest.raises(ConfigError, match='label_smoothing'):
        madpo.MadpoConfig(label_smoothing=0.5)


def test_ipo_summed_and_per_token_averaged():
    assert madpo.ipo_loss(torch.tensor(2.0), 0.1).item() == pytest.approx(9.0)
    logps, ref, lens = torch.tensor([[-10.0, -20.0]]), torch.tensor([[-12.0, -18.0]]), torch.tensor([[5, 4]])
    assert madpo.implicit_margin(logps, ref).item() == pytest.approx(4.0)            # 2 - (-2)
    h_avg = madpo.implicit_margin(logps, ref, lens)
    assert h_avg.item() == pytest.approx(2 / 5 + 2 / 4)                             # 0.4 - (-0.5)
    assert madpo.ipo_loss(h_avg, 0.1).item() == pytest.approx((0.9 - 5) ** 2, rel=1e-6)


def test_bdpo_beta_and_loss_by_hand():
    """keep=1 makes the draw deterministic: every running statistic and beta follow by hand."""
    h = torch.tensor([1.0, 2.0, 4.0, -1.0])
    bd = madpo.BetaDPO(0.1, alpha=0.6, keep=1.0, momentum=0.9)
    bd.mean, bd.std = 0.5, 2.0
    loss, beta, kept = bd(h)
    mean = 0.9 * 0.5 + 0.1 * 1.5
    std = 0.9 * 2.0 + 0.1 * math.sqrt(sum((x - 1.5) ** 2 for x in (1, 2, 4, -1)) / 3)  # unbiased, as torch.std
    assert (bd.mean, bd.std) == (pytest.approx(mean), pytest.approx(std))
    want_beta = 0.1 * (1 + 0.6 * (1.5 - mean))
    assert beta == pytest.approx(want_beta)
    want = sum(math.log(1 + math.exp(-want_beta * x)) for x in (1, 2, 4, -1)) / 4
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert sorted(kept.tolist()) == [0, 1, 2, 3]


def test_bdpo_keeps_80_percent_around_the_running_mean():
    g = torch.Generator().manual_seed(0)
    for seed in range(20):
        bd = madpo.BetaDPO(0.1)
        bd.mean, bd.std = 0.0, 1.0
        h = torch.cat([torch.randn(9, generator=g) * 0.3, torch.tensor([50.0])])  # one far outlier
        loss, beta, kept = bd(h, generator=torch.Generator().manual_seed(seed))
        assert len(kept) == 8 and len(set(kept.tolist())) == 8                     # 80% of 10, no repeats
        assert 9 not in kept.tolist()                                              # Gaussian weight ~ 0
        assert torch.isfinite(loss)


def test_bdpo_beta_never_below_floor():
    bd = madpo.BetaDPO(0.1)
    bd.mean, bd.std = 10.0, 1.0           # running mean far above this batch: the formula goes negative
    h = torch.zeros(10, requires_grad=True)
    loss, beta, _ = bd(h)
    assert 0.1 * (1 + 0.6 * (0.0 - 9.0)) < 0 and beta == 1e-3
    loss.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    bd = madpo.BetaDPO(0.1)               # the first step: policy == reference, every margin 0, std 0
    loss, beta, kept = bd(torch.zeros(16))
    assert beta == pytest.approx(0.1) and len(kept) == 12 and loss.item() == pytest.approx(math.log(2))


def test_madpo_check_values_cmax_2():
    m = torch.tensor([0.0, 1.0, -1.0, -10.0])
    w = madpo.madpo_weight(m, c_max=2.0)
    assert w.tolist() == pytest.approx([1.0, 1.2037, 0.4464, 1.0], abs=1e-4)
    loss = madpo.madpo_loss(torch.tensor([2.0]), madpo.madpo_weight(torch.tensor([1.0]), c_max=2.0), 0.1)
    assert loss.item() == pytest.approx(0.719953, abs=1e-6)


def madpo_weight_by_hand(m, c_max, lam=1.0, tau=math.log(999)):
    c_min = 1 / c_max
    K = (c_max - 1) / (1 - c_min)
    if m <= -tau:
        return 1.0
    c = c_min + (c_max - c_min) / (1 + K * math.exp(lam * (abs(m) - tau)))
    return sigmoid(c * m) / sigmoid(m)


@pytest.mark.parametrize('c_max', [1.5, 2.0, 4.0, 10.0])
def test_madpo_c_of_tau_is_one_and_w_is_continuous(c_max):
    tau = math.log(999)
    assert madpo.madpo_c(torch.tensor(tau, dtype=torch.float64), c_max).item() == pytest.approx(1.0, abs=1e-12)
    m = torch.tensor([-tau - 1e-6, -tau + 1e-6], dtype=torch.float64)
    w = madpo.madpo_weight(m, c_max)
    assert w.tolist() == pytest.approx([1.0, 1.0], abs=1e-5)                 # both sides of -tau meet at 1
    grid = [-8, -3, -1, -0.2, 0.3, 0.58, 2, 6.5, 12]
    got = madpo.madpo_weight(torch.tensor(grid, dtype=torch.float64), c_max).tolist()
    assert got == pytest.approx([madpo_weight_by_hand(x, c_max) for x in grid], rel=1e-9)


def test_tau_at_the_median_margin_makes_both_branches_of_w_act():
    """Margins bounded by 6 (the task's oracle): at the paper's tau = ln 999 no agreeing pair is damped; at tau =
    the median |m| (2 here, torch.quantile's linear rule on 0.5 0.5 1 2 2 3 4 6) the easy pairs (m > tau) are
    damped, the hard ones (0 < m < tau) amplified, m = tau kept, and -tau is where w returns to 1."""
    m = torch.tensor([-2.0, -0.5, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    paper = madpo.madpo_weight(m, 4.0)
    assert (paper[m >= 0] >= 1).all()
    tau = madpo.margin_tau(m, math.log(999), 0.5)
    assert tau == pytest.approx(2.0)
    assert madpo.margin_tau(m, 3.0, 0.0) == 3.0                              # no quantile: --tau as given
    w = madpo.madpo_weight(m, 4.0, tau=tau)
    assert w.tolist() == pytest.approx([madpo_weight_by_hand(x, 4.0, tau=2.0) for x in m.tolist()], rel=1e-9)
    assert (w[5:] < 1).all() and (w[2:4] > 1).all() and w[4].item() == pytest.approx(1.0)
    assert w[0].item() == 1.0 and w[1].item() < 1                           # -tau: back to 1; inside: damped
    summary = madpo.weight_summary(w, tau)
    assert (summary['tau'], summary['frac_damped'], summary['frac_amplified']) == (tau, 4 / 8, 2 / 8)
    assert sum(summary['histogram_0_to_2_by_0.2']) == 8


def test_the_po_stage_records_its_tau_and_weights(tmp_path):
    """--tau_quantile sets tau from the margins the run uses (here the oracle's) and names the arm; the
    weights file says what the weights did."""
    obj = preference_objective(tmp_path, loss='madpo', margins='oracle', tau_quantile=0.5)
    m = madpo.oracle_margins(obj.train_set[2])
    assert obj.tau == pytest.approx(m.abs().double().median().item() if len(m) % 2 else
                                    torch.quantile(m.abs().double(), 0.5).item())
    assert torch.allclose(obj.weights, madpo.madpo_weight(m, 4.0, tau=obj.tau))
    saved = json.loads((tmp_path / 'madpo_weights.json').read_text())
    assert saved['tau'] == pytest.approx(obj.tau) and saved['frac_damped'] == pytest.approx((obj.weights < 1).float().mean().item())
    assert madpo.method_name(obj.cfg) == 'madpo4_oracle_tq0.5'


def test_madpo_defaults_and_detached_weights():
    assert madpo.madpo_c(torch.tensor(0.0)).item() == pytest.approx(0.25 + 3.75 / (1 + 4 / 999), rel=1e-6)  # 3.985
    w_peak = madpo.madpo_weight(torch.linspace(0, 3, 3001)).max().item()
    assert w_peak == pytest.approx(1.42, abs=0.01)
    h = torch.tensor([2.0, -1.0], requires_grad=True)
    m = torch.tensor([1.0, -2.0], requires_grad=True)
    w = madpo.madpo_weight(m)
    madpo.madpo_loss(h, w, 0.1).backward()
    assert m.grad is None                                                      # w carries no gradient
    want = [-0.1 * wi * sigmoid(-0.1 * hi) / 2 for wi, hi in zip(w.tolist(), (2.0, -1.0))]
    assert h.grad.tolist() == pytest.approx(want, rel=1e-5)


# ----- the study: ceilings, margin sources, arms, matched KL ----------------------------------------

def test_bt_ceiling_by_hand_and_no_predictor_beats_it():
    """Pairs with r_w - r_l = 0, ln 3, -ln 3, 3: the best predictor (the higher true reward wins) is right
    with probability 1/2, 3/4, 3/4, sigmoid(3) against Bradley-Terry draws."""
    r = torch.tensor([[1.0, 1.0], [math.log(3), 0.0], [0.0, math.log(3)], [2.0, -1.0]], dtype=torch.float64)
    want = (0.5 + 0.75 + 0.75 + sigmoid(3)) / 4
    assert task.bt_ceiling(r) == pytest.approx(want, abs=1e-12)
    assert task.oracle_accuracy(r) == pytest.approx((0.5 + 1 + 0 + 1) / 4)   # on these labels: pair 3 is flipped
    g = torch.Generator().manual_seed(0)
    first_wins = torch.rand(200_000, 4, generator=g, dtype=torch.float64) < torch.sigmoid(r[:, 0] - r[:, 1])
    truth = (r[:, 0] - r[:, 1]) > 0
    for guess, wins in ((truth, True), (torch.tensor([True, True, True, False]), False), (torch.ones(4, dtype=torch.bool), False)):
        acc = (first_wins == guess).double().mean().item()                     # pair 0's guess is a coin flip either way
        assert acc == pytest.approx(want, abs=2e-3) if wins else acc < want - 0.02


def test_expected_accuracy_by_hand_and_the_oracle_reaches_the_ceiling():
    """Margins right on pair 1, wrong on pair 2 (expected sigmoid(-ln 3) = 1/4), either way on the tie,
    zero on pair 4 (a coin flip): the mean over fresh label draws; the true margins reach bt_ceiling."""
    r = torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)], [1.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    m = torch.tensor([0.2, 5.0, -1.0, 0.0], dtype=torch.float64)
    assert task.expected_accuracy(m, r) == pytest.approx((0.75 + 0.25 + 0.5 + 0.5) / 4, abs=1e-12)
    assert task.expected_accuracy(r[:, 0] - r[:, 1], r) == pytest.approx(task.bt_ceiling(r), abs=1e-12)
    g = torch.Generator().manual_seed(0)
    first_wins = torch.rand(200_000, 4, generator=g, dtype=torch.float64) < torch.sigmoid(r[:, 0] - r[:, 1])
    acc = ((first_wins == (m > 0)).double()[:, :3].sum(1) + 0.5).mean().item() / 4  # pair 4 scores 1/2 by convention
    assert task.expected_accuracy(m, r) == pytest.approx(acc, abs=2e-3)


def test_oracle_margins_noise_scale_and_seed():
    r = torch.randn(40_000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    oracle = r[:, 0] - r[:, 1]
    assert torch.equal(madpo.oracle_margins(r), oracle)
    noisy = madpo.oracle_margins(r, noise=0.5, seed=3)
    assert (noisy - oracle).std().item() == pytest.approx(0.5, rel=0.02)
    assert abs((noisy - oracle).mean().item()) < 0.01
    assert torch.equal(noisy, madpo.oracle_margins(r, noise=0.5, seed=3))    # the same seed, the same noise
    assert not torch.allclose(noisy, madpo.oracle_margins(r, noise=0.5, seed=4))
    assert torch.allclose(madpo.oracle_margins(r, noise=2.0, seed=3) - oracle, 4 * (noisy - oracle))  # scale only


def test_arms_are_named_by_their_keys():
    cfg = madpo.MadpoConfig(margins='noisy', c_max=3.0, ipo_average=True)    # the arm's keys win
    for arm in study.ARMS:
        c = replace(cfg, **study.arm_keys(arm))
        assert madpo.method_name(c) == arm
        assert madpo.folder(replace(c, beta=0.03), 'po') == Path(f'out/madpo/seed0/po_{arm}_b0.03_high')
        run = study.stage_run(study.MadpoStudyConfig(), 'po', seed=0, tier='high', beta=0.03, **study.arm_keys(arm))
        assert run.out_dir == Path(f'out/madpo/seed0/po_{arm}_b0.03_high').resolve()


def reference_arm_loss(arm, obj, h, h_avg, idx, bdpo):
    """Each arm's loss from the formulas, on its own (SPEC section 6)."""
    beta = obj.cfg.beta
    dpo = [math.log(1 + math.exp(-beta * x)) for x in h.tolist()]
    if arm == 'dpo':
        return sum(dpo) / len(dpo)
    if arm == 'cdpo':
        return sum(0.9 * d + 0.1 * math.log(1 + math.exp(beta * x)) for d, x in zip(dpo, h.tolist())) / len(dpo)
    if arm in ('ipo', 'ipo_avg'):
        return sum((x - 1 / (2 * beta)) ** 2 for x in (h_avg if arm == 'ipo_avg' else h).tolist()) / len(h)
    if arm == 'bdpo':
        return bdpo(h)[0].item()
    r = obj.train_set[2][idx.cpu()].double()
    noise = torch.randn(len(obj.train_set[2]), generator=torch.Generator().manual_seed(0), dtype=torch.float64)[idx.cpu()]
    m = r[:, 0] - r[:, 1] + (1.0 if arm.endswith('noisy') else 0.0) * noise
    c_max = 2.0 if arm.startswith('madpo2') else 4.0
    w = [madpo_weight_by_hand(x, c_max) for x in m.tolist()]
    return sum(wi * d for wi, d in zip(w, dpo)) / len(dpo)


@pytest.mark.parametrize('arm', ['dpo', 'cdpo', 'ipo', 'ipo_avg', 'bdpo', 'madpo2_oracle', 'madpo4_oracle', 'madpo4_noisy'])
def test_each_arm_runs_its_loss(tmp_path, arm):
    keys = study.ARMS.get(arm) or {**study.ARMS['madpo2'], 'margins': 'oracle'}
    obj = preference_objective(tmp_path, **{'beta': 0.3, **keys})
    policy = tiny_gpt(seed=9, block_size=10)
    state, bdpo = obj.state_dict(), madpo.BetaDPO(0.3)
    idx = obj.next_indices()
    obj.load_state_dict(state)
    seq, lens, ref = obj.train_set[0][idx], obj.train_set[1][idx], obj.ref_train[idx]
    with torch.no_grad():
        h = obj.margins_h(policy, seq, lens, ref).double()
        lp = torch.stack(task.sequence_logps(policy, *obj.flat(seq, lens)[:1], 4, obj.flat(seq, lens)[1]).chunk(2), 1)
        h_avg = ((lp - ref) / lens).double() @ torch.tensor([1.0, -1.0], dtype=torch.float64)
        rng = torch.Generator().manual_seed(0)
        want = reference_arm_loss(arm, obj, h, h_avg, idx, lambda x: bdpo(x, rng))
    assert obj(policy, None, ctx_for(tmp_path)).loss.item() == pytest.approx(want, rel=1e-5)


def test_ceiling_table_averages_seeds_and_skips_missing_keys(tmp_path):
    """Gaps per run, then means over the seeds; a run from before expected_acc counts only where it has the key."""
    for seed, run in enumerate([dict(ceiling=0.8, oracle_acc=0.81, acc=0.7, true_acc=0.9, expected_acc=0.75),
                                dict(ceiling=0.76, oracle_acc=0.77, acc=0.72, true_acc=0.86)]):
        (tmp_path / f'seed{seed}' / 'rm_high').mkdir(parents=True)
        (tmp_path / f'seed{seed}' / 'rm_high' / 'done.json').write_text(json.dumps(run))
    rows = {line.split(' | ')[0].strip('| '): line.split(' | ')[1] for line in report.ceiling_table(tmp_path)[3:]}
    assert rows['BT ceiling (expected)'] == '0.780 (2)' and rows['ceiling - RM acc'] == '0.070 (2)'
    assert rows['RM expected acc'] == '0.750 (1)' and rows['ceiling - RM expected acc'] == '0.050 (1)'


def test_reward_at_matched_kl_by_hand():
    """The frontier: dominated points dropped, linear between frontier points, flat after the best one,
    and 'not reached' (None) past the largest KL any point has."""
    points = [(0.0, 0.0), (1.0, 1.0), (3.0, 0.5), (4.0, 2.0), (6.0, 1.5)]
    assert report.frontier(points) == [(0.0, 0.0), (1.0, 1.0), (4.0, 2.0)]
    assert report.reward_at_kl(points, 0.5) == pytest.approx(0.5)
    assert report.reward_at_kl(points, 2.0) == pytest.approx(1 + 1 / 3)   # (3, 0.5) is beaten at less KL
    assert report.reward_at_kl(points, 5.0) == pytest.approx(2.0)         # reached (6 >= 5), the best so far
    assert report.reward_at_kl(points, 6.5) is None                       # not reached: no extrapolation
    assert report.reward_at_kl([], 1.0) is None
    assert report.matched_kl_cell([1.0, 2.0, 3.0]) == f'2.00 ± {4.302653 / math.sqrt(3):.2f} (3)'  # t(0.975, 2 df)
    assert report.matched_kl_cell([1.0, None, 3.0]) == 'not reached (2/3)'
    curves = {('dpo', 'high', s): [(0.0, 0.0), (4.0, 2.0 + s)] for s in range(3)}
    table = '\n'.join(report.matched_kl_table(curves, ['dpo', 'ipo'], (2.0, 5.0)))
    assert '| dpo | 1.50 ± ' in table and '| dpo | not reached (0/3) | - | - |' in table and 'ipo' not in table


# ----- sequences, masks, reward model, cache ------------------------------------------------------

def manual_logps(model, seq, P, lens):
    """Independent: log_softmax of the full logits, summed over continuation positions by a loop."""
    logp = F.log_softmax(model.logits(seq[:, :-1]).double(), -1)
    return [sum(logp[i, t - 1, seq[i, t]].item() for t in range(P, P + int(lens[i]))) for i in range(len(seq))]


def test_sequence_logps_count_only_the_continuation():
    model, P = tiny_gpt(), 5
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, 256, (3, 20), generator=g)
    lens = torch.tensor([4, 15, 1])
    seq[0, P + 3] = EOS
    seq[1, P + 6] = PAD                      # a 0 byte inside a continuation still counts
    seq[0, P + 4:] = PAD
    seq[2, P + 1:] = PAD
    got = task.sequence_logps(model, seq, P, lens)
    assert got.tolist() == pytest.approx(manual_logps(model, seq, P, lens), abs=1e-4)
    x, targets = task.continuation_targets(seq, P, lens)
    assert (targets[:, :P - 1] == -1).all() and (targets[0, P - 1:P + 3] == seq[0, P:P + 4]).all()
    assert (targets[0, P + 3:] == -1).all() and targets[0, P + 2] == EOS


def test_prompt_and_padding_tokens_do_not_count():
    """With every block's output projections zeroed, position t's logits depend on token t only: a prompt
    token (but the last) can change only the prompt's own log-probs, which must not be counted."""
    model, P = tiny_gpt(), 6
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'c_proj' in name:
                p.zero_()
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(1, 256, (2, 16), generator=g)
    lens = torch.tensor([5, 8])
    seq[0, P + 5:] = PAD
    base = task.sequence_logps(model, seq, P, lens)
    edited = seq.clone()
    edited[:, 1:P - 1] = (edited[:, 1:P - 1] + 7) % 256   # prompt tokens but the last
    edited[0, P + 5:] = 99                                # padding after the first continuation
    assert torch.allclose(task.sequence_logps(model, edited, P, lens), base, atol=1e-6)
    full = -model(seq[:, :-1], seq[:, 1:]).sum(1)         # no mask: the prompt edit shows
    assert not torch.allclose(-model(edited[:, :-1], edited[:, 1:]).sum(1), full, atol=1e-3)
    edited[1, P + 2] = (edited[1, P + 2] + 1) % 256       # a continuation token does change it
    assert not torch.allclose(task.sequence_logps(model, edited, P, lens)[1], base[1])


def test_reward_model_reads_the_last_real_token():
    model, P = tiny_gpt(), 4
    rm = reward_model.RewardObjective(SimpleNamespace(pair_batch=2, prompt_len=P, seed=0, rm_pool='last', rm_head=0, rm_freeze=False), 'unused.pt')
    rm.head = torch.nn.Linear(32, 1)
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(1, 256, (3, 14), generator=g)
    lens = torch.tensor([3, 10, 6])
    with torch.no_grad():
        r = rm.rewards(model, seq, lens)
        h = model.hidden(seq)
        want = [rm.head(h[i, P + int(lens[i]) - 1]).item() for i in range(3)]
        assert r.tolist() == pytest.approx(want, abs=1e-6)
        edited = seq.clone()
        edited[0, P + 3:] = PAD                     # everything after the last real token
        edited[2, P + 6:] = 7
        assert torch.allclose(rm.rewards(model, edited, lens), r, atol=1e-6)
        edited[0, P + 2] = (edited[0, P + 2] + 1) % 256    # the last real token itself
        assert abs(rm.rewards(model, edited, lens)[0] - r[0]) > 1e-6


def test_reward_model_mean_pools_the_continuation_only():
    model, P = tiny_gpt(), 4
    rm = reward_model.RewardObjective(SimpleNamespace(pair_batch=2, prompt_len=P, seed=0, rm_pool='mean', rm_head=0, rm_freeze=False), 'unused.pt')
    rm.head = torch.nn.Linear(32, 1)
    seq = torch.randint(1, 256, (2, 14), generator=torch.Generator().manual_seed(6))
    lens = torch.tensor([3, 10])
    with torch.no_grad():
        r = rm.rewards(model, seq, lens)
        h = model.hidden(seq)
        want = [rm.head(h[i, P:P + int(lens[i])].mean(0)).item() for i in range(2)]
        assert r.tolist() == pytest.approx(want, abs=1e-6)
        edited = seq.clone()
        edited[0, P + 3:] = PAD
        assert torch.allclose(rm.rewards(model, edited, lens), r, atol=1e-6)


def test_reward_model_frozen_backbone_sums_a_per_token_mlp(tmp_path):
    """--rm_freeze: only the head trains; --rm_pool=sum with an MLP head: the reward is the sum of the
    head's scores over the continuation's positions."""
    write_pairs(tmp_path / 'high.pt')
    model, P, added = tiny_gpt(), 4, []
    cfg = SimpleNamespace(pair_batch=2, prompt_len=P, seed=0, rm_pool='sum', rm_head=8, rm_freeze=True)
    rm = reward_model.RewardObjective(cfg, tmp_path / 'high.pt')
    rm.setup(SimpleNamespace(device=torch.device('cpu'), model=model, add_params=lambda params, weight_decay: added.extend(params),
                             freeze_model=lambda: model.requires_grad_(False)))  # train.RunContext.freeze_model
    assert not any(p.requires_grad for p in model.parameters()) and added == list(rm.head.parameters())
    seq = torch.randint(1, 256, (2, 14), generator=torch.Generator().manual_seed(6))
    lens = torch.tensor([3, 10])
    assert rm.rewards(model, seq, lens).tolist() == [0.0, 0.0]  # the output layer starts at zero: loss log 2
    torch.nn.init.normal_(rm.head[-1].weight, generator=torch.Generator().manual_seed(7))
    r = rm.rewards(model, seq, lens)
    with torch.no_grad():
        h = model.hidden(seq)
        want = [sum(rm.head(h[i, t]).item() for t in range(P, P + int(lens[i]))) for i in range(2)]
    assert r.tolist() == pytest.approx(want, abs=1e-5)
    r.sum().backward()
    assert all(p.grad is not None for p in rm.head.parameters())


def test_reward_model_early_stopping_selects_on_one_half_reports_the_other(tmp_path):
    write_pairs(tmp_path / 'high.pt', n=12, n_val=4)
    rm = reward_model.RewardObjective(SimpleNamespace(pair_batch=2, prompt_len=4, seed=0, rm_pool='mean', rm_head=0, rm_freeze=False),
                               tmp_path / 'high.pt')
    rm.setup(SimpleNamespace(device=torch.device('cpu'), model=tiny_gpt(), add_params=lambda params, weight_decay: None))
    ctx = ctx_for(tmp_path)
    for step, m in ((100, [1.0, 1.0, -1.0, 1.0]), (200, [1.0, -1.0, 1.0, 1.0])):  # selection half acc 1, then 0.5
        rm.margins = lambda model, seq, lens, m=m: torch.tensor(m)
        ctx.step = step
        rm.evaluate(tiny_gpt(), ctx)
    r = rm.val_set[2]
    assert rm.val_metrics['step'] == 100 and rm.val_metrics['acc'] == 0.5        # report half [-1, 1] at step 100
    assert rm.val_metrics['ceiling'] == pytest.approx(task.bt_ceiling(r[2:]))


def test_kv_cache_sampler_matches_full_recompute():
    """task.sample (model.generate's KV cache, rows stopping at their eos) against generate recomputing the
    whole prefix for every token with the same draws; the lengths and padding derived from its output."""
    model, P, M, N = tiny_gpt(block_size=40), 6, 30, 40
    prompts = torch.randint(1, 256, (N, P), generator=torch.Generator().manual_seed(4))
    full = model.generate(prompts, M, temperature=1.0, generator=torch.Generator().manual_seed(5), use_cache=False,
                          stop=lambda new: new[:, -1] == EOS, pad_id=PAD)[:, P:]
    conts, lens = task.sample(model, prompts, M, torch.Generator().manual_seed(5))
    assert conts.shape == (N, M)
    assert 0 < int((lens < M).sum()) < N                                     # some rows stopped early, some did not
    for i in range(N):
        n = int(lens[i])
        assert torch.equal(conts[i, :n], full[i, :n])
        eos = (full[i] == EOS).nonzero()
        assert n == (int(eos[0]) + 1 if len(eos) else M)
        assert (conts[i, n:] == PAD).all()


def write_pairs(path, n=12, P=4, M=6, n_val=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = {'prompt': torch.randint(1, 256, (n, P), generator=g).to(torch.uint8), 'n_val': n_val,
             'replaced': torch.zeros(n, dtype=torch.bool)}
    for k in ('chosen', 'rejected'):
        lens = torch.randint(1, M + 1, (n,), generator=g)
        conts = torch.randint(1, 256, (n, M), generator=g)
        pairs[k] = torch.where(torch.arange(M) < lens[:, None], conts, PAD).to(torch.uint8)
        pairs[f'{k}_len'], pairs[f'r_{k}'] = lens, torch.randn(n, generator=g)
    torch.save(pairs, path)
    return pairs


def save_ckpt(model, path):
    torch.save({'model': model.state_dict(), 'model_args': asdict(model.config)}, path)


def test_reference_logps_cached_equal_recomputed(tmp_path):
    P, M = 4, 6
    pairs = write_pairs(tmp_path / 'high.pt', P=P, M=M)
    ref = tiny_gpt(seed=7, block_size=P + M)
    save_ckpt(ref, tmp_path / 'sft.pt')
    cfg = madpo.MadpoConfig(loss='dpo', prompt_len=P, max_new=M, block_size=P + M, pair_batch=4)

    def setup():
        nonlocal obj
        obj = madpo.PreferenceObjective(cfg, tmp_path / 'high.pt', tmp_path / 'sft.pt')
        obj.setup(ctx_for(tmp_path))
        return torch.cat([obj.ref_train, obj.ref_val])
    obj = None
    first = setup()
    cached = setup()
    runs.save_cache(obj.ref_cache, (first + 1).numpy(), obj.ref_identity())  # a cache of these inputs, other values
    assert torch.equal(setup(), first + 1)                                   # it is read, not recomputed
    want = [[task.sequence_logps(ref, torch.cat([pairs['prompt'][i:i + 1], pairs[k][i:i + 1]], 1).long(), P,
                                  pairs[f'{k}_len'][i:i + 1]).item() for k in ('chosen', 'rejected')] for i in range(12)]
    assert torch.equal(first, cached)
    assert cached.tolist() == [pytest.approx(w, abs=1e-5) for w in want]
    save_ckpt(tiny_gpt(seed=8, block_size=P + M), tmp_path / 'sft.pt')   # another reference: not the cache
    assert not torch.allclose(setup(), first, atol=1e-3)


def test_an_edited_reference_cache_is_computed_again(tmp_path):
    """The cache's sidecar holds its payload's sha256: a payload edited in place (same size, so only the
    checksum tells) is not used as is, but computed again and rewritten."""
    obj = preference_objective(tmp_path, loss='dpo')
    first, cache = torch.cat([obj.ref_train, obj.ref_val]), obj.ref_cache
    _, side = runs.load_cache(cache, obj.ref_identity(), 'reference log-probs', 'fix')
    assert side['identity']['ref_ckpt_sha256'] == file_sha256(tmp_path / 'sft.pt') and side['shape'] == [12, 2]
    assert cache == tmp_path / 'high_ref_logps.bin'
    edited = bytearray(cache.read_bytes())
    edited[:4] = np.float32(-1.0).tobytes()                                  # pair 0's chosen log-prob := -1
    cache.write_bytes(bytes(edited))
    with pytest.raises(UserError, match='was changed since it was computed'):
        runs.load_cache(cache, side['identity'], 'reference log-probs', 'fix')
    obj = preference_objective(tmp_path, loss='dpo')
    assert torch.equal(torch.cat([obj.ref_train, obj.ref_val]), first) and first[0, 0] != -1.0
    assert runs.load_cache(cache, side['identity'], 'reference log-probs', 'fix')[1]['sha256'] == side['sha256']


def test_long_passes_say_how_far_they_got(tmp_path, monkeypatch, capsys):
    """The reference log-prob precompute prints pairs done / total with a rate and an eta (at most every
    PROGRESS_EVERY seconds, and at the end); the pairs stage's sampling reports the prompts done after each
    batch; madpo.py names the stage it runs as i/n of the pipeline."""
    monkeypatch.setattr(runs, 'PROGRESS_EVERY', 0.0)
    write_pairs(tmp_path / 'high.pt', n=300, P=4, M=6, n_val=20)
    save_ckpt(tiny_gpt(seed=7, block_size=10), tmp_path / 'sft.pt')
    cfg = madpo.MadpoConfig(loss='dpo', prompt_len=4, max_new=6, block_size=10, pair_batch=4)
    madpo.PreferenceObjective(cfg, tmp_path / 'high.pt', tmp_path / 'sft.pt').setup(ctx_for(tmp_path))
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith('reference log-probs:')]
    assert [l.split(' | ')[0] for l in lines] == ['reference log-probs: 256/300 pairs (85%)',
                                                   'reference log-probs: 300/300 pairs (100%)']
    assert re.fullmatch(r'.* \| [\d,]+ pairs/s \| eta 0m00s', lines[-1]), lines[-1]
    reports = []
    cfg = madpo.MadpoConfig(prompt_len=4, max_new=6, block_size=10)
    task.sample_many(tiny_gpt(block_size=10), torch.ones(5, 4, dtype=torch.long), cfg, torch.Generator().manual_seed(0),
                     batch=2, report=reports.append)
    assert reports == [2, 4, 5]
    def stage_rm(cfg, device):  # a stand-in that only makes its folder
        madpo.folder(cfg, 'rm').mkdir(parents=True)
        return {'acc': 1.0}
    monkeypatch.setattr(madpo, 'ensure_prepared', lambda dataset: None)
    monkeypatch.setitem(madpo.STAGE_RUNS, 'rm', stage_rm)
    sft = tmp_path / 'out' / 'seed0' / 'sft'
    sft.mkdir(parents=True)
    (sft / 'stopped.json').write_text('{}')  # a stopped SFT: the later stages refuse to start from it
    with pytest.raises(UserError, match=re.escape(f'{sft} holds no finished SFT run (it was stopped): finish it first '
                                                  '(python madpo.py --stage=sft with the same --out_dir and --seed)')):
        madpo.main(madpo.MadpoConfig(stage='rm', out_dir=str(tmp_path / 'out'), device='cpu'))
    (sft / 'done.json').write_text(json.dumps({'wall_s': 1.0, 'config': {}}))
    madpo.main(madpo.MadpoConfig(stage='rm', out_dir=str(tmp_path / 'out'), device='cpu'))
    assert f"=== stage 3/4: rm -> {tmp_path / 'out' / 'seed0' / 'rm_high'}" in capsys.readouterr().out


def preference_objective(tmp_path, **overrides):
    """A PreferenceObjective set up on random pairs, with a tiny GPT checkpoint as the reference."""
    P, M = 4, 6
    write_pairs(tmp_path / 'high.pt', P=P, M=M)
    save_ckpt(tiny_gpt(seed=7, block_size=P + M), tmp_path / 'sft.pt')
    cfg = madpo.MadpoConfig(**{'prompt_len': P, 'max_new': M, 'block_size': P + M, 'pair_batch': 4, **overrides})
    obj = madpo.PreferenceObjective(cfg, tmp_path / 'high.pt', tmp_path / 'sft.pt', tmp_path / 'rm')
    obj.setup(ctx_for(tmp_path))
    return obj


def test_cdpo_objective_smooths_the_labels(tmp_path):
    obj = preference_objective(tmp_path, loss='cdpo', label_smoothing=0.2)
    policy = tiny_gpt(seed=9, block_size=10)
    state = obj.state_dict()
    idx = obj.next_indices()
    obj.load_state_dict(state)
    step = obj(policy, None, ctx_for(tmp_path))
    h = obj.margins_h(policy, obj.train_set[0][idx], obj.train_set[1][idx], obj.ref_train[idx])
    assert step.loss.item() == pytest.approx(madpo.cdpo_loss(h, 0.1, 0.2).mean().item(), rel=1e-6)
    assert step.loss.item() != pytest.approx(madpo.dpo_loss(h, 0.1).mean().item(), rel=1e-3)
    assert step.examples == 8


def test_madpo_reads_the_saved_reward_model(tmp_path):
    """The rm stage's rm.pt (the best step's backbone, head and the pooling it was trained with) gives MADPO's weights."""
    P, M = 4, 6
    backbone = tiny_gpt(seed=11, block_size=P + M)
    rm = reward_model.RewardObjective(SimpleNamespace(pair_batch=2, prompt_len=P, seed=0, rm_pool='last', rm_head=0, rm_freeze=False), 'unused.pt')
    rm.head, rm.model_args = torch.nn.Linear(32, 1), asdict(backbone.config)
    rm.best = {'model': backbone.state_dict(), 'head': rm.head.state_dict()}
    (tmp_path / 'rm').mkdir()
    rm.save(tmp_path / 'rm' / 'rm.pt')
    obj = preference_objective(tmp_path, loss='madpo', rm_pool='mean')    # the saved pooling and head win
    seq, lens = obj.train_set[:2]
    want = madpo.madpo_weight(rm.margins(backbone, seq, lens), 4.0)
    assert torch.allclose(obj.weights, want, atol=1e-6)
    assert json.loads((tmp_path / 'madpo_weights.json').read_text())['mean'] == pytest.approx(want.mean().item(), rel=1e-5)
    with pytest.raises(UserError, match='no finished reward model'):
        preference_objective(tmp_path / 'rm', loss='madpo')
    saved = torch.load(tmp_path / 'rm' / 'rm.pt', weights_only=True)
    torch.save({k: v for k, v in saved.items() if k != 'head'}, tmp_path / 'rm' / 'rm.pt')  # a checkpoint without its head
    with pytest.raises(UserError, match='rm.pt holds no reward head .*rerun --stage=rm'):
        preference_objective(tmp_path, loss='madpo')


@pytest.mark.parametrize('training', [False, True])
def test_evaluate_keeps_the_model_mode(tmp_path, training):
    """model.evaluating: the objectives' evals leave the model in the mode they found it in."""
    obj = preference_objective(tmp_path, loss='dpo')
    rm = reward_model.RewardObjective(SimpleNamespace(pair_batch=2, prompt_len=4, seed=0, rm_pool='mean', rm_head=0, rm_freeze=False), tmp_path / 'high.pt')
    rm.setup(SimpleNamespace(device=torch.device('cpu'), model=tiny_gpt(), add_params=lambda params, weight_decay: None))
    for objective in (obj, rm):
        model = tiny_gpt(block_size=10).train(training)
        assert math.isfinite(objective.evaluate(model, ctx_for(tmp_path)))
        assert model.training == training


def test_pair_order_resumes_exactly():
    cfg = SimpleNamespace(pair_batch=5, seed=3)
    a = reward_model.PairObjective(cfg, 'unused.pt')
    a.train_set, a.device = (torch.zeros(12, 2, 3),), torch.device('cpu')
    for _ in range(4):
        a.next_indices()
    b = reward_model.PairObjective(cfg, 'unused.pt')
    b.train_set, b.device = a.train_set, a.device
    b.load_state_dict(a.state_dict())
    seen = [a.next_indices() for _ in range(5)]
    assert all(torch.equal(x, b.next_indices()) for x in seen)
    assert sorted(torch.cat(seen[2:5]).tolist()) == list(range(12))  # one epoch = each pair once


def test_bdpo_state_and_draws_resume_exactly():
    cfg = madpo.MadpoConfig(loss='bdpo')
    a = madpo.PreferenceObjective(cfg, 'unused.pt', 'unused.pt')
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        a.bdpo(torch.randn(16, generator=g), a.rng)
    b = madpo.PreferenceObjective(cfg, 'unused.pt', 'unused.pt')
    b.load_state_dict(a.state_dict())
    torch.manual_seed(123)                            # the global RNG must not matter
    for _ in range(3):
        h = torch.randn(16, generator=g)
        (la, ba, ka), (lb, bb, kb) = a.bdpo(h, a.rng), b.bdpo(h, b.rng)
        assert torch.equal(ka, kb) and ba == bb and torch.equal(la, lb)


def test_config_refuses_dropout_loop_keys_and_short_blocks():
    """MadpoConfig holds only keys that apply to its stages: a loop key (dropout, arch, optimizer) is refused
    by the configurator with one line, instead of silently applying to the sft, rm and po stages alike; the
    study refuses empty or repeated seeds, betas and arms, and the keys it sets per run."""
    with pytest.raises(ConfigError, match='dropout'):
        parse(madpo.MadpoConfig, ['--dropout=0.1'])
    for arg in ('--arch=drop', '--optimizer=sophiag', '--lr=1e-3'):
        with pytest.raises(ConfigError, match=f'unknown config key {arg.split("=")[0]}'):
            parse(madpo.MadpoConfig, [arg])
    with pytest.raises(ConfigError, match='block_size'):
        madpo.MadpoConfig(prompt_len=24, max_new=200, block_size=128)
    for arg, says in (('--seeds=()', '--seeds is empty'), ('--betas=(0.1,0.03,0.1)', '--betas has 0.1 more than once'),
                      ('--arms=(\'dpo\',\'dpo\')', '--arms has dpo more than once')):
        with pytest.raises(ConfigError, match=re.escape(says)):  # two runs of one folder, or nothing to run
            parse(study.MadpoStudyConfig, [arg])
    with pytest.raises(ConfigError, match=re.escape('--tier, --loss: the study sets these per run')):
        parse(study.MadpoStudyConfig, ['--loss=ipo', '--tier=low'])
    with pytest.raises(ConfigError, match='unknown config key --seeds'):  # one run's keys only
        parse(madpo.MadpoConfig, ['--seeds=(0,)'])


def test_bdpo_alpha_and_tau_are_range_checked():
    """beta-DPO's beta grows with the kept margin (alpha < 0 inverts it); MADPO's tau is a margin magnitude
    (c(tau) = 1, w = 1 below -tau): tau <= 0 leaves no pair amplified."""
    for arg, says in (('--bdpo_alpha=-0.1', '--bdpo_alpha must be >= 0'), ('--tau=0', '--tau must be > 0'),
                      ('--tau=-6.9', '--tau must be > 0')):
        with pytest.raises(ConfigError, match=re.escape(says)):
            parse(madpo.MadpoConfig, [arg])
    assert parse(madpo.MadpoConfig, ['--bdpo_alpha=0', '--tau=2']).tau == 2


@pytest.mark.parametrize('content', ['oops', '[1, 2]', '{"wall_s": 1.0}'])
def test_a_damaged_done_json_is_refused_before_any_stage_runs(tmp_path, monkeypatch, content):
    """--stage=all reads back every finished stage's done.json first: a damaged one (not JSON, not an
    object, keys missing) is one line naming it and the fix, and no stage runs; the file stays."""
    cfg = study.MadpoStudyConfig(seeds=(0,), out_dir=str(tmp_path))
    done = tmp_path / 'seed0' / 'sft' / 'done.json'
    done.parent.mkdir(parents=True)
    done.write_text(content)
    ran = []
    monkeypatch.setattr(study, 'run_plan', lambda runs, jobs: ran.append(runs))
    with pytest.raises(UserError, match=f'{re.escape(str(done))} is .*: delete it, or rerun that stage with --overwrite=True'):
        study.run_study(cfg)
    with pytest.raises(UserError, match=re.escape(str(done))):  # the plan's check of one stage
        study.stage_finished('sft', done.parent)
    assert ran == [] and done.read_text() == content
    for stage, run in (('rm_high', {'wall_s': 1.0, 'config': {}, 'ceiling': 0.8}),      # no acc
                       ('po_dpo_b0.1_high', {'method': 'dpo', 'config': {'tier': 'high', 'seed': 0}, 'curve': [[0, 1]]})):
        (tmp_path / 'seed0' / stage).mkdir()
        (tmp_path / 'seed0' / stage / 'done.json').write_text(json.dumps(run))
    with pytest.raises(UserError, match='po_dpo_b0.1_high/done.json is damaged'):  # the compare stage
        report.load_runs(tmp_path)
    with pytest.raises(UserError, match=r'rm_high/done.json is damaged \(no valid acc\)'):
        report.ceiling_table(tmp_path)


@pytest.mark.parametrize('damage', ['truncated', 'keys'])
def test_a_damaged_pairs_file_is_refused_in_one_line(tmp_path, damage):
    path = tmp_path / 'high.pt'
    pairs = write_pairs(path)
    if damage == 'truncated':
        path.write_bytes(path.read_bytes()[:100])
    else:
        torch.save({k: v for k, v in pairs.items() if k != 'r_chosen'}, path)
    with pytest.raises(UserError, match='pairs file .*high.pt is (unreadable|damaged).*--stage=pairs'):
        task.load_pairs(path, 'cpu')
    preference_objective(tmp_path, loss='dpo').ref_cache.write_bytes(b'oops')  # (it writes the pairs anew)
    obj = preference_objective(tmp_path, loss='dpo')  # a damaged cache is computed again, not refused
    assert runs.load_cache(obj.ref_cache, obj.ref_identity(), 'reference log-probs', 'fix')[0].shape == (12, 2)


def test_each_stage_gets_its_own_train_config():
    cfg = parse(madpo.MadpoConfig, ['--sft_lr=1e-3', '--po_lr=5e-5', '--rm_iters=7', '--loss=ipo', '--tier=low'])
    sft, rm, po = (madpo.train_config(cfg, s) for s in ('sft', 'rm', 'po'))
    assert (sft.lr, sft.budget, sft.batch_size, sft.init_from) == (1e-3, 2000, 32, 'scratch')
    assert (rm.lr, rm.budget, rm.batch_size, rm.init_from) == (1e-4, 7, 16, str(Path('out/madpo/seed0/sft/ckpt.pt')))
    assert (po.lr, po.out_dir, po.eval_interval) == (5e-5, str(Path('out/madpo/seed0/po_ipo_b0.1_low')), 30)  # 120 iters / 4 points
    assert all(c.arch == 'full' and c.optimizer == 'adamw' and c.dropout == 0 for c in (sft, rm, po))
    assert madpo.train_config(replace(cfg, init_from='resume'), 'po').init_from == 'resume'
    quick = parse(study.MadpoStudyConfig, ['--quick=True', '--po_iters=60'])  # the one --quick mechanism
    assert (quick.sft_iters, quick.rm_iters, quick.po_iters, quick.seeds, quick.betas) == (1500, 300, 60, (0,), (0.1,))


def test_every_key_is_read_by_a_stage_or_says_how_it_runs():
    how = {'stage', 'out_dir', 'seed', 'threads', 'init_from', 'overwrite'}
    read = set().union(*madpo.READS.values())
    assert {f.name for f in fields(madpo.MadpoConfig)} == how | read and not how & read


def test_a_stage_is_reused_only_when_its_keys_and_its_inputs_keys_are_the_same(tmp_path):
    """What madpo.py records in a finished stage's config.json against what the study plans: a run is reused
    while the keys of its stage and of the stages whose files it reads are the same; a po run reads the SFT
    model and the pairs, and the reward model only for MADPO's learned margins."""
    cfg = study.MadpoStudyConfig(out_dir=str(tmp_path))

    def run(stage, arm='dpo', **change):
        return study.stage_run(replace(cfg, **change), stage, seed=0, tier='high', beta=0.1, **study.arm_keys(arm))

    for stage, arm in (('sft', 'dpo'), ('po', 'dpo'), ('po', 'madpo4')):  # finished, as madpo.py leaves a stage
        r = run(stage, arm)
        r.out_dir.mkdir(parents=True)
        madpo.record_config(parse(madpo.MadpoConfig, r.command()[2:]), r.out_dir)  # the run's command line, parsed
        (r.out_dir / 'done.json').write_text(json.dumps({'wall_s': 1.0, 'config': {}, 'method': arm, 'curve': []}))
        (r.out_dir / 'ckpt.pt').write_bytes(b'')
        assert r.is_done() and r.out_dir.parent == tmp_path.resolve() / 'seed0'
    assert run('sft', po_lr=1e-4).is_done() and not run('po', po_lr=1e-4).is_done()
    assert run('po', 'dpo', rm_lr=1e-3).is_done() and not run('po', 'madpo4', rm_lr=1e-3).is_done()
    assert not run('po', 'dpo', sft_lr=1e-3).is_done()                      # the SFT model it starts from changed
    assert not run('sft', max_new=40).is_done()                             # (the block must hold the sequences)
    (tmp_path / 'seed0' / 'sft' / 'ckpt.pt').unlink()
    assert not run('sft').is_done()                                         # what the later stages read is gone


def test_the_library_never_imports_the_lab():
    code = "import madpo, reward_model, sys; assert not any(m.startswith('studies') for m in sys.modules)"
    assert subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True).returncode == 0


def test_imdb_text_with_a_lone_surrogate_is_written_with_u_fffd(tmp_path, monkeypatch):
    """IMDb's reviews through the prepare (a stand-in for the datasets package): a lone surrogate, which no
    UTF-8 byte string holds, becomes U+FFFD as the prepare's docstring says, instead of a UnicodeEncodeError."""
    from data.reviews import prepare as reviews
    rows = {split: [{'text': f'Review {i}<br />it was \ud800 fine'} for i in range(300)] for split in ('train', 'test')}
    monkeypatch.setitem(sys.modules, 'datasets', SimpleNamespace(load_dataset=lambda name, split: rows[split]))
    reviews.prepare(reviews.PrepareConfig(source='imdb', out_dir=str(tmp_path / 'imdb')))
    text = b''.join(np.fromfile(tmp_path / 'imdb' / f'{split}.bin', dtype=np.uint16).astype(np.uint8).tobytes()
                    for split in ('train', 'val')).decode()
    assert text.count('it was \ufffd fine\n') == 600 and '\ud800' not in text


def test_missing_vader_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'vaderSentiment', None)
    monkeypatch.setitem(sys.modules, 'vaderSentiment.vaderSentiment', None)
    with pytest.raises(UserError, match='pip install vaderSentiment'):
        task.get_scorer('vader')
    monkeypatch.setattr(study, 'ensure_prepared', lambda dataset: None)  # its corpus prepared before
    monkeypatch.setattr(study, 'run_plan', lambda *a, **k: pytest.fail('a stage ran before the scorer was found'))
    with pytest.raises(UserError, match='pip install vaderSentiment'):  # the study: before its SFT runs, not at pairs
        study.run_study(study.MadpoStudyConfig(quick=True))


# ----- the pairs stage: replacing finished pairs -----------------------------------------------------

@pytest.fixture(scope='module')
def small_corpus(tmp_path_factory):
    """A small generated review corpus: what the pairs stage draws its prompts and negative reviews from."""
    pytest.importorskip('vaderSentiment')
    from data.reviews import prepare as reviews
    out = tmp_path_factory.mktemp('reviews')
    reviews.prepare(reviews.PrepareConfig(out_dir=str(out), n_reviews=400, n_words=4))
    return out


# a stage's tiny keys (the examples files take 20 pairs)
TINY_STAGE = ['--prompt_len=4', '--max_new=6', '--block_size=10', '--n_pairs=16', '--val_pairs=4', '--device=cpu']


def stage_command(stage, out, corpus, *args):
    """`python madpo.py --stage=<stage> ...` through the entry point, in this process: its exit code."""
    try:
        cli(madpo.main, madpo.MadpoConfig, [f'--stage={stage}', f'--out_dir={out}', f'--dataset={corpus}', *TINY_STAGE,
                                            *args])
    except SystemExit as e:
        return e.code
    return 0


def pairs_command(out, corpus, *args):
    return stage_command('pairs', out, corpus, *args)


def folder_bytes(path):
    """{file: bytes} under path; a live run's lock file (which holds its pid) left out."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob('*')) if p.is_file() and p.name != 'lock'}


@pytest.fixture
def finished_pairs(tmp_path, small_corpus, capsys):
    """An out_dir whose pairs stage has finished (done.json, config.json, the tiers' files), built from a tiny
    SFT checkpoint: (out_dir, the pairs folder, its files' bytes)."""
    out, pairs = tmp_path / 'out', tmp_path / 'out' / 'seed0' / 'pairs'
    (out / 'seed0' / 'sft').mkdir(parents=True)
    save_ckpt(tiny_gpt(seed=7, block_size=10), out / 'seed0' / 'sft' / 'ckpt.pt')
    (out / 'seed0' / 'sft' / 'done.json').write_text(json.dumps({'wall_s': 1.0, 'config': {}}))  # a finished SFT
    assert pairs_command(out, small_corpus) == 0
    assert {'done.json', 'config.json', 'high.pt', 'low.pt'} <= set(folder_bytes(pairs))
    capsys.readouterr()
    return out, pairs, folder_bytes(pairs)


def test_finished_pairs_are_not_replaced_without_overwrite(finished_pairs, small_corpus, capsys):
    """Like a training stage over a run: one line naming --overwrite=True, exit 2, every file as it was; the
    tiers' files count without their record too (the rm and po stages read them)."""
    out, pairs, before = finished_pairs
    assert pairs_command(out, small_corpus, '--n_pairs=20') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(r'error: .*pairs already holds pairs \(done\.json, .*--overwrite=True .*', err[0]), err
    assert folder_bytes(pairs) == before
    (pairs / 'done.json').unlink()
    assert pairs_command(out, small_corpus, '--n_pairs=20') == 2 and '--overwrite=True' in capsys.readouterr().err
    assert folder_bytes(pairs) == {k: v for k, v in before.items() if k != 'done.json'}


@pytest.mark.parametrize('broken', ['sft_checkpoint', 'scorer'])
def test_a_failed_rebuild_leaves_the_old_pairs_and_their_record(finished_pairs, small_corpus, capsys, monkeypatch, broken):
    """--overwrite=True with a corrupt SFT checkpoint, or --scorer=transformer without its package: one line,
    exit 2, and the old pairs, done.json and config.json byte for byte (no partial folder left)."""
    out, pairs, before = finished_pairs
    if broken == 'sft_checkpoint':
        (out / 'seed0' / 'sft' / 'ckpt.pt').write_bytes(b'not a checkpoint')
        args, says = (), 'checkpoint .*ckpt.pt is unreadable'
    else:
        monkeypatch.setitem(sys.modules, 'transformers', None)
        args, says = ('--scorer=transformer',), 'pip install transformers'
    assert pairs_command(out, small_corpus, '--overwrite=True', '--n_pairs=20', *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(says, err[0]), err
    assert folder_bytes(pairs) == before and not (pairs / 'partial').exists()


def test_overwrite_rebuilds_the_pairs_keeping_the_old_until_the_new_are_complete(finished_pairs, small_corpus, monkeypatch):
    """--overwrite=True: while the new pairs are built the old ones and their record are untouched; then the
    folder holds the new pairs (n_pairs 20) and their record."""
    out, pairs, before = finished_pairs
    seen = []

    def build_pairs(*args):  # what a run reading the folder mid-build would find
        seen.append(folder_bytes(pairs) == before)
        return task.build_pairs(*args)
    monkeypatch.setattr(madpo, 'build_pairs', build_pairs)
    assert pairs_command(out, small_corpus, '--overwrite=True', '--n_pairs=20') == 0
    assert seen == [True] and not (pairs / 'partial').exists()
    assert json.loads((pairs / 'done.json').read_text())['config']['n_pairs'] == 20
    assert json.loads((pairs / 'config.json').read_text())['config']['n_pairs'] == 20
    train_set, val_set = task.load_pairs(pairs / 'high.pt', 'cpu')
    assert (len(train_set[0]), len(val_set[0])) == (20, 4)


def test_a_move_cut_short_leaves_no_record(tmp_path):
    """madpo.move_in: the old done.json and config.json go before the first new file moves in, so a move
    that fails halfway never leaves new pairs passing for the old ones."""
    out, partial = tmp_path / 'pairs', tmp_path / 'pairs' / 'partial'
    partial.mkdir(parents=True)
    for name in ('done.json', 'config.json', 'high.pt'):
        (out / name).write_text('old')
    (partial / 'high.pt').write_text('new')
    (partial / 'low.pt').write_text('new')
    (out / 'low.pt').mkdir()                                                  # where low.pt cannot go
    (out / 'low.pt' / 'x').write_text('')
    with pytest.raises(OSError):
        madpo.move_in(partial, out)
    assert not (out / 'done.json').exists() and not (out / 'config.json').exists()
    assert (out / 'high.pt').read_text() == 'new'


# ----- stopped by a signal; a folder in use ----------------------------------------------------------

WAIT_FOR_SIGNAL = """
import sys, time
import torch, configurator, madpo, model
real_forward, calls = model.GPT.forward, [0]

def forward(self, *args, **kwargs):  # the K-th training forward waits (a minute at most) for the test's signal
    if self.training and torch.is_grad_enabled():
        calls[0] += 1
        if calls[0] == int(sys.argv[1]):
            print('waiting for a signal', flush=True)
            t0 = time.time()
            while not configurator.STOPPED and time.time() - t0 < 60:
                time.sleep(0.01)
    return real_forward(self, *args, **kwargs)

model.GPT.forward = forward
configurator.cli(madpo.main, madpo.MadpoConfig, sys.argv[2:])
"""


def test_sigterm_stops_sft_with_exit_143_and_the_resume_finishes(tmp_path, small_corpus):
    """A scheduler's SIGTERM to `python madpo.py --stage=sft` in the middle of step 4: the run saves step 4's
    checkpoint and stopped.json, says in one line how to continue and exits 143 (the shell's status, as train.py),
    not 2 (bad input); --init_from=resume then finishes it."""
    out, env = tmp_path / 'out', {**os.environ, 'OMP_NUM_THREADS': '1'}
    argv = ['--stage=sft', f'--out_dir={out}', f'--dataset={small_corpus}', *TINY_STAGE, '--sft_batch_size=4',
            '--sft_iters=8', '--eval_interval=4', '--log_interval=1', '--threads=1']
    proc = subprocess.Popen([sys.executable, '-c', WAIT_FOR_SIGNAL, '4', *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith('waiting for a signal'):
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=120)
    err, run = stderr.strip().splitlines(), out / 'seed0' / 'sft'
    assert proc.returncode == 143 and len(err) == 1, stdout[-2000:] + stderr[-2000:]
    assert re.fullmatch(r'sft stopped by SIGTERM, its checkpoint saved in .*: rerun it with --init_from=resume .*', err[0])
    assert json.loads((run / 'stopped.json').read_text())['signal'] == 'SIGTERM' and not (run / 'done.json').exists()
    assert torch.load(run / 'ckpt.pt', weights_only=True)['iter_num'] == 4
    resumed = subprocess.run([sys.executable, 'madpo.py', *argv, '--init_from=resume'], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert (run / 'done.json').exists() and not (run / 'stopped.json').exists()
    assert torch.load(run / 'ckpt.pt', weights_only=True)['iter_num'] == 8


@pytest.mark.parametrize('stage,sig,args', [
    ('rm', 'SIGINT', ['--rm_iters=6', '--rm_eval_interval=3', '--rm_head=8']),
    ('po', 'SIGTERM', ['--loss=dpo', '--po_pairs=16', '--po_val_pairs=4', '--n_eval=4', '--po_iters=6', '--po_points=2'])])
def test_a_stopped_rm_or_po_run_exits_with_the_signals_status_and_resumes(finished_pairs, small_corpus, capsys, monkeypatch,
                                                                         stage, sig, args):
    """Ctrl-C or SIGTERM inside step 3 of the rm and po stages: step 3's checkpoint, one line naming
    --init_from=resume, exit 130 / 143; no done.json until the resumed run finishes."""
    # --n_embd=32: the fixture's SFT model, which a resume rebuilds from the keys (the study passes the SFT's keys on)
    out, args = finished_pairs[0], ['--n_embd=32', '--pair_batch=4', '--log_interval=1', '--threads=1', *args]
    real_step, steps = train.Trainer.train_step, []

    def train_step(self):
        steps.append(self.iter_num)
        if len(steps) == 3:
            os.kill(os.getpid(), getattr(signal, sig))  # lands in the middle of the step, as a real one would
        return real_step(self)
    monkeypatch.setattr(train.Trainer, 'train_step', train_step)
    assert stage_command(stage, out, small_corpus, *args) == {'SIGINT': 130, 'SIGTERM': 143}[sig]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(rf'{stage} stopped by {sig}, .*--init_from=resume .*', err[0]), err
    run = madpo.folder(parse(madpo.MadpoConfig, [f'--stage={stage}', f'--out_dir={out}', *TINY_STAGE, *args]), stage)
    assert json.loads((run / 'stopped.json').read_text())['step'] == 3 and not (run / 'done.json').exists()
    monkeypatch.setattr(train.Trainer, 'train_step', real_step)
    assert stage_command(stage, out, small_corpus, *args, '--init_from=resume') == 0
    assert (run / 'done.json').exists() and not (run / 'stopped.json').exists()
    # a rerun over the finished stage, stopped midway: the old done.json went when the new run started
    monkeypatch.setattr(train.Trainer, 'train_step', train_step)
    steps.clear()
    assert stage_command(stage, out, small_corpus, *args, '--overwrite=True') == {'SIGINT': 130, 'SIGTERM': 143}[sig]
    assert not (run / 'done.json').exists() and (run / 'stopped.json').exists()
    if stage == 'rm':  # so MADPO's po stage does not read its rm.pt as a finished reward model's
        capsys.readouterr()
        assert stage_command('po', out, small_corpus, '--n_embd=32', '--loss=madpo', '--margins=rm', '--po_pairs=16',
                             '--po_val_pairs=4', '--n_eval=4') == 2
        assert f'{run} holds no finished RM run (it was stopped): finish it first (python madpo.py --stage=rm ' \
               '--tier=high --init_from=resume with the same --out_dir and --seed)' in capsys.readouterr().err


def test_a_stopped_pairs_build_keeps_the_old_pairs_and_says_how_to_rerun(finished_pairs, small_corpus, capsys, monkeypatch):
    """SIGTERM while new pairs are built: exit 143 and one line naming the rerun (a build has nothing to resume);
    the old pairs and their record byte for byte, no partial folder and no lock left."""
    out, pairs, before = finished_pairs

    def build_pairs(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal lands here
        raise AssertionError('SIGTERM did not stop the pairs stage')
    monkeypatch.setattr(madpo, 'build_pairs', build_pairs)
    assert pairs_command(out, small_corpus, '--overwrite=True', '--n_pairs=20') == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(r'pairs stopped by SIGTERM before .*: rerun it with --overwrite=True .*', err[0]), err
    assert folder_bytes(pairs) == before and not (pairs / 'partial').exists() and not (pairs / 'lock').exists()


def test_a_second_pairs_run_on_a_folder_in_use_is_refused_in_one_line(finished_pairs, small_corpus, monkeypatch):
    """Two `--stage=pairs --overwrite=True` on one folder at once: the second (another process) is refused in one
    line naming the first's pid, exit 2, and touches nothing; the first ends with its own pairs."""
    out, pairs, before = finished_pairs
    second = []

    def build_pairs(*args):  # while this run builds, another one starts on the same folder
        second.append(subprocess.run(
            [sys.executable, 'madpo.py', '--stage=pairs', f'--out_dir={out}', f'--dataset={small_corpus}', *TINY_STAGE,
             '--overwrite=True', '--n_pairs=24', '--threads=1'], cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'},
            capture_output=True, text=True, timeout=120))
        second.append(folder_bytes(pairs) == before)
        return task.build_pairs(*args)
    monkeypatch.setattr(madpo, 'build_pairs', build_pairs)
    assert pairs_command(out, small_corpus, '--overwrite=True', '--n_pairs=20') == 0
    proc, untouched = second
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.fullmatch(rf'error: {re.escape(str(pairs))} is in use by another run \(pid {os.getpid()}\): .*', err[0]), err
    assert untouched and not (pairs / 'lock').exists()
    assert json.loads((pairs / 'done.json').read_text())['config']['n_pairs'] == 20
    assert len(task.load_pairs(pairs / 'high.pt', 'cpu')[0][0]) == 20


# ----- end to end -----------------------------------------------------------------------------------

def test_quick_end_to_end_dpo_beats_sft(tmp_path):
    """The real entry point on a small review corpus (4 sentiment words per polarity, so that a tiny
    model learns them in a few hundred steps): sft, pairs, rm, po (DPO and MADPO on noisy oracle margins,
    each scored along training), compare; then a rerun skips every finished stage."""
    pytest.importorskip('vaderSentiment')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    corpus = tmp_path / 'reviews'
    subprocess.run([sys.executable, 'data/reviews/prepare.py', f'--out_dir={corpus}', '--n_reviews=4000', '--n_words=4'],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    out = tmp_path / 'run'
    args = [f'--out_dir={out}', f'--dataset={corpus}', '--quick=True', '--jobs=2', "--arms=('dpo','madpo4_noisy')",
            "--tiers=('high',)", '--sft_iters=700', '--sft_batch_size=16', '--n_pairs=400', '--val_pairs=50', '--po_pairs=400',
            '--po_val_pairs=50', '--n_eval=200',
            '--rm_iters=20', '--po_iters=60', '--po_lr=3e-4', '--log_interval=100']
    proc = subprocess.run([sys.executable, '-m', 'studies.madpo', *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    dpo = json.loads((out / 'seed0' / 'po_dpo_b0.1_high' / 'done.json').read_text())
    sft = dpo['curve'][0]
    assert [p['step'] for p in dpo['curve']] == [0, 30, 60] and (sft['kl'], sft['win_rate']) == (0.0, 0.5)
    assert dpo['reward'] > sft['reward'] + 0.05 and dpo['win_rate'] > 0.5, (sft, dpo)  # same prompts, same draws
    assert dpo['kl'] > 0
    compare = (out / 'compare.md').read_text()
    assert '| dpo |' in compare and '| madpo4_noisy |' in compare and 'BT ceiling' in compare
    rm = json.loads((out / 'seed0' / 'rm_high' / 'done.json').read_text())
    assert 0.5 <= rm['ceiling'] <= 1 and 0 <= rm['acc'] <= 1
    again = subprocess.run([sys.executable, '-m', 'studies.madpo', *args], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and again.stdout.count('done, skipped') == 5, again.stdout[-2000:]


def test_the_precision_design_gives_every_arm_the_same_betas():
    """python -m studies.madpo precision: the high tier's reward model per seed, and every arm at every beta
    and seed, with the paper's tau and the median-margin tau as two arms, in its own folder."""
    cfg = study.PrecisionConfig()
    plan = dict(study.study_plan(cfg))
    assert [r.args['tier'] for r in plan['rm']] == ['high'] * 6
    betas = {}
    for run in plan['po']:
        betas.setdefault(madpo.method_name(madpo.MadpoConfig(**{**run.args, 'stage': 'po'})), set()).add(run.args['beta'])
        assert (run.args['n_eval'], run.args['po_points']) == (640, 12)
    assert betas == {arm: set(cfg.betas) for arm in ('dpo', 'ipo', 'madpo4', 'madpo4_tq0.5', 'madpo4_oracle')}
    assert len(plan['po']) == 5 * 4 * 6 and all('out/madpo_precision/seed' in str(r.out_dir) for r in plan['po'])


def test_a_frontier_of_a_copied_run_or_of_two_configurations_is_refused(tmp_path):
    """An arm's frontiers take one run a seed and beta, all of one configuration: a po folder copied under
    another seed folder (it was merged into seed 0's frontier, moving the table), or a run of other keys beside
    the study's (a study resumed with another --po_lr and fewer --betas keeps its old runs), is refused in one line."""
    import shutil
    records = Path(__file__).resolve().parents[1] / 'out' / 'records' / 'madpo-precision-2026-12-06'
    assert report.load_curves(records)  # the committed study passes
    copy = tmp_path / 'study'
    for seed in ('seed0', 'seed1'):
        shutil.copytree(records / seed, copy / seed, ignore=shutil.ignore_patterns('*.pt', '*.bin'))
    shutil.copytree(copy / 'seed0' / 'po_dpo_b0.1_high', copy / 'seed0x' / 'po_dpo_b0.1_high')
    with pytest.raises(DataError, match=r'po_dpo_b0.1_high and .*seed0x/po_dpo_b0.1_high are both dpo on the high tier at '
                                        r'seed 0, beta 0.1: an arm takes one run a seed and beta: remove one'):
        report.load_curves(copy)
    shutil.rmtree(copy / 'seed0x')
    path = copy / 'seed1' / 'po_dpo_b0.01_high' / 'done.json'
    run = json.loads(path.read_text())
    run['config']['po_lr'] *= 2
    path.write_text(json.dumps(run))
    with pytest.raises(DataError, match=r'are both dpo on the high tier but were run with other --po_lr \(.*\): an arm is '
                                        r'one configuration'):
        report.load_curves(copy)
