"""studies/madpo_report.py's matched-KL reading against hand computations: the fitted frontier (exact on points
that lie on a + b sqrt(KL), the SFT point counted once, never extrapolated), the KL's sampling error, the
paired differences' t intervals on three seeds, and the report on a small folder of runs. The running-maximum
reader's own hand cases are tests/test_madpo.py's test_reward_at_matched_kl_by_hand."""
import json
import math
import re

import pytest

from data.loader import DataError
from studies import madpo_report as report
from studies import stats

T_2DF, T_1DF = 4.302653, 12.706205  # Student's t 97.5% quantiles at 2 and 1 degrees of freedom


def on_curve(a, b, kls):
    return [(kl, a + b * math.sqrt(kl)) for kl in kls]


def test_a_fit_on_points_on_the_curve_returns_the_true_value():
    """Every point within 2k on reward = 0.1 + 0.3 sqrt(KL): the fit is exact; points past 2k are not used
    (one far off the curve changes nothing), and the SFT point, in every beta's curve, counts once."""
    points = on_curve(0.1, 0.3, [0, 0, 0, 0.5, 1, 1.5, 2.5, 3.5]) + [(10.0, -5.0)]
    a, b = report.fitted_frontier(points, 2.0)
    assert (a, b) == (pytest.approx(0.1), pytest.approx(0.3))
    assert report.fitted_reward_at_kl(points, 2.0) == pytest.approx(0.1 + 0.3 * math.sqrt(2))
    assert report.fit_window(points, 2.0)[:2] == [(0, 0.1), (0.5, 0.1 + 0.3 * math.sqrt(0.5))]
    # by hand, off the curve: sqrt(KL) = 0, 1, 2 with rewards 0, 1, 1 -> b = Sxy / Sxx = 1 / 2, a = 2/3 - b;
    # counting the three copies of the SFT point would give other values
    assert report.fitted_frontier([(0.0, 0.0)] * 3 + [(1.0, 1.0), (4.0, 1.0)], 2.0) == (pytest.approx(1 / 6), pytest.approx(0.5))


def test_a_run_without_a_point_beyond_the_matched_kl_is_not_read():
    """No point at KL >= k: not reached; past k but none in [k, 2k] (the old reader interpolated from KL 0 to
    it): skipped past; a point exactly at k is read."""
    assert report.fitted_reward_at_kl(on_curve(0.1, 0.3, [0, 0.5, 1.9]), 2.0) == report.NOT_REACHED == 'not reached'
    assert report.fitted_reward_at_kl([], 2.0) == report.NOT_REACHED
    assert report.fitted_reward_at_kl(on_curve(0.1, 0.3, [0, 0.5, 1.9, 4.1]), 2.0) == report.SKIPPED == 'skipped past'
    assert report.fitted_reward_at_kl(on_curve(0.1, 0.3, [0, 2.0]), 2.0) == pytest.approx(0.1 + 0.3 * math.sqrt(2))
    assert report.fitted_cell([(1.0, 0, 0), 'not reached', 'skipped past']) == '1/3 read (1 not reached, 1 skipped past)'
    assert report.fitted_cell([(1.0, 0, 0), (2.0, 0, 0), (3.0, 0, 0)]) == f'2.00 ± {T_2DF / math.sqrt(3):.2f} (3)'


def test_the_kl_error_is_the_nearest_checkpoints_half_width_and_the_slope_carries_it():
    """seed_reads: the fit's reward and slope at k, and the kl_ci of the checkpoint whose KL is nearest k."""
    points = [dict(kl=kl, reward=r, kl_ci=ci) for (kl, r), ci in zip(on_curve(0.1, 0.3, [0, 1.0, 1.8, 2.5, 3.9]),
                                                                    [0.0, 0.2, 0.4, 0.5, 0.9])]
    reward, slope, half = report.seed_reads({('dpo', 'high', 0): points}, 2.0)[('dpo', 'high', 0)]
    assert reward == pytest.approx(0.1 + 0.3 * math.sqrt(2)) and slope == pytest.approx(0.3 / (2 * math.sqrt(2)))
    assert half == 0.4  # KL 1.8 is nearest 2
    assert report.kl_error_cell([(0.5, 0.1, 0.5), (0.4, -0.3, 0.3), 'not reached']) == '±0.40 → ±0.07'  # (0.05 + 0.09) / 2
    assert report.kl_error_cell([(0.5, 0.1, None), 'skipped past']) == '-'


