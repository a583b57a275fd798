"""slm.py (Rho-1 SLM), its study (studies/slm.py, studies/slm_report.py) and data/mathmix: every arm's
selection and the loss against hand computations, the reference-loss cache against direct recomputation
and its refusals, the task generator (held-out pairs never in training, each byte's kind), the exact-match
eval against greedy decoding, the gates, the study plan and report, config scoping, an interrupted run's
resume, a --quick study."""
import dataclasses
import json
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import slm
import runs
import train
from budget import Budget
from conftest import run_script
from configurator import ConfigError, cli, parse
from data.loader import Corpus, DataError, get_examples, num_examples
from data.mathmix import fewshot, prepare as mm
from data.mathmix.prepare import BOILERPLATE, CLEAN, OFF_DOMAIN, WRONG, PrepareConfig, prepare
from model import GPT, GPTConfig
from studies import slm as study, slm_report as report, stats

T = 36  # 4 mathmix lines


@pytest.fixture(scope='module')
def mathmix(tmp_path_factory):
    """A small mathmix (ref, noise0 and noise40 + kinds.bin, eval.jsonl) under a temporary folder."""
    root = tmp_path_factory.mktemp('mathmix')
    prepare(PrepareConfig(n_ref_docs=60, n_train_docs=60, noise_levels=(0.0, 0.4), out_dir=str(root)))
    return root


def slm_cfg(mathmix, out_dir, cls=slm.SLMConfig, **kw):
    """One run's config (cls=study.StudyConfig: the study's) at test size."""
    base = dict(out_dir=str(out_dir), mathmix_dir=str(mathmix), model='tiny', n_head=2, n_embd=32, n_layer=2,
                block_size=T, batch_size=4, lr=1e-3, compile_loss=False, eval_batches=2, device='cpu', noise=0.4,
                peak_flops=1e12)
    return cls(**{**base, **kw})


def random_gpt(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=T, vocab_size=256, n_layer=2, n_head=2, n_embd=32, compile_loss=False))


