"""`worldvla.eval.plots`: what the figures show (bar positions and labels, legends, blank panels), the formats the
files are written in, and the inputs the writers refuse."""
import json

import numpy as np
import pytest

from worldvla.eval import plots


def _saved_figures(monkeypatch) -> list:
    """The matplotlib figures `plots` saves, kept for inspection after they are written and closed."""
    figures, save = [], plots._save_figure

    def keep(fig, path, **kw):
        figures.append(fig)
        return save(fig, path, **kw)

    monkeypatch.setattr(plots, "_save_figure", keep)
    return figures


def _bar_centres(ax) -> list[list[float]]:
    return [[p.get_x() + p.get_width() / 2 for p in c] for c in ax.containers if hasattr(c, "patches")]


def test_success_bars_of_variants_sit_side_by_side_around_each_task_tick(tmp_path, monkeypatch):
    """Two variants' bars share each group's tick, one on either side of it (not both right of it, under the next
    group); every bar with a rate is labelled with its percent and a task a variant lacks has no bar label."""
    figures = _saved_figures(monkeypatch)
    rates = {"a": {"push-v3": 0.5, "reach-v3": 0.25}, "b": {"push-v3": 1.0}}
    plots.success_bars(rates, tmp_path / "s.png")
    (ax,) = figures[0].axes
    np.testing.assert_allclose(ax.get_xticks(), [0, 1, 2])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["push", "reach", "mean"]
    a, b = _bar_centres(ax)
    np.testing.assert_allclose(a, [-0.2, 0.8, 1.8])
    np.testing.assert_allclose(b, [0.2, 1.2, 2.2])
    labels = sorted((round(t.get_position()[0], 6), t.get_text()) for t in ax.texts)
    assert labels == [(-0.2, "50"), (0.2, "100"), (0.8, "25"), (1.8, "38"), (2.2, "100")]  # none at b's reach


def test_success_bars_of_one_task_have_no_mean_group(tmp_path, monkeypatch):
    """The mean of one task is that task: the figure holds its group alone."""
    figures = _saved_figures(monkeypatch)
    plots.success_bars({"a": {"reach-v3": 0.4}}, tmp_path / "s.png")
    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["reach"]
    ((height,),) = [[p.get_height() for p in c] for c in ax.containers]
    assert height == pytest.approx(40.0)


def test_success_bars_label_each_bar_above_its_error_bar(tmp_path, monkeypatch):
    """A rate's label sits just above the higher of its bar and its interval's upper end, not on the error bar."""
    figures = _saved_figures(monkeypatch)
    plots.success_bars({"a": {"push-v3": 0.5, "reach-v3": 0.9}}, tmp_path / "s.png",
                       intervals={"a": {"push-v3": (0.2, 0.8), "reach-v3": (0.6, 0.95), "mean": (0.5, 0.85)}})
    (ax,) = figures[0].axes
    heights = [t.get_position()[1] for t in sorted(ax.texts, key=lambda t: t.get_position()[0])]
    np.testing.assert_allclose(heights, [81.0, 96.0, 86.0])


def test_success_bars_take_an_interval_that_ends_a_rounding_below_its_rate(tmp_path, monkeypatch):
    """An interval whose upper end is a rounding below its rate of 1.0 (0.9999999999999999: what success_interval
    gave 6 of 6 before its ends were clamped, still in older results files) makes the error bar's upper length a
    hair below zero, which matplotlib refuses; it is drawn as zero."""
    from matplotlib.container import ErrorbarContainer

    figures = _saved_figures(monkeypatch)
    ci = (0.6096569663469354, 0.9999999999999999)
    assert plots.success_bars({"a": {"reach-v3": 1.0}}, tmp_path / "s.png", intervals={"a": {"reach-v3": ci}}).is_file()
    (ax,) = figures[0].axes
    (err,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    (segment,) = err.lines[2][0].get_segments()
    np.testing.assert_allclose(sorted(segment[:, 1]), [ci[0] * 100, 100.0])


def test_horizon_curves_name_the_dashed_reference_only_where_one_is_drawn(tmp_path, monkeypatch):
    figures = _saved_figures(monkeypatch)
    plots.horizon_curves({"reach": {"psnr": [20.0, 18.0], "ssim": [0.8, 0.7], "psnr_ref": [15.0, 14.0]}},
                         tmp_path / "h.png")
    plots.horizon_curves({"reach": {"psnr": [20.0, 18.0], "ssim": [0.8, 0.7]}}, tmp_path / "h.png")
    legends = [[t.get_text() for t in fig.axes[0].get_legend().get_texts()] for fig in figures]
    assert legends == [["reach", "dashed: first frame kept"], ["reach"]]


def test_training_curves_hide_the_panel_left_over_in_the_grid(tmp_path, monkeypatch):
    """Three panels take a 2 x 2 grid: the fourth cell is hidden, not an empty box with axes."""
    figures = _saved_figures(monkeypatch)
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3, "psnr": 20.0 + s}) + "\n"
                           for s in range(1, 6)))
    panels = [("loss", "loss", False, False), ("psnr", "PSNR", False, False), ("lr", "lr", False, False)]
    plots.training_curves(log, tmp_path / "t.png", panels, "t")
    assert [ax.axison for ax in figures[0].axes] == [True, True, True, False]