def test_the_paired_interval_on_three_seeds_by_hand():
    """Differences 0.3, 0.2, 0.4: mean 0.3, sd 0.1, half-width t(2 df) x 0.1 / sqrt(3) = 0.248, t = 5.196, p
    0.0351 -> better while its Holm p stays below 0.05; 0.3, -0.1, 0.1: mean 0.1, sd 0.2, half-width 0.497 -> not
    resolved; the mirror image -> worse; a seed one arm did not reach leaves two pairs, 0.3 and 0.2 (t at 1 df)."""
    read = lambda rewards: {s: (r, 0.0, 0.1) for s, r in enumerate(rewards)}  # noqa: E731
    better, worse = read([0.5, 0.7, 0.6]), read([0.2, 0.5, 0.2])
    d, half, p, n = report.paired_read(better, worse)
    assert (d, half, n) == (pytest.approx(0.3), pytest.approx(T_2DF * 0.1 / math.sqrt(3)), 3) and p == pytest.approx(0.0351, abs=1e-4)
    assert report.paired_cell((d, half, p, n), p) == f'better: +0.30 ± {half:.2f}, Holm p 0.035 (3)'  # 0.25
    assert report.paired_cell((d, half, p, n), 2 * p) == f'not resolved (±{half:.2f}): +0.30, Holm p 0.070 (3)'  # two in the family
    assert report.paired_cell(report.paired_read(worse, better), p) == 'worse: -0.30 ± 0.25, Holm p 0.035 (3)'
    loose = report.paired_read(read([0.5, 0.1, 0.3]), read([0.2] * 3))
    assert report.paired_cell(loose, loose[2]).startswith(f'not resolved (±{T_2DF * 0.2 / math.sqrt(3):.2f}): +0.10')
    mine = {**read([0.5, 0.7]), 2: 'not reached'}
    two = report.paired_read(mine, read([0.2, 0.5, 0.2]))
    assert two[::3] == (pytest.approx(0.25), 2) and two[1] == pytest.approx(T_1DF * 0.05)  # sd 0.1 / sqrt(2)
    assert report.paired_read({0: (1.0, 0, 0), 1: 'skipped past'}, read([0.2, 0.5])) == 'not read (1/2 seeds)'
    assert report.paired_read({}, read([0.2])) == '-'
    assert report.paired_cell('-', None) == '-'


def write_run(root, method, seed, curve):
    run = root / f'seed{seed}' / f'po_{method}_b0.1_high'
    run.mkdir(parents=True)
    config = {'tier': 'high', 'seed': seed, 'n_eval': 160}
    (run / 'done.json').write_text(json.dumps({'method': method, 'config': config, 'curve': curve, 'wall_s': 1.0}))


def test_the_report_reads_fitted_and_running_maximum_tables_from_the_runs(tmp_path):
    """Three seeds of dpo and madpo4 on reward = 0.1 + b sqrt(KL), madpo4's b larger by 0.1 + 0.02 x seed:
    the fitted and paired tables by hand; the running-maximum table still there, labelled."""
    for seed in range(3):
        for method, b in (('dpo', 0.2), ('madpo4', 0.3 + 0.02 * seed)):
            write_run(tmp_path, method, seed, [dict(kl=kl, reward=r, kl_ci=0.1 * kl) for kl, r in on_curve(0.1, b, [0, 1, 2.5, 4])])
    text = report.report(tmp_path, ('dpo', 'madpo4'), (2.0,))
    d = [(0.1 + 0.02 * s) * math.sqrt(2) for s in range(3)]  # the per-seed differences at KL 2
    sd = math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    assert f'| dpo | {0.1 + 0.2 * math.sqrt(2):.2f} ± 0.00 (3) | - | - |' in text
    p = stats.paired_test(d, [0.0] * 3)[2]  # the family's one difference: Holm's p is its own
    assert f'| madpo4 - dpo | better: +{sum(d) / 3:.2f} ± {T_2DF * sd / math.sqrt(3):.2f}, Holm p {p:.3f} (3) | - | - |' in text
    assert f'| dpo | ±0.25 → ±{0.2 / (2 * math.sqrt(2)) * 0.25:.2f} | - | - |' in text  # the checkpoint at KL 2.5 is nearest 2
    assert 'madpo4 - ipo' not in text and '(160 prompts, one sample each)' in text
    assert 'running-maximum reading at KL = 2 nats (the earlier reader, for comparison' in text
    assert text.index('fitted frontier') < text.index('running-maximum reading')
    # read at KL 1 as well, the same difference at sqrt(1): two tests in one family, each p Holm-adjusted
    cells = report.paired_family(report.load_curves(tmp_path), [('madpo4', 'dpo')], (2.0, 1.0))
    raw = [stats.paired_test([(0.1 + 0.02 * s) * math.sqrt(k) for s in range(3)], [0.0] * 3)[2] for k in (2.0, 1.0)]
    for kl, adjusted in zip((2.0, 1.0), stats.holm(raw)):
        assert f'Holm p {adjusted:.3f} (3)' in cells[(kl, 'madpo4', 'dpo', 'high')]
    assert cells[(2.0, 'madpo4', 'dpo', 'low')] == '-'


