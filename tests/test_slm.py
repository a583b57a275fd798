"""slm.py (Rho-1 SLM) and data/mathmix: selection and loss against hand computations, the reference-loss
cache against direct recomputation, the answer parser and decoder (data/mathmix/fewshot.py), the data's
held-out split, config scoping, an interrupted run's resume, a --quick pipeline."""
import dataclasses
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import slm
import train
from budget import Budget
from conftest import run_script
from configurator import ConfigError, parse
from data.loader import DataError, get_examples, num_examples
from data.mathmix import fewshot
from data.mathmix.prepare import BOILERPLATE, CLEAN, PROSE, PrepareConfig, prepare
from model import GPT, GPTConfig

T = 64


@pytest.fixture(scope='module')
def mathmix(tmp_path_factory):
    """A small mathmix (ref, train + noise.bin, eval.jsonl) under a temporary folder."""
    root = tmp_path_factory.mktemp('mathmix')
    prepare(PrepareConfig(n_ref_docs=60, n_train_docs=60, n_eval=6, out_dir=str(root)))
    return root


def slm_cfg(mathmix, out_dir, **kw):
    base = dict(out_dir=str(out_dir), mathmix_dir=str(mathmix), model='tiny', block_size=T, batch_size=4,
                compile_loss=False, max_new_tokens=24, eval_batches=2, device='cpu')
    return slm.SLMConfig(**{**base, **kw})


def random_gpt(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=T, vocab_size=256, n_layer=2, n_head=2, n_embd=32, compile_loss=False))


