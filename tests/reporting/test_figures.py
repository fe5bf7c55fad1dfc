"""The report's figures drawn from small hand-made inputs: the forest plot of paired comparisons."""

import pytest
from PIL import Image

from mkdt.reporting import figures
from mkdt.results import make_record, paired_comparisons


def test_the_forest_plot_is_a_png_with_a_panel_per_setting(tmp_path):
    records = [
        make_record(method, task, fraction, [0, 1, 2], [base + shift, base + 2 * shift, base + shift])
        for task, base in (("a", 40.0), ("b", 20.0))
        for fraction in (0.01, 0.05)
        for method, shift in (("random", 0.0), ("high_loss", 0.5), ("full", 5.0), ("mkdt", 1.0))
    ]
    records.append(make_record("mkdt_random", "a", 0.01, [0], [41.0]))  # one seed: no interval
    records.append(make_record("mkdt", "a", 0.01, [0, 1], [50.0, 51.0], "finetune"))
    records.append(make_record("random", "a", 0.01, [0, 1], [49.0, 49.0], "finetune"))
    path = tmp_path / "deep" / "forest.png"
    figures.forest_plot(paired_comparisons(records), path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    width, height = Image.open(path).size
    # 3 rows of panels (probe a, probe b, fine-tuning a) in 2 columns (the label fractions)
    assert width > 900 and height > 300
    with pytest.raises(ValueError, match="at least one comparison"):
        figures.forest_plot([], tmp_path / "none.png")