def test_frame_grid_writes_the_format_its_name_says_in_either_case(tmp_path):
    """The image format follows the file name's suffix, whatever its case: grid.JPG is a JPEG, not a PNG under a
    .JPG name."""
    from PIL import Image

    rows = [np.zeros((2, 8, 8, 3), np.uint8)]
    for name, fmt in (("g.png", "PNG"), ("g.jpg", "JPEG"), ("G.JPG", "JPEG"), ("g.PNG", "PNG")):
        with Image.open(plots.frame_grid(rows, tmp_path / name)) as im:
            assert im.format == fmt, name


def test_frame_grid_refuses_frames_of_another_size_naming_the_shapes(tmp_path):
    """Every frame of the grid has one size: a row of other heights or widths is refused up front, with the
    shapes, rather than failing in a numpy broadcast."""
    a = np.zeros((2, 8, 8, 3), np.uint8)
    for b in (np.zeros((2, 6, 8, 3), np.uint8), np.zeros((2, 8, 6, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"frames of one size \[T, H, W, 3\], got \[\(2, 8, 8, 3\), "):
            plots.frame_grid([a, b], tmp_path / "g.png")
    with pytest.raises(ValueError, match="frame_grid wants rows"):
        plots.frame_grid([], tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()


def test_save_gif_refuses_no_frames_and_frame_rates_a_gif_cannot_play(tmp_path):
    """A GIF stores each frame's delay in hundredths of a second: a rate of nan, inf or over 100 frames a second
    has no such delay (inf and 200 gave a delay of 0, which viewers replace by their own)."""
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    for fps in (float("nan"), float("inf"), 200, -4):
        with pytest.raises(ValueError, match="fps must be > 0 and at most 100"):
            plots.save_gif(frames, tmp_path / "x.gif", fps=fps)
    for empty in ([], np.zeros((0, 8, 8, 3), np.uint8)):
        with pytest.raises(ValueError, match="save_gif needs at least one frame"):
            plots.save_gif(empty, tmp_path / "x.gif")
    assert not (tmp_path / "x.gif").exists()
    from PIL import Image

    distinct = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 100, 200)])  # identical frames are merged
    with Image.open(plots.save_gif(distinct, tmp_path / "x.gif", fps=100)) as im:
        assert im.n_frames == 3 and im.info["duration"] == 10


def test_save_gif_and_frame_grid_refuse_pixels_a_uint8_cast_would_spoil(tmp_path):
    """Float frames in [0, 1] were cast to uint8 as they are: every pixel 0, a black GIF and black grid cells
    written without a word; integers past 255 wrapped around. Integer pixels in [0, 255] are still taken."""
    floats = np.full((2, 8, 8, 3), 0.9)
    with pytest.raises(ValueError, match=r"uint8.*float64.*\* 255"):
        plots.save_gif(floats, tmp_path / "f.gif")
    with pytest.raises(ValueError, match=r"uint8.*float64.*\* 255"):
        plots.frame_grid([floats], tmp_path / "f.png")
    with pytest.raises(ValueError, match=r"\[0, 255\].*int64 values in \[300, 300\]"):
        plots.save_gif(np.full((2, 8, 8, 3), 300), tmp_path / "w.gif")
    with pytest.raises(ValueError, match="uint8 pixels.*bool"):
        plots.frame_grid([np.ones((2, 8, 8, 3), bool)], tmp_path / "b.png")
    assert not list(tmp_path.iterdir())
    plots.save_gif(np.full((2, 8, 8, 3), 200, np.int64), tmp_path / "i.gif")
    from PIL import Image

    assert np.asarray(Image.open(tmp_path / "i.gif").convert("RGB")).max() == 200