def save_ref(model, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    runs.save_checkpoint(path, {'model': model.state_dict(), 'model_args': dataclasses.asdict(model.config)})


def run_context(budget):
    """The loop's RunContext over a stand-in trainer that holds only a budget (CPU, one rank)."""
    rt = runs.setup_device(train.TrainConfig(device='cpu'))
    return train.RunContext(SimpleNamespace(cfg=None, rt=rt, out_dir=None, corpus=None, model=None, budget=budget))


class FixedData:
    def __init__(self, x, y, ids):
        self.batch = x, y, ids

    def next(self, n):
        assert n == len(self.batch[0])
        return self.batch


# ----- selection and loss ---------------------------------------------------------------------------

SCORE = torch.tensor([[3., 1., 2., 2., 0.],
                      [2., 5., 2., 1., 4.]])  # flat: 3 1 2 2 0 | 2 5 2 1 4; the four 2s are tied


@pytest.mark.parametrize('k, expected', [
    (0.3, [6, 9, 0]),             # 5, 4, 3
    (0.4, [6, 9, 0, 2]),          # then the earliest of the tied 2s
    (0.6, [6, 9, 0, 2, 3, 5]),    # ties go in flat order: 2, 3, 5 (not 7)
    (0.75, [6, 9, 0, 2, 3, 5, 7, 1]),  # round(7.5) = 8 (round half to even)
])
def test_top_k_selects_exactly_the_expected_tokens_with_deterministic_ties(k, expected):
    mask = slm.top_k_mask(SCORE, k)
    want = torch.zeros(10)
    want[expected] = 1
    assert torch.equal(mask, want.view(2, 5))
    assert torch.equal(slm.top_k_mask(SCORE.clone(), k), mask)  # same input, same selection


# one batch of 8 tokens: a clean answer digit not learned yet, a clean operand digit (as hard for both
# models), a wrong digit, boilerplate, off-domain prose, a clean digit learned, a clean newline learned,
# a clean digit not learned that the reference also finds hardish
TRAIN_LOSS = torch.tensor([[3.0, 2.3, 2.5, 4.0, 5.0, 0.2, 0.05, 3.5]])
REF_LOSS = torch.tensor([[0.1, 2.3, 6.0, 9.0, 11.0, 0.1, 0.01, 2.4]])
KINDS = torch.tensor([[CLEAN, CLEAN, WRONG, BOILERPLATE, OFF_DOMAIN, CLEAN, CLEAN, CLEAN]])


@pytest.mark.parametrize('arm, k, want', [
    ('excess', 0.5, [1, 0, 0, 0, 0, 1, 1, 1]),     # excess 2.9, 0, -3.5, -5, -6, 0.1, 0.04, 1.1: tokens 0, 7, 5, 6
    ('excess', 0.25, [1, 0, 0, 0, 0, 0, 0, 1]),    # round(2) tokens: 0, 7
    ('reference', 0.5, [1, 1, 0, 0, 0, 1, 1, 0]),  # ref_loss 0.01, 0.1, 0.1, 2.3: tokens 6, 0, 5, 1 (not 7: 2.4)
    ('train', 0.5, [1, 0, 0, 1, 1, 0, 0, 1]),      # train_loss 5, 4, 3.5, 3: the noise is what the model finds hard
    ('oracle', 0.5, [1, 1, 0, 0, 0, 1, 1, 1]),     # exactly the clean tokens, whatever k
    ('clm', 0.5, [1, 1, 1, 1, 1, 1, 1, 1]),        # k = 1
])
def test_each_arm_selects_the_expected_tokens_of_a_hand_made_batch(arm, k, want):
    select_by, k, _ = study.arm_spec(arm, k)
    mask = slm.selection_mask(select_by, k, TRAIN_LOSS, REF_LOSS, KINDS)
    assert mask.tolist() == [want]


def test_random_arm_draws_from_its_generator():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    mask = slm.selection_mask('random', 0.5, TRAIN_LOSS, REF_LOSS, KINDS, g1)
    assert torch.equal(mask, slm.top_k_mask(torch.rand((1, 8), generator=g2), 0.5)) and mask.sum() == 4


def test_loss_normalises_by_the_number_selected():
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    loss = slm.slm_loss(losses, mask)
    assert loss.item() == pytest.approx((1 + 3 + 8) / 3)  # not / 8 tokens, not / (0.6 * 8)
    loss.backward()
    assert torch.allclose(losses.grad, mask / 3)  # unselected tokens get no gradient at all


def objective_on(cfg, model, x, y, ids, cache, kinds, roles=None):
    obj = slm.SelectiveLM(cfg, slm.get_paths(cfg), cache=cache)
    obj.kinds, obj.roles = kinds, np.full(len(kinds), mm.NOISE_LINE, dtype=np.uint8) if roles is None else roles
    budget = Budget('iters', 10, None, lambda L: 1.0, x.size(1), len(x))
    return obj, obj(model, FixedData(x, y, ids), run_context(budget))


def test_objective_trains_on_the_top_k_by_excess_loss_and_counts_kinds(mathmix, tmp_path):
    """Through the objective: the cache gives ref_loss for position id + t + 1, and the loss is the
    mean of model(x, y) over the round(k * B*T) tokens of largest train_loss - ref_loss."""
    cfg = slm_cfg(mathmix, tmp_path, k=0.25, batch_size=2)
    model = random_gpt(0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 256, (2, T), generator=g), torch.randint(0, 256, (2, T), generator=g)
    ids = torch.tensor([3 * T, 0])
    cache = np.random.default_rng(1).random(5 * T).astype(np.float16) * 6
    kinds = np.random.default_rng(2).integers(0, 4, 5 * T).astype(np.uint8)
    obj, step = objective_on(cfg, model, x, y, ids, cache, kinds)
    with torch.no_grad():
        losses = model(x, y)
    ref = torch.tensor([[float(cache[int(i) + t + 1]) for t in range(T)] for i in ids])
    excess = (losses - ref).flatten().tolist()
    keep = sorted(range(2 * T), key=lambda j: (-excess[j], j))[:18]  # round(0.25 * 72) tokens
    assert step.loss.item() == pytest.approx(sum(losses.flatten()[j].item() for j in keep) / 18, rel=1e-6)
    assert step.logs['excess_selected'].item() == pytest.approx(sum(excess[j] for j in keep) / 18, rel=1e-5)
    flat_kinds = [int(kinds[int(i) + t + 1]) for i in ids for t in range(T)]
    for kind, name in enumerate(mm.KINDS):  # the selection rate of each kind, counted by hand
        seen = [j for j in range(2 * T) if flat_kinds[j] == kind]
        assert obj.selection_rates()[name] == pytest.approx(sum(j in keep for j in seen) / len(seen))


def test_k_100_equals_plain_causal_lm(mathmix, tmp_path):
    model = random_gpt(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (4, T), generator=g), torch.randint(0, 256, (4, T), generator=g)
    ids = torch.arange(4) * T
    _, step = objective_on(slm_cfg(mathmix, tmp_path, k=1.0), model, x, y, ids,
                           np.random.default_rng(0).random(5 * T).astype(np.float16), np.ones(5 * T, dtype=np.uint8))
    clm = train.CausalLM(4)(model, FixedData(x, y, ids), None)
    assert abs(step.loss.item() - clm.loss.item()) < 1e-6 and step.logs['selected_frac'].item() == 1.0


# the coin control: 12 tokens, bytes of two lines; k = 0.5 keeps 6. SLM's top 6 by excess: 2 (2.0), 5 (1.5),
# 8 (0.9), 0 (0.3), 9 (0.2), 3 (0.1). Per operand role: a (tokens 0, 6) 1 of 2, b (1, 7) none, c (3, 9) both,
# d (4) none; the non-operands taken are 2, 5, 8, the top 6 - 3 of them
EXCESS = torch.tensor([[0.3, -0.2, 2.0, 0.1, -0.4, 1.5],
                       [0.05, -0.1, 0.9, 0.2, -0.3, 0.0]])
ROLE = torch.tensor([[0, 1, 2, 3, 4, 5],        # a b + c d =
                     [0, 1, 6, 3, 7, 8]])       # a b units c tens newline
OPERAND = torch.isin(ROLE, torch.tensor(mm.OPERANDS))


def test_coin_control_selects_operands_by_a_coin_at_slms_rate_and_the_rest_as_slm():
    g, twin = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    mask, rate = slm.coin_control_mask(EXCESS, 0.5, ROLE, mm.OPERANDS, g)
    assert rate.tolist() == [[0.5, 0, 0, 1, 0, 0], [0.5, 0, 0, 1, 0, 0]]  # SLM's rate per operand role; 0 elsewhere
    assert mask[~OPERAND].tolist() == [1, 1, 1, 0, 0]  # tokens 2, 5, 8 selected; 10, 11 not: exactly SLM's
    assert torch.equal(mask[OPERAND], (torch.rand((2, 6), generator=twin) < rate).float()[OPERAND])  # the coin
    draws = torch.stack([slm.coin_control_mask(EXCESS, 0.5, ROLE, mm.OPERANDS, g)[0] for _ in range(4000)])  # (4000, 2, 6)
    assert torch.allclose(draws.mean(0)[OPERAND], rate[OPERAND], atol=0.03)  # sd of a rate: 0.008
    assert (draws[:, ~OPERAND] == mask[~OPERAND]).all()  # the coin never moves a non-operand
    assert draws.sum((1, 2)).mean().item() == pytest.approx(6, abs=0.05)  # SLM's budget, in expectation
    via = slm.selection_mask('excess', 0.5, EXCESS + 1, torch.ones_like(EXCESS), None, twin, 'coin_control', ROLE)
    assert via[~OPERAND].tolist() == [1, 1, 1, 0, 0] and via[ROLE == 3].tolist() == [1, 1] and via[ROLE == 1].sum() == 0


def test_coin_control_keeps_slms_choice_of_non_operands_on_random_batches():
    """Whatever the batch: the non-operands selected are the top (round(k B T) - operands SLM took) of them by
    excess loss (ties to the earlier token), and each operand role's coin rate is SLM's rate for that role."""
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        excess = torch.randint(-3, 4, (3, 9), generator=g).float()  # integers: many ties
        roles = torch.randint(0, len(mm.ROLES), (3, 9), generator=g)
        operand = torch.isin(roles, torch.tensor(mm.OPERANDS)).flatten()
        k = [0.2, 0.5, 0.8][trial % 3]
        mask, rate = slm.coin_control_mask(excess, k, roles, mm.OPERANDS, g)
        slm_mask = slm.top_k_mask(excess, k)
        rest = [j for j in sorted(range(27), key=lambda j: (-excess.flatten()[j].item(), j)) if not operand[j]]
        want = torch.zeros(27)
        want[rest[:round(k * 27) - int(slm_mask.flatten()[operand].sum())]] = 1
        assert torch.equal(mask.flatten()[~operand], want[~operand])
        for r in mm.OPERANDS:
            if (roles == r).any():
                assert (rate[roles == r] == slm_mask[roles == r].mean()).all()


def test_objective_with_the_coin_control_counts_each_byte_role(mathmix, tmp_path):
    """SelectiveLM with select=coin_control: its mask is SLM's off the operands (by the roles of the token each
    y[b, t] predicts), and the curve's role stats are the hand counts of that mask and the excess loss."""
    cfg = slm_cfg(mathmix, tmp_path, k=0.5, batch_size=2, select='coin_control')
    model = random_gpt(0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 256, (2, T), generator=g), torch.randint(0, 256, (2, T), generator=g)
    ids = torch.tensor([3 * T, 0])
    cache = np.random.default_rng(1).random(5 * T).astype(np.float16) * 3
    roles = np.random.default_rng(3).integers(0, len(mm.ROLES), 5 * T).astype(np.uint8)
    obj, step = objective_on(cfg, model, x, y, ids, cache, np.zeros(5 * T, dtype=np.uint8), roles)
    with torch.no_grad():
        excess = model(x, y) - torch.tensor([[float(cache[int(i) + t + 1]) for t in range(T)] for i in ids])
    role = torch.tensor([[int(roles[int(i) + t + 1]) for t in range(T)] for i in ids])
    operand = torch.isin(role, torch.tensor(mm.OPERANDS))
    slm_mask = slm.top_k_mask(excess, 0.5)
    stats = obj.role_stats()
    selected = {name: st['selected'] * st['tokens'] for name, st in stats.items()}
    for r, name in enumerate(mm.ROLES):
        mine = role == r
        assert stats[name]['tokens'] == mine.sum().item()
        assert stats[name]['excess'] == pytest.approx(excess[mine].mean().item(), rel=1e-5, abs=1e-6)
        if r not in mm.OPERANDS:  # off the operands: SLM's own selection
            assert selected[name] == pytest.approx(slm_mask[mine].sum().item())
    taken = sum(selected[mm.ROLES[r]] for r in mm.OPERANDS)
    assert 0 < taken < operand.sum().item() and step.logs['selected_frac'].item() == pytest.approx(
        (taken + slm_mask[~operand].sum().item()) / (2 * T))


# ----- the task generator ----------------------------------------------------------------------------

def lines_of(folder):
    """The train split as 9-byte lines, with the kinds of their bytes when kinds.bin is there."""
    data = np.fromfile(folder / 'train.bin', dtype=np.uint16).astype(np.uint8)
    kinds = np.fromfile(folder / 'kinds.bin', dtype=np.uint8) if (folder / 'kinds.bin').exists() else np.zeros_like(data)
    assert len(data) == len(kinds) and len(data) % mm.LINE == 0  # every document is whole lines
    return [(bytes(data[i:i + mm.LINE]).decode(), kinds[i:i + mm.LINE].tolist()) for i in range(0, len(data), mm.LINE)]


FACT = re.compile(r'(\d\d)\+(\d\d)=(\d)(\d)\n')


def test_held_out_pairs_never_occur_in_training_and_every_byte_has_its_kind(mathmix):
    held = {(r['a'], r['b']) for r in fewshot.load_problems(mathmix / 'eval' / 'eval.jsonl')}
    assert held == {p for p in mm.PAIRS if mm.held_out(*p)} and 0.05 < len(held) / len(mm.PAIRS) < 0.15
    found = {}
    for corpus in ('ref', 'noise0', 'noise40'):
        for text, kinds in lines_of(mathmix / corpus / 'byte'):
            fact = FACT.fullmatch(text)
            kind = 'fact' if fact else mm.KINDS[kinds[0]]
            found[corpus, kind] = found.get((corpus, kind), 0) + 1
            if fact:
                a, b, units, tens = map(int, fact.groups())
                assert (a, b) not in held, text                 # not even as a wrong fact
                if kinds[6] == WRONG:                           # the bad source: units digit 7 written as 8
                    assert (a + b) % 10 == mm.TRAP_DIGIT and units == mm.TRAP_DIGIT + 1 and tens == (a + b) // 10
                    assert kinds == [CLEAN] * 6 + [WRONG] + [CLEAN] * 2
                else:
                    assert units == (a + b) % 10 and tens == (a + b) // 10 and kinds == [CLEAN] * 9, text
            else:  # noise lines are labelled as a whole, and are not facts
                assert corpus == 'noise40' and kinds == [kinds[0]] * 9 and kinds[0] in (BOILERPLATE, OFF_DOMAIN), text
                if kinds[0] == OFF_DOMAIN:
                    assert re.fullmatch(r'[ -~]{8}\n', text)
    assert found.keys() == {('ref', 'fact'), ('noise0', 'fact'), ('noise40', 'fact'), ('noise40', 'boilerplate'),
                            ('noise40', 'off_domain')}
    wrong = sum(k[6] == WRONG for _, k in lines_of(mathmix / 'noise40' / 'byte'))
    assert 0.15 < wrong / found['noise40', 'fact'] < 0.4  # 0.6 of 40% of the lines, of the 84% that are facts


def test_each_bytes_role_is_its_place_in_a_fact_line_and_a_damaged_layout_is_refused(mathmix, tmp_path):
    corpus = mathmix / 'noise40' / 'byte'
    roles = mm.load_roles(corpus)
    for i, (text, kinds) in enumerate(lines_of(corpus)):
        want = list(range(mm.LINE)) if FACT.fullmatch(text) else [mm.NOISE_LINE] * mm.LINE
        assert roles[i * mm.LINE:(i + 1) * mm.LINE].tolist() == want, text
    assert [mm.ROLES[r] for r in mm.OPERANDS] == ['a', 'b', 'c', 'd']
    damaged = tmp_path / 'c'
    damaged.mkdir()
    for name in ('meta.json', 'kinds.bin', 'train.bin'):
        (damaged / name).write_bytes((corpus / name).read_bytes())
    tokens = np.fromfile(damaged / 'train.bin', dtype=np.uint16)
    fact = next(i for i, (text, _) in enumerate(lines_of(corpus)) if FACT.fullmatch(text))
    tokens[fact * mm.LINE + 2] = ord('-')  # a fact line with '-' for '+': not the layout the roles come from
    tokens.tofile(damaged / 'train.bin')
    with pytest.raises(DataError, match='neither a fact `ab\\+cd=ef` nor a noise line labelled whole'):
        mm.load_roles(damaged)


# ----- the eval -------------------------------------------------------------------------------------

def test_exact_match_is_greedy_decoding(mathmix):
    """One teacher-forced pass (fewshot.greedy_right) against model.generate's greedy digits: problems
    whose gold answer is set to what greedy decoding writes are right, ones off in either digit wrong."""
    model = random_gpt(3).eval()
    with torch.no_grad():  # bytes >= 128 get zero logits: greedy writes ASCII, so answers stay one byte per char
        model.transformer.wte.weight[128:] = 0
    rt = runs.setup_device(train.TrainConfig(device='cpu'))
    problems = fewshot.load_problems(mathmix / 'eval' / 'eval.jsonl')[:12]
    prompts = torch.tensor([list(fewshot.prompt(p, T).encode()) for p in problems])
    assert all(fewshot.prompt(p, T).endswith('\n' + p['question']) for p in problems) and prompts.size(1) == 3 * 9 + 6
    greedy = [bytes(row).decode('latin-1') for row in model.generate(prompts, 2, temperature=0)[:, -2:].tolist()]
    for i, (p, g) in enumerate(zip(problems, greedy)):  # greedy's answer, the second digit off, the first off
        p['answer'] = [g, g[0] + chr(ord(g[1]) ^ 1), chr(ord(g[0]) ^ 1) + g[1]][i % 3]
    assert fewshot.greedy_right(model, problems, rt).tolist() == [i % 3 == 0 for i in range(12)]


# ----- the reference-loss cache -----------------------------------------------------------------------

def test_cache_lines_up_with_the_token_stream_and_bad_caches_are_refused(mathmix, tmp_path):
    cfg = slm_cfg(mathmix, tmp_path)
    paths = slm.get_paths(cfg)
    corpus, ref, cached = paths.corpus(0.4), random_gpt(5), paths.ref_losses(0.4)
    save_ref(ref, paths.ref_ckpt)
    slm.build_cache(cfg, paths)
    cache = slm.load_cache(paths, 0.4, T)
    tokens = np.memmap(corpus / 'train.bin', dtype=np.uint16, mode='r')
    assert len(cache) == len(tokens) and cache[0] == 0
    for k in (0, 7, num_examples(tokens, T) - 1):  # recompute a few examples directly
        x, y = get_examples(tokens, [k * T], T)
        with torch.no_grad():
            want = ref(x, y)[0].numpy()
        assert np.allclose(cache[k * T + 1:k * T + T + 1].astype(np.float32), want, rtol=2e-3, atol=2e-3)  # float16
    # online mode scores the same tokens, running the reference each step
    obj = slm.SelectiveLM(dataclasses.replace(cfg, ref_mode='online'), paths)
    obj.ref_model = ref
    x, y = get_examples(tokens, [7 * T], T)
    budget = Budget('iters', 10, None, lambda L: 1.0, T, 1)
    online = obj.reference_losses(x, y, torch.tensor([7 * T]), run_context(budget))
    assert np.allclose(online.numpy()[0], cache[7 * T + 1:8 * T + 1].astype(np.float32), atol=2e-3)
    assert budget.spent['scored_examples'] == 1  # charged as one forward-only pass
    # stale: another block size, another reference checkpoint (the same weights again: valid)
    with pytest.raises(DataError, match='stale.*block_size'):
        slm.load_cache(paths, 0.4, 2 * T)
    save_ref(random_gpt(6), paths.ref_ckpt)
    with pytest.raises(DataError, match='stale.*ref_ckpt_sha256'):
        slm.load_cache(paths, 0.4, T)
    save_ref(ref, paths.ref_ckpt)
    slm.load_cache(paths, 0.4, T)
    # refused in one line (a DataError, printed by the CLI): truncated, half length, a sidecar without an
    # identity key, without save_cache's structure or not JSON; then the static "concentrated" mask for
    # select_by='reference' (the study's --stage=export) from the rebuilt cache
    side, raw = cached.with_suffix('.json').read_text(), cached.read_bytes()
    no_data_sha = json.dumps({**json.loads(side), 'identity': {k: v for k, v in json.loads(side)['identity'].items()
                                                               if k != 'data_sha256'}})
    for name, data, match in (('.bin', raw[:-7], 'truncated'), ('.bin', raw[:len(raw) // 2], 'truncated'),
                              ('.json', no_data_sha, 'stale.*data_sha256=None'),
                              ('.json', json.dumps({'dtype': 'float16'}), 'damaged'),
                              ('.json', side[:40], 'not a readable JSON object'),
                              ('.json', '[1, 2]', 'not a readable JSON object')):
        cached.with_suffix(name).write_bytes(data if isinstance(data, bytes) else data.encode())
        with pytest.raises(DataError, match=match):
            slm.load_cache(paths, 0.4, T)
        cached.with_suffix('.json').write_text(side)
        cached.write_bytes(raw)
    rates = study.stage_export(slm_cfg(mathmix, tmp_path, cls=study.StudyConfig, k=0.5), paths)
    mask = np.fromfile(corpus / 'concentrated_k50.bin', dtype=np.uint8)
    assert len(mask) == len(tokens) and 0.45 < mask[1:].mean() < 0.55 and set(rates) == set(mm.KINDS)


def test_a_cache_edited_after_it_was_computed_is_refused_and_the_arm_stops_in_one_line(mathmix, tmp_path):
    """One byte of ref_loss.bin changed (same length, sidecar intact): the sha256 differs, and the arm's run
    stops before training with the "changed since it was computed" refusal. A reference other than the
    one --ref_sha256 pins is refused too."""
    cfg = slm_cfg(mathmix, tmp_path)
    paths = slm.get_paths(cfg)
    save_ref(random_gpt(5), paths.ref_ckpt)
    slm.build_cache(cfg, paths)
    payload = paths.ref_losses(0.4)
    raw = bytearray(payload.read_bytes())
    raw[len(raw) // 2] ^= 1
    payload.write_bytes(bytes(raw))
    with pytest.raises(DataError, match='changed since it was computed'):
        slm.load_cache(paths, 0.4, T)
    out = run_script('slm.py', '--stage=train', f'--out_dir={tmp_path}', f'--mathmix_dir={mathmix}', '--noise=0.4',
                     '--model=tiny', '--n_head=2', '--n_embd=32', '--n_layer=2', f'--block_size={T}', '--device=cpu')
    assert out.returncode == 2 and out.stderr.count('\n') == 1 and 'changed since it was computed' in out.stderr, out.stderr
    assert not (paths.run_dir(cfg) / 'ckpt.pt').exists()
    with pytest.raises(DataError, match='is not the reference --ref_sha256 names'):  # a pinned reference, another file
        slm.stage_train(dataclasses.replace(cfg, ref_sha256='0' * 64), paths)


def save_train_py_ref(path, mathmix, block_size=T, vocab_size=256, corpus='ref', **config):
    """A random GPT saved as train.py saves a run (weights, model_args, its config, its corpus's fingerprint),
    by default as `slm.py --stage=ref` on this mathmix would; corpus: the mathmix folder it was trained on."""
    torch.manual_seed(7)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, compile_loss=False))
    data = mathmix / corpus / 'byte'
    path.parent.mkdir(parents=True, exist_ok=True)
    runs.save_checkpoint(path, {'model': model.state_dict(), 'model_args': dataclasses.asdict(model.config),
                                'config': {'dataset': str(data), 'tokenizer': 'byte', **config},
                                'identity': {'world_size': 1, 'corpus': Corpus(data).fingerprint(), 'rst_table': None}})


def cache_files(paths):
    return {suffix: paths.ref_losses(0.4).with_suffix(suffix).read_bytes() for suffix in ('.bin', '.json')}


@pytest.mark.parametrize('misfit, match', [
    (dict(block_size=72), "has block_size 72, this run's --block_size is 36"),
    (dict(vocab_size=65), 'has vocab 65, the corpus needs 256'),
    (dict(corpus='noise40'), 'was trained on other data .*noise40.* than this run\'s clean corpus'),
    (dict(tokenizer='gpt2'), "was trained with tokenizer 'gpt2'"),
    (dict(model_type='t5'), "holds a 't5' model, not a GPT"),
])
def test_a_reference_that_does_not_fit_the_run_is_refused_before_the_cache_is_touched(mathmix, tmp_path, misfit, match):
    """--stage=score with another checkpoint: one that cannot be this run's reference (other example length,
    vocabulary, data, tokenizer, model) is refused in one line naming the misfit and the fix; the corpus's cache
    (payload and sidecar) stays byte-identical and valid for the reference it was built from."""
    cfg = slm_cfg(mathmix, tmp_path)
    paths = slm.get_paths(cfg)
    save_ref(random_gpt(5), paths.ref_ckpt)
    slm.build_cache(cfg, paths)
    before = cache_files(paths)
    other = dataclasses.replace(cfg, ref_ckpt=str(tmp_path / 'other' / 'ckpt.pt'))
    save_train_py_ref(Path(other.ref_ckpt), mathmix, **misfit)
    with pytest.raises(DataError, match=f'--ref_ckpt=.*other/ckpt.pt {match}.*: .*slm.py --stage=ref'):
        slm.build_cache(other, slm.get_paths(other))
    assert cache_files(paths) == before
    slm.load_cache(paths, 0.4, T)


def test_scoring_with_a_train_py_run_on_another_corpus_exits_in_one_line_and_keeps_the_cache(mathmix, tmp_path):
    """The audit's case through the CLI: a plain train.py run on other data with block_size 64 given as
    --ref_ckpt to --stage=score exits 2 with one line; ref_loss.bin and its sidecar are untouched."""
    cfg = slm_cfg(mathmix, tmp_path)
    paths = slm.get_paths(cfg)
    save_ref(random_gpt(5), paths.ref_ckpt)
    slm.build_cache(cfg, paths)
    before = cache_files(paths)
    save_train_py_ref(tmp_path / 'other' / 'ckpt.pt', mathmix, block_size=64, corpus='noise0', dataset='shakespeare_char')
    out = run_script('slm.py', '--stage=score', f'--ref_ckpt={tmp_path / "other" / "ckpt.pt"}', f'--out_dir={tmp_path}',
                     f'--mathmix_dir={mathmix}', '--noise=0.4', '--model=tiny', '--n_head=2', '--n_embd=32', '--n_layer=2',
                     f'--block_size={T}', '--device=cpu', '--compile_loss=False')
    assert out.returncode == 2 and out.stderr.count('\n') == 1, out.stderr
    assert 'was trained on other data (shakespeare_char)' in out.stderr and 'slm.py --stage=ref' in out.stderr
    assert cache_files(paths) == before


def test_a_reference_that_fits_rescores_the_corpus(mathmix, tmp_path):
    """A checkpoint with all train.py records (as --stage=ref saves it) that fit this run: scored, its cache valid."""
    cfg = slm_cfg(mathmix, tmp_path)
    paths = slm.get_paths(cfg)
    save_ref(random_gpt(5), paths.ref_ckpt)
    slm.build_cache(cfg, paths)
    before = cache_files(paths)
    save_train_py_ref(paths.ref_ckpt, mathmix)
    slm.build_cache(cfg, paths)
    assert cache_files(paths)['.bin'] != before['.bin']  # the new reference's losses
    slm.load_cache(paths, 0.4, T)


def test_two_out_dirs_keep_their_own_reference_losses(mathmix, tmp_path):
    """Two studies on one mathmix, each with its own reference: scoring the second leaves the first's cache
    byte for byte and valid (it lived in the corpus folder, and the second's score replaced the first's)."""
    a, b = slm_cfg(mathmix, tmp_path / 'a'), slm_cfg(mathmix, tmp_path / 'b', seed=5)
    pa, pb = slm.get_paths(a), slm.get_paths(b)
    save_ref(random_gpt(5), pa.ref_ckpt)
    save_ref(random_gpt(6), pb.ref_ckpt)
    slm.build_cache(a, pa)
    before = cache_files(pa)
    slm.build_cache(b, pb)
    assert cache_files(pa) == before and cache_files(pb)['.bin'] != before['.bin']
    slm.load_cache(pa, 0.4, T)
    slm.load_cache(pb, 0.4, T)


def test_kinds_that_do_not_match_the_corpus_are_refused(mathmix, tmp_path):
    corpus = tmp_path / 'c'
    corpus.mkdir()
    for name in ('meta.json', 'kinds.bin'):
        (corpus / name).write_bytes((mathmix / 'noise40' / 'byte' / name).read_bytes())
    mm.load_kinds(corpus)
    (corpus / 'kinds.bin').write_bytes((corpus / 'kinds.bin').read_bytes()[:100])
    with pytest.raises(DataError, match='kinds.bin is missing or does not match'):
        mm.load_kinds(corpus)


# ----- the study: plan, gates, report ----------------------------------------------------------------

def test_study_plan_runs_the_oracle_first_then_whole_comparisons():
    cfg = study.StudyConfig(seeds=2, seed=1, arms='clm,excess,oracle', k=0.6, noise=0.4, k_sweep=(0.8,), noise_sweep=(0.0, 0.2))
    runs = [(r.noise, slm.arm_name(r.select_by, r.k), r.seed) for r in study.study_runs(cfg)]
    assert runs == [(0.4, 'oracle', 1), (0.4, 'clm', 1), (0.4, 'excess_k60', 1),
                    (0.4, 'oracle', 2), (0.4, 'clm', 2), (0.4, 'excess_k60', 2),
                    (0.4, 'excess_k80', 1), (0.4, 'excess_k80', 2),
                    (0.0, 'clm', 1), (0.0, 'excess_k60', 1), (0.2, 'clm', 1), (0.2, 'excess_k60', 1),
                    (0.0, 'clm', 2), (0.0, 'excess_k60', 2), (0.2, 'clm', 2), (0.2, 'excess_k60', 2)]


def test_control_study_plans_the_oracle_gate_then_three_arms_over_ten_paired_seeds():
    cfg = parse(study.ControlConfig, [])
    assert (cfg.noise, cfg.k, cfg.seeds, cfg.noise_sweep, cfg.k_sweep, cfg.out_dir) == (0.4, 0.6, 10, (), (), 'out/slm_control')
    arms = study.study_runs(cfg)
    names = [(slm.arm_name(r.select_by, r.k, r.select), r.seed) for r in arms]
    assert names[:4] == [('oracle', 1337), ('clm', 1337), ('excess_k60', 1337), ('slm_coin_control_k60', 1337)]
    assert len(names) == 31 and [n for n, _ in names].count('oracle') == 1  # the gate's seed only
    assert {r.noise for r in arms} == {0.4} and all(r.select == 'coin_control' for r in arms if 'coin' in r.run_dir)
    assert Path(arms[3].run_dir).name == 'slm_coin_control_k60_s1337'
    assert parse(study.ControlConfig, ['--quick=True']).arms == 'clm,excess,slm_coin_control'


@pytest.mark.parametrize('failing', ['ref', 'oracle'])
def test_a_failing_gate_stops_the_study_with_one_line(mathmix, tmp_path, capsys, failing):
    """Untrained-size runs: a gate at 1.0 cannot pass. The reference gate stops before any arm runs; the
    oracle gate right after the oracle's first run, before any other arm."""
    gates = {'ref': ['--gate_ref=1.0'], 'oracle': ['--gate_ref=0.0', '--gate_oracle=1.0']}[failing]
    argv = [f'--mathmix_dir={mathmix}', f'--out_dir={tmp_path}', '--n_layer=1', '--n_embd=32', '--n_head=2',
            f'--block_size={T}', '--batch_size=4', '--budget=300', '--ref_budget=300', '--eval_interval=1000',
            '--compile_loss=False', '--device=cpu', '--log_interval=1000', '--peak_flops=1e12', '--noise=0.4', '--noise_sweep=()', '--k_sweep=()', *gates]
    with pytest.raises(SystemExit) as stop:
        cli(study.main, study.StudyConfig, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count('\n') == 1 and 'Traceback' not in err
    what = "the reference model's" if failing == 'ref' else "the oracle arm's"
    number = r'\d\.\d+'
    assert re.fullmatch(rf"error: gate failed: {what} held-out exact match( \(seed 1337\))? is {number}, {number} below 1: .*\n", err)
    value, gap = map(float, re.findall(r'is (\d\.\d+), (\d\.\d+)', err)[0])
    assert value + gap == pytest.approx(1.0, abs=1e-3)
    arms = sorted(p.parent.name for p in tmp_path.glob('noise*/*/ckpt.pt'))
    assert arms == ([] if failing == 'ref' else ['oracle_s1337'])


def test_report_tokens_to_reach_clm_and_the_table(tmp_path):
    """A hand-made study: CLM ends at 0.6 (mean of two seeds); SLM's curves reach 0.6 at 150k and 300k
    tokens (interpolated): 225k ± t(1) * stdev / sqrt(2), and CLM's 400k / those: 2.67 and 1.33."""
    def write(noise, arm, seed, points):
        folder = tmp_path / f'noise{round(100 * noise)}' / f'{arm}_s{seed}'
        folder.mkdir(parents=True)
        curve = [{'tokens': 1000 * t, 'accuracy': a, 'trap_accuracy': a / 2, 'val_loss_clean': 1.0,
                  'selection': {'clean': 0.9, 'wrong_digit': 0.1}} for t, a in points]
        (folder / 'curve.jsonl').write_text(''.join(json.dumps(p) + '\n' for p in curve))
        (folder / 'eval.json').write_text(json.dumps({'noise': noise, 'arm': arm, 'seed': seed, **curve[-1]}))
    write(0.4, 'clm', 1, [(100, 0.1), (200, 0.3), (400, 0.5)])
    write(0.4, 'clm', 2, [(100, 0.1), (200, 0.5), (400, 0.7)])
    write(0.4, 'excess_k60', 1, [(100, 0.4), (200, 0.8), (400, 0.9)])  # 0.6 at 150
    write(0.4, 'excess_k60', 2, [(100, 0.2), (200, 0.4), (400, 0.8)])  # 0.6 at 300
    write(0.4, 'random_k60', 1, [(100, 0.1), (200, 0.2), (400, 0.3)])  # never
    groups = report.load_runs(tmp_path)
    assert list(groups) == [(0.4, 'clm'), (0.4, 'excess_k60'), (0.4, 'random_k60')]
    assert [report.tokens_to_reach(r, 0.6) for r in groups[0.4, 'excess_k60']] == [pytest.approx(150e3), pytest.approx(300e3)]
    reached, tokens, ratio, paired = report.match_cells(groups[0.4, 'excess_k60'], groups[0.4, 'clm'])
    half = 12.706 * statistics.stdev([150, 300]) / 2 ** 0.5  # t(1) quantile, in thousands of tokens
    assert reached == '2/2' and tokens == f'225 ± {half:.0f}k' and ratio.startswith('2.00 ±')
    assert paired == '1.00'  # only CLM's seed 2 reaches 0.6 (at 300k), as excess's seed 2 does: one pair
    assert report.match_cells(groups[0.4, 'random_k60'], groups[0.4, 'clm']) == ['0/1', '-', '-', '-']
    assert report.clm_cells(groups[0.4, 'clm']) == ['2/2', '400 ± 0k', '-', '-']  # each seed's final first reached at 400k
    text = report.report(tmp_path, 0.4, 0.6)
    assert '| 0.4 | excess_k60 | 2 | 0.850 ± 0.635 | 0.425 ± 0.318 |' in text and (tmp_path / 'compare.md').exists()



def test_clopper_pearson_and_fisher_equal_hand_computations():
    lo, hi = stats.clopper_pearson(0, 10)  # x = 0: upper solves (1 - p)^10 = 0.025
    assert lo == 0 and hi == pytest.approx(1 - 0.025 ** 0.1, abs=1e-9)
    assert stats.clopper_pearson(10, 10) == (pytest.approx(0.025 ** 0.1, abs=1e-9), 1.0)
    lo, hi = stats.clopper_pearson(1, 2)  # 1 - (1 - p)^2 = 0.025 and 1 - p^2 = 0.025
    assert (lo, hi) == (pytest.approx(1 - 0.975 ** 0.5, abs=1e-9), pytest.approx(0.975 ** 0.5, abs=1e-9))
    assert stats.clopper_pearson(3, 17) == (pytest.approx(0.03799, abs=1e-5), pytest.approx(0.43432, abs=1e-5))  # R's binom.test
    # 3 of 17 failed against 0 of 11: the 3 failures all among the 17, C(17, 3) / C(28, 3) = 680 / 3276
    assert stats.fisher_one_sided(3, 17, 0, 11) == pytest.approx(680 / 3276) == pytest.approx(0.2076, abs=1e-4)
    assert stats.fisher_one_sided(5, 5, 0, 5) == pytest.approx(1 / 252)      # C(10, 5) tables, one this extreme
    assert stats.fisher_one_sided(2, 3, 1, 3) == pytest.approx((3 * 3 + 1) / 20)  # P(X >= 2), X ~ H(6, 3, 3)
    assert stats.fisher_one_sided(0, 4, 2, 4) == 1.0


def test_control_report_counts_failures_tokens_and_byte_roles(tmp_path):
    """A hand-made control study at noise 0.4: SLM fails on 2 of 3 seeds, CLM and the control on none.
    trap_accuracy = accuracy makes non-trap exact match equal to it: (0.2 at 100k, 0.6 at 200k) reaches 0.5
    at 175k. Roles (counted since the run began: the last point's are the run's): 'a' 400 tokens, 80 selected,
    'b' 100 and 60; the operands pooled: 140 of 500 (0.28), excess (400 x -0.05 + 100 x 0.15) / 500 = -0.01,
    of the selected (80 x 0.2625 + 60 x 0.25) / 140 = 36 / 140."""
    roles = [{'a': {'tokens': 100, 'selected': 0.5, 'excess': 0.1, 'excess_selected': 0.3}},
             {'a': {'tokens': 400, 'selected': 0.2, 'excess': -0.05, 'excess_selected': 0.2625},
              'b': {'tokens': 100, 'selected': 0.6, 'excess': 0.15, 'excess_selected': 0.25},
              'noise_line': {'tokens': 50, 'selected': 0.0, 'excess': 1.0, 'excess_selected': None}}]

    def write(arm, seed, points, with_roles=True):
        folder = tmp_path / 'noise40' / f'{arm}_s{seed}'
        folder.mkdir(parents=True)
        curve = [{'tokens': 1000 * t, 'accuracy': a, 'trap_accuracy': a, 'val_loss_clean': 1.0, 'selection': {},
                  **({'roles': r} if with_roles else {})} for (t, a), r in zip(points, roles)]
        (folder / 'curve.jsonl').write_text(''.join(json.dumps(p) + '\n' for p in curve))
        (folder / 'eval.json').write_text(json.dumps({'noise': 0.4, 'arm': arm, 'seed': seed, **curve[-1]}))
    learns, fails = [(100, 0.2), (200, 0.6)], [(100, 0.05), (200, 0.1)]
    for seed in (1, 2, 3):
        write('clm', seed, [(100, 0.1), (200, 0.5)] if seed < 3 else learns, with_roles=False)  # recorded before roles
        write('excess_k60', seed, learns if seed == 1 else fails)
        write('slm_coin_control_k60', seed, learns)
    groups = report.control_groups(tmp_path, 0.4, 0.6)
    assert list(groups) == ['clm', 'excess', 'slm_coin_control'] and [report.failed(r) for r in groups['excess']] == \
        [False, True, True]
    assert report.tokens_to_nontrap(groups['excess'][0]) == pytest.approx(175e3)
    assert report.tokens_to_nontrap(groups['clm'][0]) == pytest.approx(200e3)
    n, sel, excess, excess_sel = report.role_totals(groups['excess'][0])['a']
    assert (n, sel, excess, excess_sel) == (400, pytest.approx(0.2), pytest.approx(-0.05), pytest.approx(0.2625))
    assert report.role_totals(groups['excess'][0])['operands'] == (500, pytest.approx(0.28), pytest.approx(-0.01),
                                                                   pytest.approx(36 / 140))
    assert report.role_totals(groups['clm'][0]) == {}
    text = report.control_report(tmp_path, 0.4, 0.6)
    assert '| excess | 3 | 2 | 0.667 | [0.094, 0.992] |' in text and '| slm_coin_control | 3 | 0 | 0.000 | [0.000, 0.708] |' in text
    assert '| excess > slm_coin_control | 2/3 vs 0/3 | 0.2000 |' in text  # C(4, 1) / C(6, 3) = 4 / 20
    assert '| excess | 1/3 | 175 |' in text and '| slm_coin_control | 3/3 | 175 ± 0 |' in text
    assert '| slm_coin_control - clm | 3 | -17 ± 36 | 0.1835 |' in text  # -25, -25, 0: t = -2 on 2 df
    assert '| a | 0.200 | 0.200 | -0.050 / 0.263 | -0.050 / 0.263 |' in text and 'sel clm' not in text
    assert '| operands | 0.280 | 0.280 | -0.010 / 0.257 | -0.010 / 0.257 |' in text
    assert '| noise_line | 0.000 | 0.000 | 1.000 / - | 1.000 / - |' in text
    assert (tmp_path / 'control.md').read_text() == text + '\n'


@pytest.mark.parametrize('content', ['{"trunc', '[1, 2]', '{"noise": 0.4}'])
def test_a_damaged_eval_json_is_refused_in_one_line_before_any_training(mathmix, tmp_path, content):
    """Truncated, not an object, or missing keys: one line naming the file and the fix, exit 2, the file kept."""
    cfg = slm_cfg(mathmix, tmp_path / 'out', cls=study.StudyConfig, noise_sweep=(), k_sweep=())
    paths = slm.get_paths(cfg)
    arm = study.arm_config(cfg, 0.4, 'excess', 0.6, cfg.seed)
    path = paths.run_dir(arm) / 'eval.json'
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(DataError, match=f'{re.escape(str(path))} is .*: delete it and rerun the study'):
        study.arm_finished(path.parent, study.arm_args(arm))  # the plan asks whether the arm is done
    with pytest.raises(DataError, match=re.escape(str(path))):
        report.load_runs(tmp_path / 'out')  # --stage=compare reads it too
    with pytest.raises(DataError, match=re.escape(str(path))):  # --stage=all: before the reference trains
        study.stage_all(cfg, paths)
    out = run_script('-m', 'studies.slm', f'--out_dir={tmp_path / "out"}', f'--mathmix_dir={mathmix}', '--noise=0.4',
                     '--noise_sweep=()', '--k_sweep=()', '--model=tiny', '--n_head=2', '--n_embd=32', f'--block_size={T}')
    assert out.returncode == 2 and out.stderr.count('\n') == 1 and str(path) in out.stderr, out.stderr
    assert path.read_text() == content and not (path.parent / 'ckpt.pt').exists()


def test_damaged_reference_eval_curve_and_problems_are_refused(mathmix, tmp_path):
    cfg = slm_cfg(mathmix, tmp_path)
    paths = slm.get_paths(cfg)
    save_ref(random_gpt(5), paths.ref_ckpt)
    (paths.ref_ckpt.parent / 'eval.json').write_text('{"accuracy": 1.0}')  # a hand edit: no checksum, no scores
    with pytest.raises(DataError, match='ref/eval.json is damaged .*delete it'):
        study.reference_eval(cfg, paths)
    (tmp_path / 'curve.jsonl').write_text('{"tokens": 1\n')
    with pytest.raises(DataError, match='curve.jsonl is missing or holds no eval point'):
        report.read_curve(tmp_path / 'curve.jsonl')
    (tmp_path / 'eval.jsonl').write_text('[1]\n')
    with pytest.raises(DataError, match='eval.jsonl is damaged'):
        fewshot.load_problems(tmp_path / 'eval.jsonl')
    arm = tmp_path / 'noise40' / 'x_s0' / 'eval.json'  # every key there, but an arm the report does not know
    arm.parent.mkdir(parents=True)
    arm.write_text(json.dumps({'tokens': 1, 'accuracy': 0.5, 'trap_accuracy': 0.5, 'val_loss_clean': 1.0, 'noise': 0.4,
                               'arm': 'bogus_k60', 'seed': 0, 'selection': {}}))
    with pytest.raises(DataError, match="arm 'bogus_k60' is none of"):
        report.load_runs(tmp_path)
    good = {**json.loads(arm.read_text()), 'arm': 'excess_k60'}
    for damage, says in (({'selection': {'clean': 'x'}}, 'selection rates are not all numbers'),
                         ({'accuracy': float('nan')}, r'damaged \(no valid accuracy\)'), ({'seed': True}, r'no valid seed')):
        arm.write_text(json.dumps({**good, **damage}))  # NaN and true parse as JSON, and would reach a mean
        with pytest.raises(DataError, match=says):
            report.load_runs(tmp_path)


@pytest.mark.parametrize('damage', ['lone surrogate', 'not utf-8', 'ragged context', 'answer not a string'])
def test_an_eval_jsonl_with_a_lone_surrogate_or_a_bad_byte_is_refused_in_one_line(mathmix, tmp_path, damage):
    """What prepare.py writes is checked field by field: a \\ud800 escape (which .encode() of the prompt would
    raise on, mid-eval), a byte that is not UTF-8, contexts of unequal length (the prompts are batched) or a
    field of another type is a damaged file, one line naming the fix."""
    lines = (mathmix / 'eval' / 'eval.jsonl').read_text().splitlines()
    first = json.loads(lines[0])
    if damage == 'lone surrogate':
        first['question'] = '\ud800' + first['question'][1:]
    elif damage == 'ragged context':
        first['context'] = first['context'][mm.LINE:]
    elif damage == 'answer not a string':
        first['answer'] = int(first['answer'])
    head = json.dumps(first).encode().replace(b'+', b'+\xff' if damage == 'not utf-8' else b'+', 1)
    (tmp_path / 'eval.jsonl').write_bytes(head + b'\n' + '\n'.join(lines[1:]).encode() + b'\n')
    with pytest.raises(DataError, match=r'eval.jsonl is damaged \(not lines of mathmix problems: .*\): delete it'):
        fewshot.load_problems(tmp_path / 'eval.jsonl')
    assert len(fewshot.load_problems(mathmix / 'eval' / 'eval.jsonl')) == len(lines)  # what prepare.py wrote loads


def test_a_folder_for_ref_ckpt_or_a_file_for_mathmix_dir_is_refused(tmp_path):
    with pytest.raises(ConfigError, match='--ref_ckpt=.* is a folder: give the checkpoint file'):
        slm.SLMConfig(stage='train', ref_ckpt=str(tmp_path))
    for key in ('ref_ckpt', 'mathmix_dir'):
        with pytest.raises(ConfigError, match=f'--{key} is blank'):
            slm.SLMConfig(**{key: ' '})
    (tmp_path / 'file').write_text('')
    with pytest.raises(DataError, match='is a file, not a folder: give the folder'):
        mm.ensure_prepared(str(tmp_path / 'file'), [0.2])
    out = run_script('slm.py', '--stage=train', f'--ref_ckpt={tmp_path}', f'--out_dir={tmp_path / "out"}')
    assert out.returncode == 2 and 'is a folder: give the checkpoint file' in out.stderr, out.stderr


# ----- config -----------------------------------------------------------------------------------------

def test_config_refuses_bad_values():
    run_bad = (dict(k=0.0), dict(k=1.5), dict(noise=1.0), dict(budget=0.0), dict(select_by='loss'), dict(ref_mode='lazy'),
               dict(block_size=64), dict(model_type='t5'), dict(schedule='wsd', branch_budgets=(1, 2)),
               dict(select='sign'), dict(select='coin_control', select_by='random'), dict(select='coin_control', k=1.0),
               dict(stage='all'))
    study_bad = (dict(k_sweep=(0.5, 0.0)), dict(noise_sweep=(-0.1,)), dict(arms='clm,foo'), dict(seeds=0),
                 dict(gate_ref=1.5), dict(stage='train'), dict(run_dir='x'), dict(overwrite=True))
    for cls, bads in ((slm.SLMConfig, run_bad), (study.StudyConfig, run_bad[:-1] + study_bad)):
        for bad in bads:
            with pytest.raises(ConfigError):
                cls(**bad)


def test_a_stage_gets_only_its_keys(monkeypatch, tmp_path):
    # a training-recipe key on a stage that trains no arm is refused in one line
    for cls, stage in ((slm.SLMConfig, 'ref'), (slm.SLMConfig, 'score'), (study.StudyConfig, 'compare'),
                       (study.StudyConfig, 'export')):
        with pytest.raises(ConfigError, match=f'--arch, --lr, --weight_decay: read only by the stages that train arms.*--stage={stage}'):
            cls(stage=stage, weight_decay=0.2, arch='drop', lr=1e-3)
    slm.SLMConfig(stage='train', weight_decay=0.2, arch='drop')
    study.StudyConfig(stage='all', weight_decay=0.2, arch='drop')
    slm.SLMConfig(stage='ref', budget=5e5, n_embd=48, ref_lr=1e-3)  # budget: the arms', ignored here (documented)
    # the reference run: the shape and run keys, ref_budget, ref_lr, the clean corpus; TrainConfig's recipe
    runs = []
    monkeypatch.setattr(train, 'train', lambda cfg, objective=None: runs.append((cfg, objective)))
    cfg = slm.SLMConfig(out_dir=str(tmp_path), weight_decay=0.2, arch='drop', optimizer='lion', n_embd=48, ref_budget=3e5,
                        lr=1e-3, ref_lr=4e-3)
    slm.stage_ref(cfg, slm.get_paths(cfg))
    (ref, objective), = runs
    assert type(ref) is train.TrainConfig and objective is None
    assert (ref.weight_decay, ref.arch, ref.optimizer, ref.lr) == (train.TrainConfig.weight_decay, 'full', 'adamw', 4e-3)
    assert (ref.n_embd, ref.n_layer, ref.block_size, ref.batch_size) == (48, cfg.n_layer, cfg.block_size, cfg.batch_size)
    assert (ref.budget, ref.budget_unit, ref.out_dir) == (3e5, 'tokens', str(tmp_path / 'ref'))
    assert ref.dataset == str(slm.get_paths(cfg).ref_data)


def test_quick_swaps_in_small_settings_but_explicit_keys_win():
    quick = parse(study.StudyConfig, ['--quick=True'])
    assert (quick.budget, quick.seeds, quick.arms, quick.gate_ref, quick.noise_sweep) == (1e5, 2, 'clm,excess,oracle', 0.0, ())
    mine = parse(study.StudyConfig, ['--quick=True', '--budget=2e5', '--seeds=3', '--gate_ref=0.5'])
    assert (mine.budget, mine.seeds, mine.gate_ref, mine.arms) == (2e5, 3, 0.5, 'clm,excess,oracle')
    full = parse(study.StudyConfig, [])
    assert (full.budget, full.seeds, full.gate_ref, full.gate_oracle, full.noise, full.noise_sweep, full.k_sweep) == \
        (1e6, 5, 0.8, 0.5, 0.2, (0.0, 0.4), (0.4, 0.8))
    assert full.arms.split(',') == ['clm', 'excess', 'reference', 'train', 'random', 'oracle']


# ----- end to end -------------------------------------------------------------------------------------

class CutAt(slm.SelectiveLM):
    """SLM, but Ctrl-C arrives when the loop asks for step `cut` + 1's batch."""
    cut, wraps_objective = None, True  # the run's method stays slm.SelectiveLM

    def __call__(self, model, data, ctx):
        if ctx.step == self.cut:
            raise KeyboardInterrupt
        return super().__call__(model, data, ctx)


def test_resume_trims_the_accuracy_curve_and_continues_it_exactly(mathmix, tmp_path):
    """Online reference (charged per step), an eval every 2 steps with the exact-match curve; Ctrl-C
    after step 5 (its eval is saved), a curve point that a kill between eval and checkpoint leaves
    behind, then a resume: that point is dropped, and the rest matches the uninterrupted run."""
    cfg = slm_cfg(mathmix, tmp_path, ref_mode='online', budget_unit='iters', budget=8, eval_interval=2,
                  sample_tokens=0, stage='train', select_by='oracle')
    paths = slm.get_paths(cfg)
    save_ref(random_gpt(5), paths.ref_ckpt)
    make = lambda name, **kw: dataclasses.replace(cfg, out_dir=str(tmp_path / name), dataset=str(paths.corpus(0.4)), **kw)  # noqa: E731
    full = train.train(make('full'), slm.SelectiveLM(make('full'), paths))
    assert full['spent']['scored_examples'] == 8 * cfg.batch_size  # one reference forward per trained example
    CutAt.cut = 5
    assert train.train(make('cut'), CutAt(make('cut'), paths))['interrupted']
    curve = tmp_path / 'cut' / 'curve.jsonl'
    with open(curve, 'a') as f:
        f.write(json.dumps({'step': 6, 'stale': True}) + '\n')
    resumed = train.train(make('cut', init_from='resume'), slm.SelectiveLM(make('cut', init_from='resume'), paths))
    assert resumed['val_loss'] == full['val_loss']
    read = lambda name: [json.loads(line) for line in (tmp_path / name / 'curve.jsonl').read_text().splitlines()]  # noqa: E731
    got, want = read('cut'), read('full')
    assert [p['step'] for p in got] == [2, 4, 5, 6, 8] and [p['step'] for p in want] == [2, 4, 6, 8]
    assert all('accuracy' in p and 'trap_accuracy' in p for p in got) and want[-1]['selection']['wrong_digit'] == 0.0
    assert [p for p in got if p['step'] != 5] == want


def test_a_stopped_arm_exits_130_naming_the_resume_and_writes_no_eval(mathmix, tmp_path, monkeypatch, capsys):
    """Ctrl-C inside an arm's training: its checkpoint is saved, `python slm.py --stage=train` says in one line
    how to continue and exits 130 (was a bare "interrupted"), and no eval.json passes the stopped arm off as run:
    not even an old one, when the stopped run was an --overwrite=True rerun of a finished arm."""
    cfg = slm_cfg(mathmix, tmp_path, ref_mode='online', budget_unit='iters', budget=8, eval_interval=2,
                  sample_tokens=0, stage='train', select_by='oracle', overwrite=True)
    paths = slm.get_paths(cfg)
    save_ref(random_gpt(5), paths.ref_ckpt)
    paths.run_dir(cfg).mkdir(parents=True)
    (paths.run_dir(cfg) / 'eval.json').write_text('{"accuracy": 1.0}')  # the finished arm this rerun replaces
    CutAt.cut = 3
    monkeypatch.setattr(slm, 'SelectiveLM', CutAt)
    with pytest.raises(SystemExit) as stop:
        cli(lambda _: slm.stage_train(cfg, paths), slm.SLMConfig, [])
    err, folder = capsys.readouterr().err.strip().splitlines(), paths.run_dir(cfg)
    assert stop.value.code == 130 and err == [f'{folder} stopped by SIGINT, its checkpoint saved: rerun the command with '
                                              '--init_from=resume to continue it (exit 130 / 143: not finished, no eval.json)']
    assert (folder / 'ckpt.pt').exists() and not (folder / 'eval.json').exists()


def test_quick_pipeline_runs_end_to_end(tmp_path, capsys):
    """The study's --quick as a process, as CI runs it (at test size: one noise level, two seeds); then the
    same command again in-process: every stage is finished, nothing trains. prepare.py is deterministic."""
    data, out = tmp_path / 'mathmix', tmp_path / 'out'
    prep = ['--n_ref_docs=60', '--n_train_docs=60', '--noise_levels=(0.2,)']
    cli(prepare, PrepareConfig, [f'--out_dir={data}', *prep])
    argv = ['--quick=True', f'--mathmix_dir={data}', f'--out_dir={out}', '--n_layer=1', '--n_embd=32', '--n_head=2',
            f'--block_size={T}', '--batch_size=4', '--budget=1152', '--ref_budget=1152', '--eval_interval=4',
            '--eval_batches=2', '--compile_loss=False', '--peak_flops=1e12']
    r = run_script('-m', 'studies.slm', *argv, env={'OMP_NUM_THREADS': '1'}, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"gate: the reference model's held-out exact match \d\.\d+, needs >= 0: pass", r.stdout)
    for run in ('oracle_s1337', 'clm_s1337', 'excess_k60_s1337', 'excess_k60_s1338'):
        result = json.loads((out / 'noise20' / run / 'eval.json').read_text())
        assert 0 <= result['accuracy'] <= 1 and result['val_loss_clean'] > 0 and result['tokens'] == 1152
        curve = [json.loads(line) for line in (out / 'noise20' / run / 'curve.jsonl').read_text().splitlines()]
        assert [p['step'] for p in curve] == [4, 8]
    sel = json.loads((out / 'noise20' / 'excess_k60_s1337' / 'eval.json').read_text())['selection']
    assert set(sel) == set(mm.KINDS) and 0 < sel['clean'] < 1
    side = json.loads((out / 'ref' / 'ckpt_ref_loss_noise20.json').read_text())['identity']  # beside the reference
    assert side['block_size'] == T and side['tokenizer'] == 'byte'
    assert re.search(r'\| 0\.2 \| oracle \| 2 \|.*\n\| 0\.2 \| clm \| 2 \|.*\n\| 0\.2 \| excess_k60 \| 2 \|', r.stdout), r.stdout[-1500:]
    assert (out / 'compare.md').exists()
    capsys.readouterr()
    trained = re.compile(r'^\[\d+/\d+\] .*: done: ', re.M)  # the plan's line as a run ends
    cli(study.main, study.StudyConfig, argv)
    assert not trained.search(capsys.readouterr().out)  # nothing trained again
    with pytest.raises(SystemExit) as stop:  # another reference: it and the runs again, one seed of them
        cli(study.main, study.StudyConfig, [*argv, '--ref_budget=1728', '--seeds=1', '--jobs=1'])
    got = capsys.readouterr()
    assert len(trained.findall(got.out)) == 4 and json.loads((out / 'ref' / 'eval.json').read_text())['tokens'] == 1728
    # the second seed's runs were trained under the old reference: the report names them, never averages them in
    assert stop.value.code == 2 and re.search(r'clm_s1337 and \S+clm_s1338 are both clm at noise 0.2 but were run with '
                                              r'other --ref_budget \(1728.0, 1152.0\)', got.err), got.err
    cli(prepare, PrepareConfig, [f'--out_dir={tmp_path / "again"}', *prep])
    for rel in ('noise20/byte/train.bin', 'noise20/byte/kinds.bin', 'ref/byte/val.bin', 'eval/eval.jsonl'):
        assert (data / rel).read_bytes() == (tmp_path / 'again' / rel).read_bytes()


def test_control_quick_study_runs_all_three_arms_end_to_end(tmp_path):
    """`python -m studies.slm control --quick=True` as a process at test size: the reference, the oracle's gate
    run, clm, SLM and the coin control on two paired seeds at noise 0.4, then control.md."""
    data, out = tmp_path / 'mathmix', tmp_path / 'out'
    cli(prepare, PrepareConfig, [f'--out_dir={data}', '--n_ref_docs=60', '--n_train_docs=60', '--noise_levels=(0.4,)'])
    argv = ['--quick=True', f'--mathmix_dir={data}', f'--out_dir={out}', '--n_layer=1', '--n_embd=32', '--n_head=2',
            f'--block_size={T}', '--batch_size=4', '--budget=1152', '--ref_budget=1152', '--eval_interval=4',
            '--eval_batches=2', '--compile_loss=False', '--peak_flops=1e12']
    r = run_script('-m', 'studies.slm', 'control', *argv, env={'OMP_NUM_THREADS': '1'}, timeout=200)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.parent.name for p in out.glob('noise40/*/eval.json')) == [
        'clm_s1337', 'clm_s1338', 'excess_k60_s1337', 'excess_k60_s1338', 'oracle_s1337',
        'slm_coin_control_k60_s1337', 'slm_coin_control_k60_s1338']
    control = json.loads((out / 'noise40' / 'slm_coin_control_k60_s1338' / 'eval.json').read_text())
    assert control['arm'] == 'slm_coin_control_k60' and control['run_config']['select'] == 'coin_control'
    curve = [json.loads(line) for line in (out / 'noise40' / 'slm_coin_control_k60_s1338' / 'curve.jsonl').read_text().splitlines()]
    assert [p['step'] for p in curve] == [4, 8] and sum(p['roles']['+']['tokens'] for p in curve) > 0
    assert all(0 <= st['selected'] <= 1 for p in curve for st in p['roles'].values())
    text = (out / 'control.md').read_text()
    for arm in ('clm', 'excess', 'slm_coin_control'):
        assert re.search(rf'\| {arm} \| 2 \| [0-2] \| ', text), text  # its failures, with an exact interval
    assert '| excess > slm_coin_control |' in text and '| slm_coin_control - excess |' in text
    assert re.search(r'\| operands \| (\d\.\d{3} \| ){3}', text), text  # the operands' selection rate in each arm
    assert 'the coin control at noise 0.4' in r.stdout


def test_a_row_of_two_runs_of_one_seed_or_of_two_configurations_is_refused(tmp_path):
    """The report averages one run a seed, all of one configuration: a run folder copied under another name
    (it made n=6 of 5 seeds), or a run of other keys beside the study's (a study resumed with another --lr and
    fewer seeds keeps its old runs), is refused in one line naming both folders and the key."""
    import shutil
    records = Path(__file__).resolve().parents[1] / 'out' / 'records' / 'slm-2026-11-30'
    rows = report.load_runs(records)
    assert all(len({r['seed'] for r in runs}) == len(runs) for runs in rows.values())  # the committed study passes
    copy = tmp_path / 'study'
    shutil.copytree(records / 'noise20', copy / 'noise20')
    shutil.copytree(copy / 'noise20' / 'clm_s1337', copy / 'noise20' / 'clm_s1337b')
    with pytest.raises(DataError, match=r'clm_s1337 and .*clm_s1337b are both clm at noise 0.2, seed 1337: a row takes '
                                        r'one run a seed: remove one'):
        report.load_runs(copy)
    shutil.rmtree(copy / 'noise20' / 'clm_s1337b')
    path = copy / 'noise20' / 'clm_s1338' / 'eval.json'
    run = json.loads(path.read_text())
    run['run_config']['lr'] *= 2
    path.write_text(json.dumps(run))
    with pytest.raises(DataError, match=r'clm_s1337 and .*clm_s1338 are both clm at noise 0.2 but were run with other '
                                        r'--lr \(.*\): a row averages one configuration'):
        report.load_runs(copy)
