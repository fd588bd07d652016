"""predictions.png: balanced rows (no lone image under a full row), each image large enough to see."""

import math

import pytest
from PIL import Image

from bitmoji.trainer.predict import Prediction, grid_rows, plot_predictions


@pytest.mark.parametrize(
    "n, rows",
    [(1, [1]), (5, [5]), (6, [3, 3]), (7, [4, 3]), (10, [5, 5]), (11, [4, 4, 3]), (26, [5, 5, 4, 4, 4, 4])],
)
def test_grid_rows_examples(n, rows):
    assert grid_rows(n) == rows


@pytest.mark.parametrize("max_columns", [1, 3, 5, 8])
def test_grid_rows_are_as_few_as_the_width_allows_and_balanced(max_columns):
    for n in range(1, 60):
        rows = grid_rows(n, max_columns)
        assert sum(rows) == n and len(rows) == math.ceil(n / max_columns), (n, rows)
        assert max(rows) <= max_columns and max(rows) - min(rows) <= 1, (n, rows)
        assert rows == sorted(rows, reverse=True), (n, rows)  # the short rows last


def test_grid_rows_refuses_nothing_to_plot():
    with pytest.raises(ValueError):
        grid_rows(0)


def test_plot_is_as_wide_as_its_longest_row_with_300_pixels_per_image(tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 48), "red").save(image)
    predictions = [Prediction(str(image), "eva", 0.9, 2.2)] * 7
    path = plot_predictions(predictions, tmp_path / "p.png")
    with Image.open(path) as plot:
        assert plot.size == (4 * 300, 2 * 340)  # rows of 4 and 3, 3 inches (+0.4 for the title) at 100 dpi