def test_frame_grid_refuses_more_labels_than_rows(tmp_path):
    """A label past the last row was drawn below the image, where nothing shows it."""
    with pytest.raises(ValueError, match="3 labels for 1 rows"):
        plots.frame_grid([np.zeros((2, 8, 8, 3), np.uint8)], tmp_path / "g.png", labels=["a", "b", "c"])
    plots.frame_grid([np.zeros((2, 8, 8, 3), np.uint8)] * 2, tmp_path / "g.png", labels=["a"])  # fewer: taken


def test_side_by_side_names_sequences_of_other_heights():
    """Frames of two heights failed in NumPy's concatenate, naming neither function nor frames."""
    a, b = np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match=r"side_by_side.*\(2, 8, 8, 3\) and uint8 \(2, 4, 4, 3\)"):
        plots.side_by_side(a, b)
    out = plots.side_by_side(a, np.full((3, 8, 5, 3), 7, np.uint8), pad=1)
    assert out.shape == (2, 8, 14, 3) and (out[:, :, 8] == 255).all() and (out[:, :, 9:] == 7).all()


def test_success_bars_refuse_rates_given_in_percent(tmp_path):
    """A rate of 50 (percent) was drawn as a bar of 5000% above an axis that ends at 110."""
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\].*'push-v3': 50.*'a'.*100"):
        plots.success_bars({"a": {"push-v3": 50, "reach-v3": 0.5}}, tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_read_log_keeps_the_lines_around_bytes_that_are_not_text(tmp_path):
    """A line of bytes that are not UTF-8 (a damaged disk) made read_log, and the training curves, fail."""
    log = tmp_path / "metrics.jsonl"
    log.write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\xfe{"step": 2\n{"step": 3, "loss": 1.0}\n')
    assert plots.read_log(log) == [{"step": 1, "loss": 2.0}, {"step": 3, "loss": 1.0}]


def test_integer_frames_at_the_ends_of_the_pixel_range_are_taken_and_past_them_refused(tmp_path):
    """Integer pixels of exactly 0 and 255 are pixels (black and white), written as they are; -1 and 256 are
    refused, naming the range."""
    from PIL import Image

    frames = np.zeros((2, 8, 8, 3), np.int64)
    frames[:, :, 4:] = 255
    with Image.open(plots.frame_grid([frames], tmp_path / "g.png", pad=0)) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.concatenate(list(frames), axis=1))
    with Image.open(plots.save_gif(frames, tmp_path / "g.gif")) as im:
        assert np.asarray(im.convert("RGB")).tolist() == frames[0].tolist()
    for bad, where in ((-1, r"\[-1, 255\]"), (256, r"\[0, 256\]")):
        frames[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match=r"must hold pixel values in \[0, 255\], got int64 values in " + where):
            plots.save_gif(frames, tmp_path / "bad.gif")
        frames[0, 0, 0, 0] = 0
    assert not (tmp_path / "bad.gif").exists()


def test_save_gif_rounds_a_frames_delay_to_the_nearest_millisecond(tmp_path):
    """At 51 frames a second a frame lasts 19.6 ms: rounded to 20 ms (two hundredths of a second in the GIF), not
    cut to 19 ms, which the GIF's hundredths store as 10 ms, twice the rate asked for."""
    from PIL import Image

    distinct = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 100, 200)])
    with Image.open(plots.save_gif(distinct, tmp_path / "x.gif", fps=51)) as im:
        assert im.info["duration"] == 20