def save_ref(model, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    train.save_checkpoint(path, {'model': model.state_dict(), 'model_args': dataclasses.asdict(model.config)})


def run_context(budget):
    """The loop's RunContext over a stand-in trainer that holds only a budget (CPU, one rank)."""
    rt = train.setup_device(train.TrainConfig(device='cpu'))
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


def test_selection_scores_rank_by_the_paper_criteria():
    train_loss = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    ref_loss = torch.tensor([[3.5, 0.2, 0.5, 2.5]])
    # excess = 0.5, 0.8, 2.5, -0.5 -> top 2 = tokens 2, 1
    assert slm.top_k_mask(slm.selection_score('excess', train_loss, ref_loss), 0.5).tolist() == [[0, 1, 1, 0]]
    # lowest reference loss: 0.2 (1), 0.5 (2)
    assert slm.top_k_mask(slm.selection_score('reference', train_loss, ref_loss), 0.5).tolist() == [[0, 1, 1, 0]]
    # highest training loss: 4 (0), 3 (2)
    assert slm.top_k_mask(slm.selection_score('train', train_loss, ref_loss), 0.5).tolist() == [[1, 0, 1, 0]]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    random = slm.selection_score('random', train_loss, ref_loss, g1)
    assert torch.equal(random, torch.rand((1, 4), generator=g2))


def test_loss_normalises_by_the_number_selected():
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    loss = slm.slm_loss(losses, mask)
    assert loss.item() == pytest.approx((1 + 3 + 8) / 3)  # not / 8 tokens, not / (0.6 * 8)
    loss.backward()
    assert torch.allclose(losses.grad, mask / 3)  # unselected tokens get no gradient at all


def objective_on(cfg, paths, model, x, y, ids, cache):
    obj = slm.SelectiveLM(cfg, paths)
    obj.noise, obj.cache = None, cache
    budget = Budget('iters', 10, None, lambda L: 1.0, x.size(1), len(x))
    return obj(model, FixedData(x, y, ids), run_context(budget))


def test_k_100_equals_plain_causal_lm(mathmix, tmp_path):
    cfg = slm_cfg(mathmix, tmp_path, k=1.0)
    model = random_gpt(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (4, T), generator=g), torch.randint(0, 256, (4, T), generator=g)
    ids = torch.arange(4) * T
    cache = np.random.default_rng(0).random(5 * T).astype(np.float16)  # any reference losses
    step = objective_on(cfg, slm.get_paths(cfg), model, x, y, ids, cache)
    clm = train.CausalLM(4)(model, FixedData(x, y, ids), None)
    assert abs(step.loss.item() - clm.loss.item()) < 1e-6
    assert step.examples == clm.examples == 4 and step.logs['selected_frac'].item() == 1.0


def test_objective_trains_on_the_top_k_by_excess_loss(mathmix, tmp_path):
    """Through the objective: the cache gives ref_loss for position id + t + 1, and the loss is the
    mean of model(x, y) over the round(k * B*T) tokens of largest train_loss - ref_loss."""
    cfg = slm_cfg(mathmix, tmp_path, k=0.25, batch_size=2)
    model = random_gpt(0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 256, (2, T), generator=g), torch.randint(0, 256, (2, T), generator=g)
    ids = torch.tensor([3 * T, 0])
    cache = np.random.default_rng(1).random(5 * T).astype(np.float16) * 6
    step = objective_on(cfg, slm.get_paths(cfg), model, x, y, ids, cache)
    with torch.no_grad():
        losses = model(x, y)
    ref = torch.tensor([[float(cache[int(i) + t + 1]) for t in range(T)] for i in ids])
    excess = (losses - ref).flatten().tolist()
    keep = sorted(range(2 * T), key=lambda j: (-excess[j], j))[:32]  # 0.25 * 128 tokens
    assert step.loss.item() == pytest.approx(sum(losses.flatten()[j].item() for j in keep) / 32, rel=1e-6)
    excess_kept = sum(excess[j] for j in keep) / 32
    assert step.logs['excess_selected'].item() == pytest.approx(excess_kept, rel=1e-5)


def test_selection_logs_rates_on_clean_and_noise_tokens(mathmix, tmp_path):
    obj = slm.SelectiveLM(slm_cfg(mathmix, tmp_path, k=0.5), None)
    obj.noise = np.array([9, 0, 1, 0, 4, 0, 2, 3, 0], dtype=np.uint8)  # kinds of stream positions 0..8
    ids = torch.tensor([0, 4])                                       # targets at positions 1-4 and 5-8
    mask = torch.tensor([[1., 1., 0., 0.], [1., 0., 0., 1.]])
    excess = torch.tensor([[2., 1., 0., -1.], [3., -2., -3., 4.]])
    logs = obj.selection_logs(excess, mask, ids)
    assert logs['sel_clean'].item() == 3 / 4 and logs['sel_noise'].item() == 1 / 4  # clean: 3 of 4 kept
    assert logs['excess_selected'].item() == pytest.approx((2 + 1 + 3 + 4) / 4)
    assert logs['excess_unselected'].item() == pytest.approx((0 - 1 - 2 - 3) / 4)
    rates = obj.selection_rates()
    assert rates == {'clean': 0.75, 'boilerplate': 1.0, 'wrong_arithmetic': 0.0, 'digit_run': 0.0, 'prose': 0.0,
                     'all_noise': 0.25}


# ----- the reference-loss cache -----------------------------------------------------------------------

def test_cache_lines_up_with_the_token_stream_and_a_stale_cache_is_refused(mathmix, tmp_path):
    cfg = slm_cfg(mathmix, tmp_path)
    paths = slm.get_paths(cfg)
    ref = random_gpt(5)
    save_ref(ref, paths.ref_ckpt)
    slm.build_cache(cfg, paths)
    cache = slm.load_cache(paths, T)
    tokens = np.memmap(paths.train_data / 'train.bin', dtype=np.uint16, mode='r')
    assert len(cache) == len(tokens) and cache[0] == 0
    for k in (0, 7, num_examples(tokens, T) - 1):  # recompute a few examples directly
        x, y = get_examples(tokens, [k * T], T)
        with torch.no_grad():
            want = ref(x, y)[0].numpy()
        got = cache[k * T + 1:k * T + T + 1].astype(np.float32)
        assert np.allclose(got, want, rtol=2e-3, atol=2e-3)  # float16
        assert y[0, 5] == tokens[k * T + 6]  # position id + t + 1 is the token y[t] predicts
    # online mode scores the same tokens as the cache, running the reference each step
    obj = slm.SelectiveLM(dataclasses.replace(cfg, ref_mode='online'), paths)
    obj.ref_model = ref
    x, y = get_examples(tokens, [7 * T], T)
    budget = Budget('iters', 10, None, lambda L: 1.0, T, 1)
    online = obj.reference_losses(x, y, torch.tensor([7 * T]), run_context(budget))
    assert np.allclose(online.numpy()[0], cache[7 * T + 1:8 * T + 1].astype(np.float32), atol=2e-3)
    assert budget.spent['scored_examples'] == 1  # charged as one forward-only pass
    # stale: another reference checkpoint, other data, another block size
    with pytest.raises(DataError, match='stale.*block_size'):
        slm.load_cache(paths, 2 * T)
    save_ref(random_gpt(6), paths.ref_ckpt)
    with pytest.raises(DataError, match='stale.*ref_ckpt_sha256'):
        slm.load_cache(paths, T)
    save_ref(ref, paths.ref_ckpt)
    slm.load_cache(paths, T)  # the same weights again: valid
    raw = (paths.train_data / 'train.bin').read_bytes()
    try:
        (paths.train_data / 'train.bin').write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
        with pytest.raises(DataError, match='stale.*data_sha256'):
            slm.load_cache(paths, T)
    finally:
        (paths.train_data / 'train.bin').write_bytes(raw)
    # the static "concentrated" mask for select_by='reference' comes from the same cache
    rates = slm.stage_export(dataclasses.replace(cfg, k=0.5), paths)
    mask = np.fromfile(paths.train_data / 'concentrated_k50.bin', dtype=np.uint8)
    assert len(mask) == len(tokens) and 0.45 < mask[1:].mean() < 0.55 and set(rates) >= {'clean'}


# ----- the eval parser and the greedy decoder --------------------------------------------------------

@pytest.mark.parametrize('text, answer', [
    (' 3 + 4 = 7. 7 - 2 = 5.\nAnswer: 5\n\n', '5'),
    (' 9 > 3, so the larger number is 9.\nAnswer: 9.\n', '9'),
    ('\nAnswer: -12', '-12'),
    ('Answer:007\nAnswer: 8\n', '7'),          # the first answer line counts; leading zeros do not matter
    ('  Answer: 42  \n', '42'),
    (' 3 + 4 = 7.\nAnswer: seven\n', None),     # malformed: counted wrong
    ('Answer: 4 2\n', None),
    ('Answer: 12abc\n', None),
    ('Answer: x\nAnswer: 5\n', None),          # a malformed first answer line is not rescued
    (' 1 1 1 1 1 1 1 1 1', None),              # no answer line
    ('Answers: 3\n', None),
    ('\ufffd\x00\x07Answer:\n', None),
    ('', None),
    (None, None),
])
def test_parse_answer(text, answer):
    assert fewshot.parse_answer(text) == answer


@pytest.mark.parametrize('stops', [False, True])
def test_greedy_completions_through_the_kv_cache_equal_full_recompute(monkeypatch, stops):
    """fewshot's decoding (model.generate with a stop rule, finished rows padded with -1) against argmax
    over the whole prefix at every step. stops=True: a stand-in rule that ends rows at different lengths
    (a random model rarely writes a finished answer), so rows leave the batch."""
    if stops:
        monkeypatch.setattr(fewshot, 'finished', lambda gen: len(gen) >= 3 + 5 * (gen[0] % 4))
    model = random_gpt(3).eval()
    prompts = torch.randint(0, 256, (6, 40), generator=torch.Generator().manual_seed(4))
    rt = train.setup_device(train.TrainConfig(device='cpu'))
    got = fewshot.greedy_completions(model, prompts, rt, 20)
    idx = prompts.clone()
    with torch.no_grad():
        for _ in range(20):
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], 1)
    for row, out in zip(idx, got):  # a row stops early only once its text says it is finished
        assert out == bytes(row[40:40 + len(out)].tolist()) and (len(out) == 20 or fewshot.finished(out))
        assert not any(fewshot.finished(out[:t]) for t in range(1, len(out)))  # and not later
    if stops:
        assert len({len(out) for out in got}) > 1


