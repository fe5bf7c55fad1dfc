"""Result records and the paper-style markdown table."""

import math

import pytest

from mkdt.results import build_records, fraction_label, make_record, mkdt_margins, results_table, summarise


def test_summarise_uses_the_sample_std():
    mean, std = summarise([44.0, 45.0, 46.0])
    assert mean == 45.0 and std == 1.0  # ddof=1: sqrt((1 + 0 + 1) / 2)
    assert summarise([50.0, 52.0]) == (51.0, math.sqrt(2))
    assert summarise([37.5]) == (37.5, 0.0)
    with pytest.raises(ValueError):
        summarise([])


def test_make_record_schema():
    record = make_record("mkdt", "cifar10", 0.01, [0, 1], [40.0, 42.0])
    assert record == {
        "method": "mkdt",
        "task": "cifar10",
        "label_fraction": 0.01,
        "seeds": [0, 1],
        "accuracies": [40.0, 42.0],
        "mean": 41.0,
        "std": math.sqrt(2),
        "protocol": "probe",
    }
    with pytest.raises(ValueError, match="2 seeds but 1"):
        make_record("mkdt", "cifar10", 0.01, [0, 1], [40.0])


def test_build_records_gathers_seeds_in_order():
    probes = [
        {"method": m, "seed": s, "task": t, "label_fraction": f, "accuracy": 10 * s + f}
        for m in ("full", "random")
        for s in (1, 0)
        for t in ("a", "b")
        for f in (0.05, 0.01)
    ]
    records = build_records(probes, ["random", "full"], ["b", "a"], [0.01, 0.05])
    assert [(r["method"], r["task"], r["label_fraction"]) for r in records] == [
        (m, t, f) for m in ("random", "full") for t in ("b", "a") for f in (0.01, 0.05)
    ]
    assert records[0]["seeds"] == [0, 1] and records[0]["accuracies"] == [0.01, 10.01]
    with pytest.raises(ValueError, match="no probe results for mkdt"):
        build_records(probes, ["mkdt"], ["a"], [0.01])


def test_fraction_labels():
    assert [fraction_label(f) for f in (0.01, 0.05, 0.1, 0.5, 1.0, 0.001)] == [
        "1%",
        "5%",
        "10%",
        "50%",
        "100%",
        "0.1%",
    ]


def test_table_orders_fractions_then_methods_and_formats_cells():
    records = [
        make_record(m, t, f, [0, 1], [a, a + 2])
        for f, a0 in ((0.05, 50.0), (0.01, 30.0))
        for i, m in enumerate(("full", "mkdt", "random", "no_pretrain", "high_loss"))
        for t, a in (("cifar10", a0 + i), ("cifar100", a0 / 3 + i))
        if not (m == "high_loss" and t == "cifar100")
    ]
    table = results_table(records, header="Pre-trained on cifar10.")
    lines = table.splitlines()
    assert lines[0] == "Pre-trained on cifar10." and lines[1] == ""
    assert lines[2] == "| labels | method | cifar10 | cifar100 |"
    assert lines[3] == "|---|---|---|---|"
    rows = [line.split(" | ")[:2] for line in lines[4:]]
    order = ["no pre-training", "random subset", "high-loss subset", "MKDT", "full data"]
    assert rows == [[f"| {p}", m] for p in ("1%", "5%") for m in order]
    assert lines[4] == "| 1% | no pre-training | 34.00 ± 1.41 | 14.00 ± 1.41 |"
    assert lines[6] == "| 1% | high-loss subset | 35.00 ± 1.41 | – |"
    assert table.endswith("|\n")


def test_table_without_header_and_unknown_method_last():
    records = [
        make_record("krr_st", "c10", 0.01, [0], [37.191]),
        make_record("mkdt", "c10", 0.01, [0], [44.357]),
    ]
    lines = results_table(records).splitlines()
    assert lines[0].startswith("| labels |")
    assert lines[2:] == ["| 1% | MKDT | 44.36 ± 0.00 |", "| 1% | krr_st | 37.19 ± 0.00 |"]


def test_mkdt_margins_name_the_baselines_mkdt_does_not_beat():
    runs = (("no_pretrain", [30, 32]), ("random", [28, 28]), ("mkdt", [31, 31]), ("full", [40, 40]))
    records = [make_record(m, "c10", 0.01, [0, 1], accs) for m, accs in runs]
    text = mkdt_margins(records)
    assert "c10 1% labels: no pre-training +0.00, random subset +3.00" in text
    assert "full data" not in text.splitlines()[0]
    assert text.splitlines()[-1].startswith("MKDT does not beat: no pre-training")
    records[2] = make_record("mkdt", "c10", 0.01, [0, 1], [35, 35])
    assert mkdt_margins(records).splitlines()[-1].startswith("MKDT beats every baseline")
    assert mkdt_margins(records[:2]) == ""


def test_bold_marks_the_best_same_size_method_of_each_column():
    records = [
        make_record("random", "a", 0.01, [0], [30.0]),
        make_record("mkdt", "a", 0.01, [0], [33.0]),
        make_record("full", "a", 0.01, [0], [40.0]),  # an upper reference, never bold
        make_record("mkdt", "b", 0.01, [0], [20.0]),
        make_record("random", "b", 0.01, [0], [20.0]),  # a tie: both bold
        make_record("random", "a", 0.05, [0], [50.0]),
        {**make_record("mkdt", "a", 0.05, [0], [0.0]), "mean": None, "std": None, "diverged_seeds": [0]},
    ]
    lines = results_table(records, bold_best=True).splitlines()
    assert lines[2:] == [
        "| 1% | random subset | 30.00 ± 0.00 | **20.00 ± 0.00** |",
        "| 1% | MKDT | **33.00 ± 0.00** | **20.00 ± 0.00** |",
        "| 1% | full data | 40.00 ± 0.00 | – |",
        "| 5% | random subset | **50.00 ± 0.00** | – |",
        "| 5% | MKDT | diverged | – |",
    ]
    assert "**" not in results_table(records)  # bold only when asked