def test_the_weight_table_counts_each_seed_once(tmp_path):
    """madpo_weights.json is the same for every beta of a seed: two betas of seed 0 and one of seed 1 make two
    seeds; the histogram as fractions of the pairs, means over the seeds; a run without tau shows -."""
    for seed, beta, tau, damped, hist in ((0, 0.1, 1.0, 0.5, [0, 0, 0, 2, 2, 4, 0, 0, 0, 0]), (0, 0.03, 1.0, 0.5, [0, 0, 0, 2, 2, 4, 0, 0, 0, 0]),
                                          (1, 0.1, 3.0, 0.25, [0, 0, 0, 0, 1, 3, 0, 0, 0, 0])):
        folder = tmp_path / f'seed{seed}' / f'po_madpo4_tq0.5_b{beta:g}_high'
        folder.mkdir(parents=True)
        (folder / 'madpo_weights.json').write_text(json.dumps({'tau': tau, 'mean': 1.0, 'frac_damped': damped,
                                                               'frac_amplified': 0.5, 'histogram_0_to_2_by_0.2': hist}))
    old = tmp_path / 'seed0' / 'po_madpo4_b0.1_high'
    old.mkdir()
    (old / 'madpo_weights.json').write_text(json.dumps({'mean': 1.0, 'frac_amplified': 0.7, 'histogram_0_to_2_by_0.2': [1] * 10}))
    lines = report.weight_table(tmp_path)
    assert '| madpo4_tq0.5 | high | 2 | 2.000 | 0.375 | 0.500 | 0.00 | 0.00 | 0.00 | 0.12 | 0.25 | 0.62 | 0.00 | 0.00 | 0.00 | 0.00 |' in lines
    assert '| madpo4 | high | 1 | - | - | 0.700 | ' + ' | '.join(['0.10'] * 10) + ' |' in lines
    assert report.weight_table(tmp_path / 'none') == []


@pytest.mark.parametrize('damage', ['kl NaN', 'reward true', 'n_eval text', 'wall_s infinite'])
def test_a_done_json_with_a_number_that_is_none_is_refused_in_one_line(tmp_path, damage):
    """JSON parses NaN, Infinity and true where a number belongs: each would pass for a result and reach a
    mean (or a traceback); the report names the file instead."""
    write_run(tmp_path, 'dpo', 0, [dict(kl=1.0, reward=0.5)])
    path = tmp_path / 'seed0' / 'po_dpo_b0.1_high' / 'done.json'
    done = json.loads(path.read_text())
    if damage == 'kl NaN':
        done['curve'][0]['kl'] = math.nan
    elif damage == 'reward true':
        done['curve'][0]['reward'] = True
    elif damage == 'n_eval text':
        done['config']['n_eval'] = 'x'
    else:
        done['wall_s'] = math.inf
    path.write_text(json.dumps(done))
    with pytest.raises(DataError, match=f'{re.escape(str(path))} is damaged'):
        report.load_curves(tmp_path) if damage != 'wall_s infinite' else report.read_done(path, 'po')
