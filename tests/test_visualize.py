"""The plots of mlx_aim/tasks/visualize.py that need no model: the loss curve and its moving average. (Next-patch
predictions and the grid script are tested in test_pretrain.py, the demo's whole figure in test_demo.py.)"""

import numpy as np
import pytest

from mlx_aim.tasks import visualize


def colour_mask(image, rgb, tolerance=30):
    return np.abs(np.asarray(image).astype(int) - list(rgb)).sum(-1) < tolerance


def test_loss_curve_plots_raw_and_smoothed_loss():
    """Noisy falling losses: a light line for every step, a dark moving average that stays within it, red
    validation dots."""
    rng = np.random.default_rng(0)
    steps = np.arange(1, 501)
    train = [(int(s), float(2.0 / np.sqrt(s) * (1 + 0.3 * rng.standard_normal()))) for s in steps]
    image = visualize.draw_loss_curve(train, [(250, 0.2), (500, 0.1)], size=(400, 300))
    assert image.size == (400, 300)
    colours = (visualize.RAW_LOSS_COLOUR, visualize.SMOOTH_LOSS_COLOUR, visualize.VAL_LOSS_COLOUR)
    raw, smooth, val = (colour_mask(image, c) for c in colours)
    assert raw.sum() > 200 and smooth.sum() > 200 and val.sum() > 20
    plot = np.zeros_like(smooth)
    plot[:, 60:300] = True  # the plot area, left of the legend
    rows, cols = np.nonzero(smooth & plot)
    # A falling curve: its leftmost points lie higher on the image (smaller row) than its rightmost ones.
    assert rows[cols < cols.min() + 20].mean() < rows[cols > cols.max() - 20].mean()
    # The noise spreads the raw line over more rows than the average at the same columns.
    raw_rows, raw_cols = np.nonzero(raw & plot)
    middle = (cols > 150) & (cols < 250)
    assert np.ptp(raw_rows[(raw_cols > 150) & (raw_cols < 250)]) > np.ptp(rows[middle])
    with pytest.raises(ValueError, match="no training loss"):
        visualize.draw_loss_curve([])


def test_loss_curve_of_one_step_is_a_dot():
    image = visualize.draw_loss_curve([(1, 1.5)], size=(300, 200))
    assert colour_mask(image, visualize.SMOOTH_LOSS_COLOUR).sum() > 10


def test_moving_average():
    values = [4.0, 2.0, 6.0, 0.0, 8.0]
    np.testing.assert_allclose(visualize.moving_average(values, 1), values)
    np.testing.assert_allclose(visualize.moving_average(values, 2), [4, 3, 4, 3, 4])
    np.testing.assert_allclose(visualize.moving_average(values, 3), [4, 3, 4, 8 / 3, 14 / 3])
    np.testing.assert_allclose(visualize.moving_average(values, 10), np.cumsum(values) / np.arange(1, 6))


def test_chart_draws_a_line_per_series_on_a_log_axis():
    """Two rising series on a log x axis: each in its colour, its line rising to the right."""
    first = visualize.Series("a", [(1e3, 30.0), (1e4, 35.0), (1e5, 40.0)], [(29, 31), (33, 37), (39, 41)])
    second = visualize.Series("b", [(1e3, 20.0), (1e5, 25.0)])
    image = visualize.draw_chart([first, second], title="t", x_label="x", y_label="y", log_x=True,
                                 x_ticks=[(1e3, "1k"), (1e5, "100k")], size=(400, 320), note="rho = -1")
    assert image.size == (400, 320)
    for colour in visualize.SERIES_COLOURS[:2]:
        mask = colour_mask(image, colour)
        mask[250:] = False  # the legend
        rows, cols = np.nonzero(mask)
        assert len(rows) > 50
        assert rows[cols < cols.min() + 10].mean() > rows[cols > cols.max() - 10].mean()  # higher on the right
    dots = visualize.draw_chart([first], title="t", x_label="x", y_label="y", connect=False)
    assert colour_mask(dots, visualize.SERIES_COLOURS[0]).sum() > 20
    with pytest.raises(ValueError, match="no points"):
        visualize.draw_chart([visualize.Series("e", [])], title="t", x_label="x", y_label="y")


def test_chart_draws_a_dashed_series_in_its_own_colour():
    """A flat dashed grey baseline beside a solid series: its colour its own, its line broken into dashes, the next
    series without a colour still taking the palette's first."""
    grey = (127, 127, 127)
    baseline = visualize.Series("random", [(0.0, 10.0), (10.0, 10.0)], colour=grey, dashed=True)
    solid = visualize.Series("a", [(0.0, 0.0), (10.0, 20.0)])
    image = visualize.draw_chart([baseline, solid], title="t", x_label="x", y_label="y", size=(400, 320))
    assert colour_mask(image, visualize.SERIES_COLOURS[0]).sum() > 50
    mask = colour_mask(image, grey, tolerance=6)
    mask[230:] = False  # the legend
    row = mask[mask.sum(axis=1).argmax()]  # the baseline's row (anti-aliased text is grey only here and there)
    cols = np.flatnonzero(row)
    span = row[cols.min() + 8 : cols.max() - 8]  # between the end dots
    starts = np.flatnonzero(span[1:] & ~span[:-1])
    assert cols.max() - cols.min() > 250  # across the plot
    assert span.sum() > 0.4 * len(span) and not span.all() and len(starts) >= 10  # dashes with gaps
