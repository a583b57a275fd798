"""The comparison figure (studies/across_budgets.plot_runs) reads without the table: final val loss and the
paired differences to the baseline (95% CIs, a zero line) against budget, in named units, over the val-loss
curves; one colour per method in every panel; the legend outside the panels; a quick sweep, whose every
run has one eval just past its budget, still draws a point per method and budget; a cell that trained no
step is named, not drawn."""
import pytest

import runs
from conftest import ROOT  # noqa: F401  (the repo root on sys.path)
from studies import across_budgets, compare, stats
from test_compare import finished, write_run

plt = pytest.importorskip('matplotlib.pyplot')


def draw(tmp_path, folders, floors=None):
    groups = stats.group_runs([runs.read_run(r) for r in folders])
    assert compare.plot_runs(groups, str(tmp_path / 'p.png'), floors) == str(tmp_path / 'p.png')
    fig = plt.gcf()
    panels = {ax.get_title(): ax for ax in fig.axes}
    return fig, panels, groups


def marks(ax):
    """{label: [(x, y), ...]} of every method's errorbar marks in a panel."""
    found = {}
    for c in ax.containers:
        found.setdefault(c.get_label(), []).extend(zip(*c.lines[0].get_data()))
    return found


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close('all')


def test_a_quick_sweep_draws_a_point_per_method_and_budget(tmp_path):
    """--quick: budgets 3 and 6 RST, one seed; a run's only eval is its final one, at the step that spent the
    budget's last unit, so just past the budget (3.04, 6.1). Every method must still be drawn in every panel."""
    folders = [write_run(tmp_path, f'{m}{b}', m, float(b), 0, [(b * 1.02, 1000.0 * b, loss - b / 10)], steps=10 * b)
               for m, loss in (('baseline', 5.0), ('stack', 4.8), ('drop', 5.1)) for b in (3, 6)]
    fig, panels, _ = draw(tmp_path, folders)
    finals = marks(panels['final val loss: mean over seeds, 95% CI'])
    assert {m: [x for x, _ in pts] for m, pts in finals.items()} == {m: [3.0, 6.0] for m in ('baseline', 'stack', 'drop')}
    deltas = marks(panels['paired difference to baseline: mean, 95% CI'])
    assert sorted(deltas) == ['drop', 'stack'] and all(len(pts) == 2 for pts in deltas.values())
    for b in (3, 6):
        curve = panels[f'budget {b} RST: val loss as it is spent']
        assert sorted(marks(curve)) == ['baseline', 'drop', 'stack']
        assert curve.get_xlim()[1] >= b * 1.02                           # the point just past the budget is inside
    assert not any('not drawn' in t.get_text() for t in fig.legends[0].get_texts())


def test_the_figure_names_its_units_draws_the_zero_line_and_keeps_its_legend_outside(tmp_path):
    rows = {'baseline': [2.00, 2.02, 2.04], 'stack': [1.90, 1.93, 1.95], 'drop': [2.01, 2.01, 2.06]}
    folders = [finished(tmp_path, f'{m}{s}', m, 20.0, s, v) for m, vs in rows.items() for s, v in enumerate(vs)]
    folders += [finished(tmp_path, f'{m}{s}b', m, 40.0, s, v - 0.3) for m, vs in rows.items() for s, v in enumerate(vs)]
    fig, panels, groups = draw(tmp_path, folders, {'unigram': 3.0, 'bigram': 2.5, 'trigram': 1.8})
    final, delta = panels['final val loss: mean over seeds, 95% CI'], panels['paired difference to baseline: mean, 95% CI']
    assert final.get_xlabel() == delta.get_xlabel() == 'budget (RST, reference seconds)'
    assert final.get_ylabel() == 'final val loss (nats/token)'
    assert delta.get_ylabel() == 'Δ final val loss vs baseline (nats/token)'
    assert any(list(line.get_ydata()) == [0, 0] for line in delta.get_lines())           # the zero line
    assert panels['budget 20 RST: val loss as it is spent'].get_xlabel() == 'RST spent (reference seconds)'
    # each Δ is the table's paired mean, its bar the table's 95% CI
    cells = stats.paired_cells(groups, 'baseline')
    for c in delta.containers:
        (x,), (y,) = c.lines[0].get_data()
        b = min((20.0, 40.0), key=lambda b: abs(x / b - 1))
        segment = c.lines[2][0].get_segments()[0]
        assert y == pytest.approx(cells[c.get_label(), b][0])
        assert segment[1][1] - y == pytest.approx(cells[c.get_label(), b][1])
    fig.canvas.draw()
    right = max(ax.get_position().x1 for ax in fig.axes)
    assert fig.legends[0].get_window_extent().x0 >= right * fig.bbox.width                # outside every panel
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[:3] == ['baseline', 'stack', 'drop'] and 'trigram floor 1.800' in texts  # the lab's method order