# ----- the data ---------------------------------------------------------------------------------------

def test_mathmix_noise_mask_and_held_out_problems(mathmix):
    train_bin = np.fromfile(mathmix / 'train' / 'byte' / 'train.bin', dtype=np.uint16)
    noise = np.fromfile(mathmix / 'train' / 'byte' / 'noise.bin', dtype=np.uint8)
    assert len(noise) == len(train_bin) and 0.2 < (noise > 0).mean() < 0.6
    text = lambda kind: bytes(train_bin[noise == kind].astype(np.uint8)).decode('utf-8', 'replace')  # noqa: E731
    assert 'Problem:' in text(CLEAN) and 'Answer:' in text(CLEAN)
    assert 'Copyright' not in text(CLEAN) and 'Home | Topics' not in text(CLEAN)
    assert 'Copyright' in text(BOILERPLATE) or 'Share this' in text(BOILERPLATE)
    assert 'Problem:' not in text(PROSE)
    ref_text = bytes(np.fromfile(mathmix / 'ref' / 'byte' / 'train.bin', dtype=np.uint16).astype(np.uint8)).decode()
    target_text = ref_text + text(CLEAN)  # the target-domain text a model trains on (noise aside)
    rows = [json.loads(line) for line in (mathmix / 'eval' / 'eval.jsonl').read_text().splitlines()]
    assert {r['family'] for r in rows} == {'addsub', 'mul', 'word', 'compare'}
    for r in rows:  # held-out templates: their wording up to the first number never occurs there
        assert r['prompt'].endswith(f"Problem: {r['question']}\nSolution:") and r['prompt'].count('Answer:') >= 3
        stem = re.split(r'\d', r['question'])[0]
        assert stem and (len(stem) < 4 or stem not in target_text), stem
        assert f"Problem: {r['question']}" not in target_text


