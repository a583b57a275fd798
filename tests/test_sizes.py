"""Sizes against what they allocate: every count, fraction and seed of rho.py, slm.py, madpo.py, their studies
and the mathmix and reviews prepares is refused before anything is built, in one line that names the key, the
value, the limit and the fix, when it is beyond its real range (what a generator takes, a fraction that
selects nothing) or the memory it implies. The limits are checked at their edges, and each suggested fix is
checked to pass."""
import re

import numpy as np
import pytest

import madpo
import reward_model
import rho
import runs
import slm
from conftest import run_script
from configurator import ConfigError, UserError, parse
from data.loader import MAX_SEED, Batches
from data.mathmix import prepare as mathmix
from data.reviews import prepare as reviews
from studies import madpo as madpo_study
from studies import slm as slm_study

GIB = 2**30


def refused(cls, *argv):
    """The one-line message parse(cls, argv) refuses with."""
    with pytest.raises(ConfigError) as e:
        parse(cls, list(argv))
    assert '\n' not in str(e.value)
    return str(e.value)


def suggested(message, phrase=r'give (?:--\w+ )?(?:at most |<= |>= |a seed <= )?'):
    """The number a refusal's fix suggests."""
    return float(re.search(phrase + r'([\d,.]+)', message).group(1).rstrip('.').replace(',', ''))


@pytest.fixture
def free_gib(monkeypatch):
    """Every size check sees 1 GiB of free memory, so the limits are fixed numbers."""
    for module in (runs, mathmix, reviews, madpo_study, slm_study):
        monkeypatch.setattr(module, 'free_memory', lambda device: GIB)


# ----- seeds: what the generators take ---------------------------------------------------------------

def test_the_largest_seed_allowed_runs_the_data_order_and_two_more_overflow():
    """One limit (data.loader.MAX_SEED) for the loop's data order and the pairs' order, in every entry point."""
    tokens = np.arange(1000, dtype=np.uint16)
    batches = Batches(tokens, 8, MAX_SEED)
    batches.epoch = 1_000_002                                    # the last epoch the limit leaves room for
    assert len(batches.next_ids(4)) == 4
    with pytest.raises(ValueError, match='Overflow'):            # what an unchecked seed did: a traceback mid-run
        Batches(tokens, 8, MAX_SEED + 2).next_ids(4)
    for cls, extra in ((rho.RhoConfig, ()), (slm.SLMConfig, ('--stage=ref',)), (madpo.MadpoConfig, ())):
        message = refused(cls, *extra, f'--seed={MAX_SEED + 1}')
        assert '--seed' in message and (f'{MAX_SEED:,}' in message or str(MAX_SEED) in message), message
        assert parse(cls, [*extra, f'--seed={MAX_SEED}']).seed == MAX_SEED


def test_study_seeds_are_checked_like_a_runs():
    message = refused(slm_study.StudyConfig, f'--seed={MAX_SEED - 1}', '--seeds=5')
    assert 'reaches seed' in message and 'give --seeds <= 2' in message
    parse(slm_study.StudyConfig, [f'--seed={MAX_SEED - 1}', '--seeds=2'])
    message = refused(madpo_study.MadpoStudyConfig, f'--seeds=(0, {MAX_SEED + 1})')
    assert f'--seeds holds {MAX_SEED + 1}' in message
    assert 'must be >= 0' in refused(madpo.MadpoConfig, '--seed=-1')  # numpy's default_rng takes no negative seed


# ----- fractions that select nothing ----------------------------------------------------------------

def test_a_select_frac_that_selects_no_example_is_refused_with_the_smallest_that_selects_one():
    message = refused(rho.RhoConfig, '--mega_batch=64', '--select_frac=0.001')
    assert '--select_frac=0.001' in message and 'round(0.001 x 64) = 0' in message and '>= 0.01562 (1/64)' in message
    assert parse(rho.RhoConfig, ['--mega_batch=64', f'--select_frac={1 / 64}']).selection_sizes() == (64, 1)
    assert parse(rho.RhoConfig, ['--mega_batch=64', '--select_frac=0.008']).selection_sizes() == (64, 1)  # rounds to 1


@pytest.mark.parametrize('cls, key', [(slm.SLMConfig, 'k'), (slm_study.StudyConfig, 'k_sweep')])
def test_a_k_that_selects_no_token_is_refused_with_the_smallest_that_selects_one(cls, key):
    tokens = 8 * 72  # slm.py's --batch_size x --block_size
    value = '1e-7' if key == 'k' else '(0.5, 1e-7)'
    message = refused(cls, f'--{key}={value}')
    assert f'--{key}=1e-07' in message and f'of a micro-batch\'s {tokens} tokens' in message
    smallest = suggested(message)
    assert smallest == pytest.approx(1 / tokens, rel=1e-3) and round(smallest * tokens) == 1
    parse(cls, [f'--{key}={smallest!r}' if key == 'k' else f'--{key}=({smallest!r},)'])