def test_success_bars_order_the_tasks_by_name_and_name_each_variant_in_the_legend(tmp_path, monkeypatch):
    """The task groups follow the tasks' names whatever order the rates were given in (the mean last), and the
    legend names each variant's bars."""
    figures = _saved_figures(monkeypatch)
    plots.success_bars({"new": {"reach-v3": 0.5, "push-v3": 0.25}, "old": {"window-v3": 1.0, "push-v3": 0.0}},
                       tmp_path / "s.png")
    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["push", "reach", "window", "mean"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["new", "old"]
    new, old = [[p.get_height() for p in c] for c in ax.containers]
    assert new[:2] == pytest.approx([25.0, 50.0]) and np.isnan(new[2])
    assert old[0] == 0.0 and np.isnan(old[1]) and old[2] == pytest.approx(100.0)


def test_success_bars_carry_the_title_given_and_room_above_a_full_bar(tmp_path, monkeypatch):
    """The figure is titled as asked, and the axis runs to 110% so a full bar's label shows above it."""
    figures = _saved_figures(monkeypatch)
    plots.success_bars({"a": {"reach-v3": 1.0}}, tmp_path / "s.png", title="LIBERO goal, 50 episodes")
    (ax,) = figures[0].axes
    assert ax.get_title() == "LIBERO goal, 50 episodes"
    assert ax.get_ylim() == (0.0, 110.0)
    ((label,),) = [[t.get_position()[1] for t in ax.texts]]
    assert label == pytest.approx(101.0) and label < ax.get_ylim()[1]


def test_success_bars_label_a_group_without_an_interval_just_above_its_bar(tmp_path, monkeypatch):
    """Intervals given for some groups only: a group without one is labelled just above its bar, not placed at an
    undefined height where it does not show."""
    figures = _saved_figures(monkeypatch)
    plots.success_bars({"a": {"push-v3": 0.5, "reach-v3": 0.9}}, tmp_path / "s.png",
                       intervals={"a": {"push-v3": (0.2, 0.8)}})
    (ax,) = figures[0].axes
    heights = [t.get_position()[1] for t in sorted(ax.texts, key=lambda t: t.get_position()[0])]
    np.testing.assert_allclose(heights, [81.0, 91.0, 71.0])


def test_success_bars_take_a_task_without_a_rate_and_label_only_the_rates_known(tmp_path, monkeypatch):
    """A rate of NaN (a task with no episode run) is no percentage to refuse: it has no bar label, and the mean is
    over the rates known."""
    figures = _saved_figures(monkeypatch)
    assert plots.success_bars({"a": {"push-v3": float("nan"), "reach-v3": 0.5}}, tmp_path / "s.png").is_file()
    (ax,) = figures[0].axes
    assert sorted((round(t.get_position()[0], 6), t.get_text()) for t in ax.texts) == [(1.0, "50"), (2.0, "50")]


def test_horizon_curves_draw_each_reference_in_its_curves_colour_under_the_title(tmp_path, monkeypatch):
    """Each curve's dashed reference takes its curve's colour (two tasks' references told apart), and the figure
    carries the title given."""
    figures = _saved_figures(monkeypatch)
    curves = {task: {"psnr": [20.0, 18.0], "ssim": [0.8, 0.7], "psnr_ref": [15.0, 14.0], "ssim_ref": [0.5, 0.4]}
              for task in ("reach", "push")}
    plots.horizon_curves(curves, tmp_path / "h.png", title="LIBERO goal: imagined vs real")
    fig = figures[0]
    assert fig._suptitle.get_text() == "LIBERO goal: imagined vs real"
    for ax in fig.axes:
        lines = [ln for ln in ax.lines if len(ln.get_xdata())]
        solid = [ln.get_color() for ln in lines if ln.get_linestyle() == "-"]
        dashed = [ln.get_color() for ln in lines if ln.get_linestyle() == "--"]
        assert len(set(solid)) == 2 and dashed == solid


def test_a_figure_named_without_a_suffix_is_written_in_matplotlibs_configured_format(tmp_path, monkeypatch):
    """A path without a suffix is saved in the format matplotlib's savefig.format names (PNG by default, SVG where
    configured so), under the name given."""
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "savefig.format", "png")
    path = plots.success_bars({"a": {"reach-v3": 0.5}}, tmp_path / "success")
    assert path == tmp_path / "success" and path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setitem(matplotlib.rcParams, "savefig.format", "svg")
    path = plots.horizon_curves({"reach": {"psnr": [20.0], "ssim": [0.8]}}, tmp_path / "horizon")
    assert b"<svg" in path.read_bytes()[:1000] and not list(tmp_path.glob("*.tmp"))