def test_config_refuses_bad_values():
    for bad in (dict(k=0.0), dict(k=1.5), dict(select_by='loss'), dict(ref_mode='lazy'), dict(arms='clm,foo'),
                dict(block_size=64, max_new_tokens=40), dict(seeds=0), dict(model_type='t5'),
                dict(schedule='wsd', branch_budgets=(1, 2))):
        with pytest.raises(ConfigError):
            slm.SLMConfig(**bad)


def test_a_stage_gets_only_its_keys(monkeypatch, tmp_path):
    # a training-recipe key on a stage that trains no arm is refused in one line
    for stage in ('ref', 'score', 'eval', 'compare', 'export'):
        with pytest.raises(ConfigError, match=f'--arch, --lr: read only by the stages that train arms.*--stage={stage}'):
            slm.SLMConfig(stage=stage, lr=1e-3, arch='drop')
    slm.SLMConfig(stage='train', lr=1e-3, arch='drop')
    slm.SLMConfig(stage='ref', budget=5e5, n_embd=48)  # budget: the arms', ignored here (documented)
    # the reference run: the shape and run keys, ref_budget, the clean corpus; TrainConfig's recipe
    runs = []
    monkeypatch.setattr(train, 'train', lambda cfg, objective=None: runs.append((cfg, objective)))
    cfg = slm.SLMConfig(out_dir=str(tmp_path), lr=1e-3, arch='drop', optimizer='lion', n_embd=48, ref_budget=3e5)
    slm.stage_ref(cfg, slm.get_paths(cfg))
    (ref, objective), = runs
    assert type(ref) is train.TrainConfig and objective is None
    assert (ref.lr, ref.arch, ref.optimizer) == (train.TrainConfig.lr, 'full', 'adamw')
    assert (ref.n_embd, ref.n_layer, ref.block_size, ref.batch_size) == (48, cfg.n_layer, cfg.block_size, cfg.batch_size)
    assert (ref.budget, ref.budget_unit, ref.out_dir) == (3e5, 'tokens', str(tmp_path / 'ref'))
    assert ref.dataset == str(slm.get_paths(cfg).ref_data)


# ----- end to end -------------------------------------------------------------------------------------

class CutAt(slm.SelectiveLM):
    """SLM, but Ctrl-C arrives when the loop asks for step `cut` + 1's batch."""
    cut = None

    def __call__(self, model, data, ctx):
        if ctx.step == self.cut:
            raise KeyboardInterrupt
        return super().__call__(model, data, ctx)