def test_a_noise_level_between_whole_percents_is_refused_everywhere_it_names_a_corpus():
    for cls, key, value in ((slm.SLMConfig, 'noise', '0.201'), (slm_study.StudyConfig, 'noise_sweep', '(0.0, 0.201)'),
                            (mathmix.PrepareConfig, 'noise_levels', '(0.2, 0.201)')):
        message = refused(cls, f'--{key}={value}')
        assert '0.201 is not a whole percent' in message and 'noise20' in message and 'give 0.2' in message
    assert 'more than once' in refused(mathmix.PrepareConfig, '--noise_levels=(0.2, 0.2)')
    assert 'give 0' in refused(mathmix.PrepareConfig, '--noise_levels=(1e-7,)')  # would be the clean corpus's folder


def test_a_val_frac_that_leaves_a_split_empty_is_refused_before_generating():
    message = refused(reviews.PrepareConfig, '--val_frac=1e-5')
    assert '--val_frac=1e-05' in message and '[0.0001, 0.9999]' in message  # is_val's 1/10,000 steps
    message = refused(reviews.PrepareConfig, '--n_reviews=200', '--val_frac=0.001')
    assert '[0.005, 0.995]' in message                                     # one review of 200 at least
    parse(reviews.PrepareConfig, ['--n_reviews=200', '--val_frac=0.005'])


def test_a_holdout_frac_that_leaves_a_side_empty_is_refused_with_the_range_that_does_not():
    for frac, side in ((1e-7, 'none'), (0.9999999, 'all')):
        with pytest.raises(UserError, match=f'--holdout_frac={frac:g} puts {side} of the 1,000 training examples') as e:
            rho.split_examples(1000, frac)
        low, high = map(float, re.search(r'in \[(.*), (.*)\]', str(e.value)).groups())
        for fix in (low, high):  # either end of the suggested range splits the examples
            train_k, holdout_k = rho.split_examples(1000, fix)
            assert len(train_k) and len(holdout_k)


# ----- counts against their real range -------------------------------------------------------------

def test_madpo_pair_counts_stay_within_what_the_pairs_stage_writes():
    for key, of in (('po_pairs', 'n_pairs'), ('po_val_pairs', 'val_pairs')):
        message = refused(madpo.MadpoConfig, '--stage=po', f'--{of}=500', f'--{key}=501')
        assert f'--{key}=501 is more than the --{of}=500 pairs' in message and 'give at most 500' in message
        parse(madpo.MadpoConfig, ['--stage=po', f'--{of}=500', f'--{key}=500'])
        parse(madpo.MadpoConfig, ['--stage=pairs', f'--{of}=500'])  # a stage that reads no po key: the study's pairs run
    assert 'give at least 2' in refused(madpo.MadpoConfig, '--val_pairs=1', '--po_val_pairs=1')
    quick = parse(madpo_study.MadpoStudyConfig, ['--quick=True'])  # the smoke study's smaller pair counts agree
    assert quick.po_pairs <= quick.n_pairs and quick.po_val_pairs <= quick.val_pairs


def test_threads_and_il_doublings_beyond_what_works():
    cpus = __import__('os').cpu_count()
    assert f'give at most {cpus}' in refused(madpo.MadpoConfig, f'--threads={cpus + 1}')
    message = refused(rho.RhoConfig, '--il_doublings=5000')
    most = int(suggested(message))
    assert rho.RhoConfig(il_doublings=most).il_doublings == most
    assert np.isfinite(rho.RhoConfig().budget * 2.0 ** most)                       # the last IL run's budget is a float


def test_n_words_beyond_vaders_lexicon_is_refused_before_the_corpus_is_built():
    pytest.importorskip('vaderSentiment')
    with pytest.raises(ConfigError, match=r'--n_words=100,000: VADER\'s lexicon has \d+ positive and \d+ negative') as e:
        reviews.generated_documents(reviews.PrepareConfig(n_words=100_000))
    most = int(suggested(str(e.value)))
    assert len(list(reviews.generated_documents(reviews.PrepareConfig(n_words=most, n_reviews=100)))) == 100


# ----- counts against the memory they imply (1 GiB free) ----------------------------------------------

