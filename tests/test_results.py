"""Result records and the paper-style markdown table."""

import math

import pytest

from mkdt.results import (
    build_records,
    comparisons_text,
    costs_text,
    fraction_label,
    headlines,
    make_record,
    mkdt_margins,
    paired_comparisons,
    paired_difference,
    results_table,
    set_costs,
    summarise,
    t_interval,
)

T_975_2 = 4.302652729911275  # t(0.975) with 2 degrees of freedom (scipy.stats.t.ppf(0.975, 2))


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
        make_record("dsa_set", "c10", 0.01, [0], [37.191]),  # a name mkdt does not know
        make_record("mkdt", "c10", 0.01, [0], [44.357]),
    ]
    lines = results_table(records).splitlines()
    assert lines[0].startswith("| labels |")
    assert lines[2:] == ["| 1% | MKDT | 44.36 ± 0.00 |", "| 1% | dsa_set | 37.19 ± 0.00 |"]


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


def _diverged(method: str, task: str, fraction: float, seeds: list[int], accuracies: list[float], failed):
    """A record whose seeds ``failed`` diverged (they have no accuracy)."""
    return {**make_record(method, task, fraction, seeds, accuracies), "diverged_seeds": failed}


def test_t_interval_by_hand():
    mean, low, high = t_interval([1.0, 2.0, 3.0])  # sd 1, n 3: half-width t * 1 / sqrt(3)
    assert mean == 2.0
    assert high - mean == pytest.approx(T_975_2 / math.sqrt(3)) == pytest.approx(2.4841377118)
    assert mean - low == pytest.approx(2.4841377118)
    assert t_interval([4.5]) == (4.5, None, None)  # one seed: no spread, no interval
    with pytest.raises(ValueError):
        t_interval([])


def test_paired_differences_pair_by_seed_and_leave_out_diverged_seeds():
    mkdt = make_record("mkdt", "c10", 0.01, [0, 1, 2], [41.0, 44.0, 45.0])
    random = _diverged("random", "c10", 0.01, [0, 2], [40.0, 42.0], [1])  # seed 1 diverged
    pair = paired_difference(mkdt, random)
    assert pair is not None
    assert pair["seeds"] == [0, 2] and pair["differences"] == [1.0, 3.0] and pair["n"] == 2
    assert pair["mean"] == 2.0 and (pair["method"], pair["other"]) == ("mkdt", "random")
    half = 12.706204736174707 * math.sqrt(2) / math.sqrt(2)  # t(0.975, 1) * sd / sqrt(n), sd = sqrt(2)
    assert (pair["low"], pair["high"]) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    unordered = make_record("random", "c10", 0.01, [2, 0, 1], [42.0, 40.0, 43.0])  # paired by seed number
    assert paired_difference(mkdt, unordered)["differences"] == [1.0, 1.0, 3.0]
    alone = make_record("random", "c10", 0.01, [5], [30.0])
    assert paired_difference(mkdt, alone) is None  # no common seed


def test_comparisons_cover_every_distilled_set_against_every_other_method():
    seeds = [0, 1, 2]
    runs = {
        "no_pretrain": [30.0, 30.0, 30.0],
        "random": [40.0, 40.0, 40.0],
        "high_loss": [41.0, 42.0, 43.0],
        "full": [60.0, 60.0, 60.0],
        "mkdt_random": [42.0, 42.0, 42.0],
        "mkdt": [42.0, 44.0, 46.0],
    }
    records = [make_record(m, "c10", 0.05, seeds, a) for m, a in runs.items()]
    records.append(make_record("mkdt", "c10", 0.01, [0], [35.0]))  # another setting, mkdt alone
    found = [(c["method"], c["other"], c["label_fraction"]) for c in paired_comparisons(records)]
    order = ["no_pretrain", "random", "high_loss", "mkdt_random", "mkdt", "full"]  # the table's
    assert found == [(d, o, 0.05) for d in ("mkdt_random", "mkdt") for o in order if o != d]
    by_pair = {(c["method"], c["other"]): c for c in paired_comparisons(records)}
    over_high_loss = by_pair[("mkdt", "high_loss")]  # differences [1, 2, 3]
    assert over_high_loss["mean"] == 2.0
    assert over_high_loss["high"] == pytest.approx(2.0 + T_975_2 / math.sqrt(3))
    assert by_pair[("mkdt", "random")]["differences"] == [2.0, 4.0, 6.0]