def test_a_method_has_one_colour_in_every_panel_and_another_system_is_dashed(tmp_path):
    from matplotlib.colors import to_rgba
    folders = [finished(tmp_path, f'{m}{s}', m, 20.0, s, 2.0 + s / 50 - (m != 'baseline') / 10)
               for m in ('baseline', 'stack', 'stack [h200]') for s in range(2)]
    fig, panels, _ = draw(tmp_path, folders)
    seen = {}
    for ax in fig.axes:
        for c in ax.containers:
            seen.setdefault(c.get_label(), set()).add(to_rgba(c.lines[0].get_color()))
        for line in ax.get_lines():
            if not line.get_label().startswith('_'):
                seen.setdefault(line.get_label(), set()).add(to_rgba(line.get_color()))
    assert all(colours == {to_rgba(across_budgets.method_colour(label))} for label, colours in seen.items()), seen
    assert seen['stack'] == seen['stack [h200]'] != seen['baseline']
    curve = panels['budget 20 RST: val loss as it is spent']
    styles = {line.get_label(): line.get_linestyle() for line in curve.get_lines()}
    assert styles['stack'] == '-' and styles['stack [h200]'] == '--'


def test_colours_are_fixed_per_method():
    colour = across_budgets.method_colour
    assert colour('stack') == colour('stack [h200]') != colour('drop')
    assert len({colour(m) for m in across_budgets.METHOD_ORDER[:10]}) == 10
    assert colour('my_method') == colour('my_method')


def test_a_cell_that_trained_no_step_is_named_not_drawn_and_partial_runs_are_left_out(tmp_path):
    """RHO-LOSS with its IL charged: one eval at 3446 RST in a 20-RST budget, no step taken. The curve panel
    spans the budget; a partial run (still running) does not cut a method's curve short; the floor is marked."""
    folders = [finished(tmp_path, 'b0', 'baseline', 20.0, 0, 2.0), finished(tmp_path, 'b1', 'baseline', 20.0, 1, 2.1),
               write_run(tmp_path, 'b2', 'baseline', 20.0, 2, [(5.0, 5000, 2.9)]),       # partial: stopped at 5 RST
               write_run(tmp_path, 'il', 'rho_il_charged', 20.0, 0, [(3446.0, 10 ** 6, 5.35)], steps=0)]
    fig, panels, _ = draw(tmp_path, folders, {'unigram': 3.2, 'bigram': 2.5, 'trigram': 1.9})
    curve = panels['budget 20 RST: val loss as it is spent']
    assert curve.get_xlim() == pytest.approx((0, 20.6))
    line = [l for l in curve.get_lines() if l.get_label() == 'baseline'][0]
    assert line.get_xdata()[0] == pytest.approx(5.0) and line.get_xdata()[-1] == pytest.approx(20.0)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert 'rho_il_charged: not drawn at budget 20\n(trained no step: its costs before the first step exceed the budget)' in texts
    assert all('rho_il_charged' not in marks(ax) for ax in fig.axes) and 'trigram floor 1.900' in texts


def test_no_panel_for_a_budget_of_partial_runs_and_bands_keep_their_lines_colour(tmp_path):
    from matplotlib.colors import to_rgba
    folders = [finished(tmp_path, 'b0', 'baseline', 20.0, 0, 2.0), finished(tmp_path, 'b1', 'baseline', 20.0, 1, 2.1),
               write_run(tmp_path, 'b40', 'baseline', 40.0, 0, [(5.0, 5000, 2.9)])]  # partial: the only budget-40 run
    fig, panels, _ = draw(tmp_path, folders)
    assert sorted(panels) == ['budget 20 RST: val loss as it is spent', 'final val loss: mean over seeds, 95% CI',
                              'paired difference to baseline: mean, 95% CI']
    curve = panels['budget 20 RST: val loss as it is spent']
    line, band = curve.get_lines()[0], curve.collections[0]
    assert tuple(band.get_facecolor()[0][:3]) == pytest.approx(to_rgba(line.get_color())[:3])
    assert 'no paired runs' in panels['paired difference to baseline: mean, 95% CI'].texts[0].get_text()