def _log(path, values, step=lambda i: i + 1):
    path.write_text("".join(json.dumps({"step": step(i), "loss": v}) + "\n" for i, v in enumerate(values)))
    return path


def test_training_curves_take_a_log_axis_only_past_a_decade(tmp_path, monkeypatch):
    """Values from 1.0 down to exactly 0.1 span a decade, not more: the axis stays linear; down to 0.09 it is
    logarithmic."""
    figures = _saved_figures(monkeypatch)
    log = tmp_path / "metrics.jsonl"
    for low in (0.1, 0.09):
        plots.training_curves(_log(log, [1.0, 0.5, low]), tmp_path / "t.png", [("loss", "loss", True, False)], "t")
    assert [fig.axes[0].get_yscale() for fig in figures] == ["linear", "log"]


def test_training_curves_label_the_steps_under_the_bottom_row_only(tmp_path, monkeypatch):
    """Four panels in a 2 x 2 grid: the x axes of the bottom row are labelled "step", the top row's are not."""
    figures = _saved_figures(monkeypatch)
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}) + "\n" for s in (1, 2)))
    plots.training_curves(log, tmp_path / "t.png", [(k, k, False, False) for k in "abcd"], "t")
    assert [ax.get_xlabel() for ax in figures[0].axes] == ["", "", "step", "step"]
    assert [ax.get_ylabel() for ax in figures[0].axes] == ["a", "b", "c", "d"]


def test_training_curves_mark_a_lone_record_so_it_shows(tmp_path, monkeypatch):
    """A log of one record is a single point, drawn with a marker (a line of one point shows nothing); two or more
    are drawn as a line alone."""
    figures = _saved_figures(monkeypatch)
    log = tmp_path / "metrics.jsonl"
    for values in ([2.0], [2.0, 1.0]):
        plots.training_curves(_log(log, values), tmp_path / "t.png", [("loss", "loss", False, False)], "t")
    assert [fig.axes[0].lines[0].get_marker() for fig in figures] == ["o", "None"]


def test_read_log_keeps_records_whose_step_is_a_float(tmp_path, monkeypatch):
    """A log whose steps were written as floats (10.0) is read whole and drawn up to its last step; a step given as
    text, a boolean or a number that is not finite is no step."""
    log = tmp_path / "metrics.jsonl"
    _log(log, [2.0, 1.5, 1.0], step=lambda i: 10.0 * (i + 1))
    with log.open("a") as f:  # nor true, NaN or Infinity (json reads them): a damaged line's, and no step to draw
        for step in ("40", True, float("nan"), float("inf")):
            f.write(json.dumps({"step": step, "loss": 0.5}) + "\n")
    assert [(r["step"], r["loss"]) for r in plots.read_log(log)] == [(10.0, 2.0), (20.0, 1.5), (30.0, 1.0)]
    figures = _saved_figures(monkeypatch)
    plots.training_curves(log, tmp_path / "t.png", [("loss", "loss", False, False)], "run")
    assert figures[0]._suptitle.get_text() == "run (step 30)"


def test_side_by_side_refuses_sequences_of_two_dtypes(tmp_path):
    """uint8 frames beside float frames would be cast together to floats without a word: refused, naming both."""
    a, b = np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.float64)
    with pytest.raises(ValueError, match=r"side_by_side.*got uint8 \(2, 8, 8, 3\) and float64 \(2, 8, 8, 3\)"):
        plots.side_by_side(a, b)


def test_frame_grid_draws_each_label_beside_its_own_row(tmp_path):
    """Row i's label is drawn in the label column within row i's height, not drifting toward the rows above."""
    from PIL import Image

    H, pad = 40, 30
    rows = [np.full((1, H, H, 3), 128, np.uint8) for _ in range(3)]
    grid = np.asarray(Image.open(plots.frame_grid(rows, tmp_path / "g.png", labels=["a", "b", "c"], pad=pad)))
    label_w = grid.shape[1] - (H + pad) - pad
    ink = np.nonzero((grid[:, :label_w] < 128).any(axis=(1, 2)))[0]
    for i in range(3):
        top = pad + i * (H + pad)
        here = ink[(ink >= top - pad) & (ink < top + H + pad)]
        assert here.size and here.min() >= top and here.max() < top + H, (i, here)