def test_headlines_name_the_best_same_size_set_by_mean():
    seeds = [0, 1, 2]
    runs = {
        "random": [40.0, 40.0, 40.0],
        "high_loss": [41.0, 42.0, 43.0],  # mean 42: the best same-size set
        "random@alpha": [41.0, 41.0, 41.0],
        "full": [60.0, 60.0, 60.0],  # better, but not the same size
        "no_pretrain": [50.0, 50.0, 50.0],  # not a set: never "the best same-size set"
        "mkdt_random": [99.0, 99.0, 99.0],  # distilled: not a same-size baseline either
        "mkdt": [42.0, 44.0, 46.0],
    }
    records = [make_record(m, "c10", 0.05, seeds, a) for m, a in runs.items()]
    (variant, main) = headlines(records)
    assert main["method"] == "mkdt" and main["best_same_size"] == "high_loss"
    assert main["over_best"]["differences"] == [1.0, 2.0, 3.0]
    assert main["over_random"]["mean"] == 4.0
    assert variant["method"] == "mkdt_random" and variant["best_same_size"] == "high_loss"
    text = comparisons_text(records)
    assert text.startswith("Paired differences (95% t-interval over seeds)\n")
    assert "Linear probe, c10, 5% labels:" in text
    assert "- MKDT minus high-loss subset: +2.00 [-0.48, +4.48], n = 3" in text
    assert "- **MKDT over the random subset: +4.00 [-0.97, +8.97], n = 3**" in text
    assert "- **MKDT over the best same-size set (high-loss subset): +2.00 [-0.48, +4.48], n = 3**" in text


def test_a_set_imported_from_an_mkdt_run_is_compared_like_mkdt_and_never_its_bar():
    seeds = [0, 1, 2]
    runs = {"random": [40.0] * 3, "high_loss": [42.0] * 3, "ext:other": [50.0] * 3, "mkdt": [44.0] * 3}
    records = [make_record(m, "c10", 0.05, seeds, a) for m, a in runs.items()]
    (main,) = headlines(records)  # imported from outside mkdt: a same-size competitor
    assert main["best_same_size"] == "ext:other" and main["over_best"]["mean"] == -6.0
    records[2]["kind"] = "distilled"  # imported from another mkdt run: an MKDT variant
    main, variant = headlines(records)  # table order: imported sets last
    assert (variant["method"], variant["best_same_size"]) == ("ext:other", "high_loss")
    assert variant["over_random"]["mean"] == 10.0
    assert (main["best_same_size"], main["over_best"]["mean"]) == ("high_loss", 2.0)
    assert ("mkdt", "ext:other") in {(c["method"], c["other"]) for c in paired_comparisons(records)}


def test_headlines_without_random_or_a_same_size_set_and_with_one_seed():
    records = [make_record("mkdt", "c10", 0.01, [0], [35.0]), make_record("full", "c10", 0.01, [0], [50.0])]
    (only,) = headlines(records)
    assert only["over_random"] is None and only["best_same_size"] is None and only["over_best"] is None
    text = comparisons_text(records)
    assert "- MKDT minus full data: -15.00, n = 1 (no interval)" in text
    assert "MKDT over the random subset: no common seed" in text
    assert "MKDT over the best same-size set none: no same-size set has results" in text
    assert comparisons_text([make_record("random", "c10", 0.01, [0], [35.0])]) == ""


def test_comparisons_are_made_per_protocol_and_ignore_unknown_fields():
    probe = make_record("mkdt", "c10", 0.01, [0, 1], [40.0, 42.0])
    tuned = {**make_record("mkdt", "c10", 0.01, [0, 1], [50.0, 52.0], "finetune"), "lrs": [0.1, 0.2]}
    other = {**make_record("random", "c10", 0.01, [0, 1], [39.0, 40.0], "finetune"), "selection": "tuned"}
    (pair,) = paired_comparisons([probe, tuned, other])
    assert (pair["protocol"], pair["differences"]) == ("finetune", [11.0, 12.0])
    assert "Fine-tuning (the whole encoder and a linear head), c10, 1% labels:" in comparisons_text(
        [probe, tuned, other]
    )


def _stage(seconds: float, cpu: float | None = None, **result) -> dict:
    record = {"seconds": seconds, "result": result}
    return record if cpu is None else {**record, "cpu_seconds": cpu}