def test_resume_trims_the_accuracy_curve_and_continues_it_exactly(mathmix, tmp_path):
    """Online reference (charged per step), an eval every 2 steps with the few-shot curve; Ctrl-C after
    step 5 (its eval is saved), a curve point that a kill between eval and checkpoint leaves behind,
    then a resume: that point is dropped, and the rest matches the uninterrupted run."""
    cfg = slm_cfg(mathmix, tmp_path, ref_mode='online', budget_unit='iters', budget=8, eval_interval=2,
                  curve_problems=1, sample_tokens=0, stage='train')
    paths = slm.get_paths(cfg)
    save_ref(random_gpt(5), paths.ref_ckpt)
    make = lambda name, **kw: dataclasses.replace(cfg, out_dir=str(tmp_path / name), dataset=str(paths.train_data), **kw)  # noqa: E731
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
    assert all('accuracy' in p for p in got)
    assert [p for p in got if p['step'] != 5] == want


def test_quick_pipeline_runs_end_to_end(tmp_path):
    data, out = tmp_path / 'mathmix', tmp_path / 'out'
    prep = run_script('data/mathmix/prepare.py', f'--out_dir={data}', '--n_ref_docs=60', '--n_train_docs=60', '--n_eval=6')
    assert prep.returncode == 0, prep.stderr
    r = run_script('slm.py', '--quick=True', f'--mathmix_dir={data}', f'--out_dir={out}', '--model=tiny',
                   '--block_size=128', '--batch_size=4', '--budget=4096', '--ref_budget=4096', '--eval_interval=4',
                   '--eval_problems=3', '--curve_problems=1', '--max_new_tokens=48', '--eval_batches=2',
                   '--compile_loss=False', env={'OMP_NUM_THREADS': '1'}, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    for run in ('ref', 'clm_s1337', 'excess_k60_s1337'):
        result = json.loads((out / run / 'eval.json').read_text())
        assert result['n_problems'] == 12 and set(result['per_family']) == {'addsub', 'mul', 'word', 'compare'}
        assert 0 <= result['accuracy'] <= 1 and result['val_loss_clean'] > 0
    side = json.loads((data / 'train' / 'byte' / 'ref_loss.json').read_text())
    assert side['block_size'] == 128 and side['tokenizer'] == 'byte'
    excess = json.loads((out / 'excess_k60_s1337' / 'eval.json').read_text())
    assert excess['tokens'] == 4096 and 0 < excess['selection']['clean'] < 1
    curve = [json.loads(line) for line in (out / 'excess_k60_s1337' / 'curve.jsonl').read_text().splitlines()]
    assert [p['step'] for p in curve] == [4, 8] and all('accuracy' in p for p in curve)
    assert re.search(r'\| clm \| 1 \|.*\n\| excess_k60 \| 1 \|', r.stdout), r.stdout[-1500:]
    assert (out / 'compare.md').exists()
    # deterministic data: the same seed gives the same bytes
    prep2 = run_script('data/mathmix/prepare.py', f'--out_dir={tmp_path / "again"}', '--n_ref_docs=60',
                       '--n_train_docs=60', '--n_eval=6')
    assert prep2.returncode == 0
    for rel in ('train/byte/train.bin', 'train/byte/noise.bin', 'ref/byte/val.bin', 'eval/eval.jsonl'):
        assert (data / rel).read_bytes() == (tmp_path / 'again' / rel).read_bytes()


def test_quick_swaps_in_small_settings_but_explicit_keys_win():
    quick = parse(slm.SLMConfig, ['--quick=True'])
    assert (quick.budget, quick.n_embd, quick.seeds, quick.arms) == (4e5, 96, 1, 'clm,excess')
    mine = parse(slm.SLMConfig, ['--quick=True', '--budget=1e5', '--seeds=3', f'--arms={slm.ALL_ARMS}'])
    assert (mine.budget, mine.n_embd, mine.seeds, mine.arms) == (1e5, 96, 3, slm.ALL_ARMS)
    full = parse(slm.SLMConfig, [])
    assert (full.budget, full.seeds, full.arms.split(',')) == (1e6, 3, ['clm', 'excess', 'reference', 'train', 'random'])