@pytest.mark.parametrize('cls, argv, key, bytes_each', [
    (mathmix.PrepareConfig, (), 'n_ref_docs', mathmix.DOC_BYTES),
    (mathmix.PrepareConfig, (), 'n_train_docs', mathmix.DOC_BYTES),
    (mathmix.PrepareConfig, (), 'n_context', mathmix.CONTEXT_BYTES * len(mathmix.EVAL_PAIRS)),
    (reviews.PrepareConfig, (), 'n_reviews', reviews.REVIEW_BYTES),
    (madpo.MadpoConfig, ('--val_pairs=2', '--po_val_pairs=2'), 'n_pairs', 8 * (24 + 13 * 72) + 1024),
    (madpo.MadpoConfig, (), 'n_eval', 8 * (3 * 24 + 6 * 72) + 512),
    (madpo.MadpoConfig, (), 'rm_head', 16 * 64 + 32 * 16 * 96),  # the tiny preset's n_embd = 64
    (rho.RhoConfig, ('--method=sb',), 'sb_history', rho.SB_BYTES_PER_LOSS),
])
def test_a_count_is_refused_at_one_past_what_the_free_memory_holds(free_gib, cls, argv, key, bytes_each):
    most = GIB // bytes_each - (2 if key == 'n_pairs' else 0)  # n_pairs: built with the 2 val_pairs
    message = refused(cls, *argv, f'--{key}={most + 1}')
    assert f'--{key}={most + 1:,}' in message and f'give at most {most:,}' in message and 'memory' in message
    assert getattr(parse(cls, [*argv, f'--{key}={most}']), key) == most


@pytest.mark.parametrize('cls', [madpo_study.MadpoStudyConfig, slm_study.StudyConfig])
def test_jobs_and_the_plan_fit_the_memory(free_gib, cls):
    assert 'give at most 2' in refused(cls, '--jobs=3')  # 0.5 GiB a running run
    parse(cls, ['--jobs=2'])
    if cls is slm_study.StudyConfig:  # at most 13 runs a seed at the defaults, 16 KiB each
        message = refused(cls, '--seeds=100000')
        assert '--seeds=100,000' in message and f'give --seeds <= {GIB // (13 * 2**14):,}' in message


def offered_fixes(message):
    """A check_selection refusal's fixes, each as the keys it changes ({} for advice no key can follow)."""
    fixes = message.split(': give ', 1)[1].split(' or ')
    return [{m.group(1): float(m.group(2).replace(',', ''))} if (m := re.fullmatch(r'--(\w+) [<>]= ([\d,.]+)', fix))
            else {} for fix in fixes]


@pytest.mark.parametrize('free, keys', [
    (GIB, dict(select_frac=1e-7)),                       # the memory is the limit
    (GIB, dict(mega_batch=10**9)),
    (2**50, dict(mega_batch=10**9)),                     # the data is
    (2**50, dict(select_frac=1e-7)),
    (2**50, dict(holdout_frac=0.99999)),                 # fewer examples outside the holdout than a batch
    (2**50, dict(holdout_frac=0.99999, mega_batch=64)),
    (2**20, dict(mega_batch=16)),                        # memory for a few examples, fewer than a batch
    (0, dict(mega_batch=16)),                            # not one example fits: no fix to follow, no division by zero
])
def test_rho_scores_no_mega_batch_beyond_the_data_or_the_memory_and_every_fix_passes(stdlib_corpus, monkeypatch,
                                                                                     free, keys):
    monkeypatch.setattr(runs, 'free_memory', lambda device: free)
    tiny = dict(model='tiny', batch_size=8, **keys)
    with pytest.raises(UserError, match=r'scores nB = [\d,]+ examples per micro-batch, more than ') as e:
        rho.check_selection(rho.RhoConfig(**tiny))
    fixes = offered_fixes(str(e.value))
    assert fixes and all(len(fix) <= 1 for fix in fixes), str(e.value)
    for fix in fixes:
        if fix:
            rho.check_selection(rho.RhoConfig(**{**tiny, **{k: type(tiny.get(k, 0.5))(v) for k, v in fix.items()}}))
    if free == 0:
        assert str(e.value).endswith('give a smaller --model or --block_size (not one example fits)'), str(e.value)


# ----- through the entry points: exit 2, one line, no traceback, nothing written -------------------------

@pytest.mark.parametrize('argv, says', [
    (['rho.py', '--seed=100000000000000'], '--seed must be in [0, 18446688733642], got 100000000000000'),
    (['rho.py', '--model=tiny', '--batch_size=8', '--select_frac=1e-7'], 'scores nB = 80,000,000 examples'),
    (['slm.py', '--k=1e-7'], '--k=1e-07 selects round(1e-07 x 576) = 0'),
    (['madpo.py', '--n_pairs=1000000000'], '--n_pairs=1,000,000,000 needs about'),
    (['data/mathmix/prepare.py', '--n_ref_docs=100000000'], '--n_ref_docs=100,000,000 needs about'),
    (['data/reviews/prepare.py', '--n_reviews=1000000000'], '--n_reviews=1,000,000,000 needs about'),
    (['-m', 'studies.slm', '--seeds=100000000'], '--seeds=100,000,000 plans up to'),
])
def test_entry_points_refuse_in_one_line(tmp_path, argv, says):
    out = run_script(*argv, f'--out_dir={tmp_path / "out"}', timeout=120)
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert out.stderr.count('\n') == 1 and out.stderr.startswith('error: ') and says in out.stderr, out.stderr
    assert not (tmp_path / 'out').exists()