def test_set_costs_sum_the_stages_that_make_each_set():
    records = {
        "teacher": _stage(100.0, 150.0),
        "targets": _stage(10.0, 12.0),
        "experts": _stage(50.0, 60.0),
        "init": _stage(5.0, 6.0),
        "distill": _stage(200.0, 210.0, variants={"random": {}}),
        "evaluate": _stage(1000.0, 1100.0),
    }
    methods = ["mkdt", "random", "high_loss", "full", "no_pretrain", "mkdt_random", "random@alpha"]
    costs = set_costs([*methods, "mtt_ssl", "ext:krr", "sas"], records)
    assert list(costs)[:3] == ["no_pretrain", "random", "sas"]  # table order
    assert costs["mkdt"]["stages"] == ["teacher", "targets", "experts", "init", "distill"]
    assert (costs["mkdt"]["seconds"], costs["mkdt"]["cpu_seconds"]) == (365.0, 438.0)
    assert costs["mkdt_random"]["seconds"] == 365.0 and "variants together" in costs["mkdt_random"]["note"]
    assert (costs["full"]["seconds"], costs["full"]["cpu_seconds"]) == (110.0, 162.0)
    assert costs["high_loss"]["seconds"] == costs["sas"]["seconds"] == 165.0
    assert costs["random"] == costs["no_pretrain"] | {"note": costs["random"]["note"]}
    random = costs["random"]
    assert (random["stages"], random["seconds"], random["cpu_seconds"]) == ([], 0, 0)
    assert "alpha_syn" in costs["random@alpha"]["note"] and costs["random@alpha"]["seconds"] == 0
    assert costs["mtt_ssl"]["seconds"] is None and "outside the pipeline's stages" in costs["mtt_ssl"]["note"]
    assert costs["ext:krr"] == {"stages": [], "seconds": None, "cpu_seconds": None, "note": "imported"}


def test_set_costs_of_older_records_unfinished_stages_and_a_loaded_teacher():
    records = {
        "teacher": _stage(0.5, 0.4, loaded_from="/ckpt.pt"),
        "targets": _stage(10.0),  # written before cpu_seconds was kept
        "experts": None,
    }
    costs = set_costs(["full", "high_loss"], records)
    assert costs["full"]["seconds"] == 10.5 and costs["full"]["cpu_seconds"] is None
    assert "teacher loaded from a checkpoint: its training is not counted" in costs["full"]["note"]
    assert costs["high_loss"]["seconds"] is None
    assert "not finished: experts, init" in costs["high_loss"]["note"]
    lines = costs_text(costs, {"full": 3.25}).splitlines()
    assert lines[0] == "Cost of each set" and "counted in full for each" in lines[2]
    assert lines[4] == "| method | stages | wall s | CPU s | evaluation's pre-training s | note |"
    assert lines[6].startswith("| high-loss subset | teacher, targets, experts, init | – | – | – |")
    assert lines[7].startswith("| full data | teacher, targets | 10.5 | – | 3.2 | teacher loaded")
    assert "evaluation's" not in costs_text(costs)


def test_krr_st_is_a_same_size_set_with_its_own_differences_headlines_and_cost():
    seeds = [0, 1, 2]
    runs = {
        "random": [40.0, 40.0, 40.0],
        "high_loss": [41.0, 41.0, 41.0],
        "krr_st": [42.0, 43.0, 44.0],  # mean 43: MKDT's best same-size set
        "mkdt": [45.0, 45.0, 45.0],
    }
    records = [make_record(m, "c10", 0.05, seeds, a) for m, a in runs.items()]
    found = [(c["method"], c["other"]) for c in paired_comparisons(records)]
    assert found == [
        ("krr_st", "random"),
        ("krr_st", "high_loss"),  # not KRR-ST minus MKDT: that pair is MKDT's
        ("mkdt", "random"),
        ("mkdt", "high_loss"),
        ("mkdt", "krr_st"),
    ]
    krr, mkdt = headlines(records)
    assert (krr["method"], krr["best_same_size"]) == ("krr_st", "high_loss")  # never itself
    assert krr["over_random"]["differences"] == [2.0, 3.0, 4.0]
    assert (mkdt["best_same_size"], mkdt["over_best"]["differences"]) == ("krr_st", [3.0, 2.0, 1.0])
    text = comparisons_text(records)
    assert "each distilled (and KRR-ST) set" in text and "(the subset, KRR-ST, MTT-SSL" in text
    assert "- **KRR-ST over the random subset: +3.00" in text
    assert "(and KRR-ST)" not in comparisons_text([r for r in records if r["method"] != "krr_st"])
    stages = {s: _stage(10.0, 10.0) for s in ("teacher", "targets", "experts", "init")}
    random_start = set_costs(["krr_st"], {**stages, "krr_st": _stage(100.0, 90.0, init="random")})
    assert random_start["krr_st"]["stages"] == ["teacher", "targets", "krr_st"]
    assert random_start["krr_st"]["seconds"] == 120.0 and "random subset" in random_start["krr_st"]["note"]
    scored = set_costs(["krr_st"], {**stages, "krr_st": _stage(100.0, 90.0, init="high_loss")})["krr_st"]
    assert (
        scored["stages"] == ["teacher", "targets", "experts", "init", "krr_st"] and scored["seconds"] == 140.0
    )
    unfinished = set_costs(["krr_st"], stages)["krr_st"]
    assert unfinished["seconds"] is None and "not finished: krr_st" in unfinished["note"]
