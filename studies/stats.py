"""The lab's statistics, one module: t-based intervals, paired tests, Holm's adjustment, equivalence
(TOST) and the crossing of a curve with a target. Every study's table (studies.ntng, studies.slm,
studies.madpo) reads significance through these functions, so one rule holds across the lab.
Hand-written (no scipy): tests/test_stats.py checks them against reference values."""
import math
import statistics


def mean_std(xs):
    """Mean and sample sd (0 for one value)."""
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side; use the symmetry otherwise
        return 1 - _betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        num = 1.0 if i == 0 else (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)) if i % 2 == 0
                                  else -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)))
        d = 1 / (d if abs(d := 1 + num * d) > 1e-300 else 1e-300)
        c = c if abs(c := 1 + num / c) > 1e-300 else 1e-300
        f *= c * d
        if abs(c * d - 1) < 1e-14:
            break
    return front * (f - 1)


def t_p_value(t, df):
    """Two-sided p-value of Student's t statistic t with df degrees of freedom."""
    return 1.0 if t == 0 else _betainc(df / 2, 0.5, df / (df + t * t))


def t95(df, level=0.95):
    """The two-sided `level` quantile of Student's t with df degrees of freedom (bisection on t_p_value)."""
    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_p_value(mid, df) > 1 - level else (lo, mid)
    return (lo + hi) / 2


def t_interval(xs, level=0.95):
    """(mean, half-width of the t-based CI at `level`); the half-width is nan for fewer than 2 values. The
    one significance rule of the lab: every study's table uses it (90% for equivalence tests)."""
    m, sd = mean_std(xs)
    return m, (t95(len(xs) - 1, level) * sd / math.sqrt(len(xs)) if len(xs) > 1 else math.nan)


def paired_test(a, b):
    """Paired seeds: (mean of a_i - b_i, half-width of its t-based 95% CI, two-sided p of the paired t-test).
    Half-width and p are nan for fewer than two pairs; p is 0 when every difference is the same nonzero value."""
    d = [x - y for x, y in zip(a, b)]
    m, half = t_interval(d)
    if len(d) < 2:
        return m, math.nan, math.nan
    se = statistics.stdev(d) / math.sqrt(len(d))
    return m, half, (t_p_value(m / se, len(d) - 1) if se > 0 else float(m == 0))


def holm(p_values):
    """Holm's step-down adjustment of a family of p-values (nan ones are left out of the family and stay nan)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def crossing(points, target):
    """First x at which y <= target along [(x, y)], linearly interpolated; None when never reached."""
    for i, (x, y) in enumerate(points):
        if y <= target:
            if i == 0:
                return x
            x0, y0 = points[i - 1]
            return x0 + (y0 - target) / (y0 - y) * (x - x0)
    return None


# -----------------------------------------------------------------------------
# a methods x budgets table of runs on paired seeds: its cells

def group_runs(runs):
    groups = {}
    for r in runs:
        groups.setdefault(r['label'], {}).setdefault(r['budget'], []).append(r)
    return groups


def finals_by_seed(runs):
    return {r['seed']: r['final'] for r in runs if r['complete']}


def paired_cells(groups, baseline):
    """{(label, budget): (delta, half-width, p, pairs)} of every method against the baseline at each budget,
    over the seeds both completed (a seed fixes initialisation and data order for every method), with
    Holm-adjusted p-values across the whole table. A cell whose runs trained no step (untrained_note) is
    shown but left out of the Holm family: it says nothing about the method, only about its accounting."""
    cells = {}
    for label, by_budget in groups.items():
        for b, runs in by_budget.items():
            base = finals_by_seed(groups.get(baseline, {}).get(b, []))
            mine = finals_by_seed(runs)
            seeds = sorted(mine.keys() & base.keys())
            if label != baseline and seeds:
                cells[label, b] = (*paired_test([mine[s] for s in seeds], [base[s] for s in seeds]), len(seeds))
    keys = [k for k in cells if not untrained(groups[k[0]][k[1]])]
    for k, p in zip(keys, holm([cells[k][2] for k in keys])):
        cells[k] = (cells[k][0], cells[k][1], p, cells[k][3])
    return cells


def untrained(runs):
    """Runs of one cell that all took no step (RHO-LOSS with its IL charged, when that cost exceeds the budget)."""
    done = [r for r in runs if r['complete']]
    return bool(done) and all(r.get('steps') == 0 for r in done)


# -----------------------------------------------------------------------------
# counts: exact intervals and tests of failure rates

def binomial_tail(x, n, p, upper):
    """P(X >= x) (upper) or P(X <= x) for X ~ Binomial(n, p), summed from the pmf."""
    ks = range(x, n + 1) if upper else range(0, x + 1)
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in ks)


def clopper_pearson(x, n, level=0.95):
    """The exact interval of a proportion x/n: lower solves P(X >= x | p) = a/2, upper P(X <= x | p) = a/2
    (a = 1 - level; 0 when x = 0, 1 when x = n), by bisection: each tail is monotone in p."""
    a = 1 - level

    def solve(upper):  # P(X >= x) rises with p, P(X <= x) falls
        lo, hi = 0.0, 1.0
        for _ in range(100):
            mid = (lo + hi) / 2
            tail = binomial_tail(x, n, mid, upper)
            lo, hi = (mid, hi) if (tail < a / 2) == upper else (lo, mid)
        return (lo + hi) / 2
    return (0.0 if x == 0 else solve(True)), (1.0 if x == n else solve(False))


def fisher_one_sided(x1, n1, x2, n2):
    """Fisher's exact test that group 1's rate is higher: P(X >= x1), X the group-1 count of a 2x2 table with
    these margins (hypergeometric: x1 + x2 events among n1 + n2 runs, n1 of them drawn)."""
    events, total = x1 + x2, n1 + n2
    return sum(math.comb(events, i) * math.comb(total - events, n1 - i)
               for i in range(x1, min(n1, events) + 1)) / math.comb(total, n1)
