"""distill.variants: MKDT from other init subsets made by the same distill stage, into
distill/variants/<subset>/, and evaluated as mkdt_<subset> beside MKDT (the paper's "MKDT (Rnd
Sub)" row without a second run directory)."""

import shutil

import pytest
import torch

from mkdt.config import load_config
from mkdt.errors import ArtifactError, ConfigError
from mkdt.graph import STAGES, defining
from mkdt.methods import INIT_METHODS, VARIANTS, method_label, method_order, parse_method
from mkdt.pipeline import run_stages
from mkdt.stages import distill, evaluate, experts, init, targets, teacher
from mkdt.stages.context import estimated_bytes
from mkdt.store import RunDir
from tests.helpers import interrupted_after_first_checkpoint, real_data, tiny_config

SETTINGS = ["teacher.probe=false", "distill.snapshots=[1]", "distill.check_window=false"]
VARIANT = "distill.variants=[random]"
VOLATILE = {"stage.json", "checkpoint.pt"}  # timings; the pickled state of the loop


def _config(cache, *overrides):
    return tiny_config(cache, *SETTINGS, *overrides)


def _copy(base, out):
    shutil.copytree(base, out)
    return out


def _files(folder):
    """{path relative to ``folder``: bytes} of every file under it but the volatile ones."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in VOLATILE
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"base": every stage before distill, "plain": distilled without variants, "variant": with
    distill.variants=[random], "separate": distilled with distill.init=random}, and the cache."""
    root = tmp_path_factory.mktemp("variants")
    cache, base = root / "cache", root / "base"
    config = _config(cache)
    for stage in (teacher, targets, experts, init):
        stage.run(config, base)
    made = {"base": base}
    for name, extra in (("plain", []), ("variant", [VARIANT]), ("separate", ["distill.init=random"])):
        made[name] = _copy(base, root / name)
        distill.run(_config(cache, *extra), made[name])
    return made, cache


def test_a_variant_is_written_recorded_and_differs_from_the_main_set(runs):
    made, _ = runs
    store = RunDir(made["variant"])
    folder = store.stage_dir("distill") / "variants" / "random"
    names = {"synthetic.safetensors", "grid.png", "history.csv", "snapshot_1.safetensors"}
    assert names | {"checkpoint.pt"} == {p.name for p in folder.iterdir()}
    record = store.record("distill")
    assert {f"distill/variants/random/{name}" for name in names} <= set(record["artifacts"])
    variant, main = store.load_variant("random"), store.load_synthetic()
    assert record["result"]["variants"]["random"]["learned_lr"] == variant.lr != main.lr
    assert not torch.equal(variant.images, main.images)
    assert folder / "checkpoint.pt" in distill.scratch_files(store)  # what --force removes


def test_the_main_set_and_the_definition_are_those_of_a_run_without_variants(runs):
    made, cache = runs
    with_variant, without = (RunDir(made[name]) for name in ("variant", "plain"))
    main = {k: v for k, v in _files(with_variant.stage_dir("distill")).items() if "variants" not in k}
    assert main == _files(without.stage_dir("distill"))
    assert defining(_config(cache, VARIANT), "distill") == defining(_config(cache), "distill")
    assert with_variant.record("distill")["fingerprint"] == without.record("distill")["fingerprint"]
    assert "variants" not in without.record("distill")["result"]


def test_a_variant_is_the_set_a_run_from_its_subset_makes(runs):
    made, cache = runs
    variant = RunDir(made["variant"]).variant("random").distill_dir
    assert _files(variant) == _files(RunDir(made["separate"]).stage_dir("distill"))
    # and it started from the random subset: the pixel change of iteration 1 is measured from it
    store, data = RunDir(made["variant"]), real_data(_config(cache))
    subsets = store.load_indices(40)
    after_one = store.load_synthetic(store.variant("random").snapshot_path(1)).images
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    change = store.variant("random").load_history().pixel_change[0]
    for name, same in (("random", True), ("high_loss", False)):
        start = data.normalize(data.train_images[subsets[name]])
        assert (change == pytest.approx(((after_one - start).abs() * std).mean().item(), rel=1e-5)) is same


def test_adding_a_variant_to_a_finished_run_distills_it_alone(runs, tmp_path, monkeypatch):
    made, cache = runs
    out = _copy(made["plain"], tmp_path / "run")
    store = RunDir(out)
    before = store.synthetic_path.stat().st_mtime_ns
    built, real = [], distill.Distiller
    monkeypatch.setattr(distill, "Distiller", lambda *a, **k: built.append(a) or real(*a, **k))
    record = distill.run(_config(cache, VARIANT), out)
    assert len(built) == 1 and store.synthetic_path.stat().st_mtime_ns == before
    assert _files(store.stage_dir("distill")) == _files(RunDir(made["variant"]).stage_dir("distill"))
    assert set(record["artifacts"]) == set(RunDir(made["variant"]).record("distill")["artifacts"])
    assert distill.run(_config(cache, VARIANT), out)["finished"] == record["finished"]  # done


def test_an_interrupted_variant_resumes_to_the_same_set(runs, tmp_path, monkeypatch):
    made, cache = runs
    out = _copy(made["base"], tmp_path / "run")
    config = _config(cache, VARIANT)
    with interrupted_after_first_checkpoint(monkeypatch, saves=3):  # the main set's 2, the variant's 1st
        distill.run(config, out)
    store = RunDir(out)
    assert store.synthetic_path.is_file() and store.record("distill") is None
    assert store.variant("random").distill_checkpoint_path.is_file()
    assert not store.variant("random").synthetic_path.exists()
    distill.run(config, out)
    assert _files(store.stage_dir("distill")) == _files(RunDir(made["variant"]).stage_dir("distill"))


def test_a_damaged_variant_is_named_and_repaired_to_the_same_bits(runs, tmp_path):
    made, cache = runs
    out = _copy(made["variant"], tmp_path / "run")
    store, rel = RunDir(out), "distill/variants/random/synthetic.safetensors"
    (out / rel).unlink()
    assert store.damaged("distill") == [rel]
    with pytest.raises(ArtifactError, match="mkdt distill --repair"):
        store.verified("distill")
    run_stages(_config(cache, VARIANT), out, ["distill"], repair=True)
    assert _files(store.stage_dir("distill")) == _files(RunDir(made["variant"]).stage_dir("distill"))


def test_evaluate_gives_a_variant_its_own_rows_at_its_learned_lr(runs, tmp_path, monkeypatch):
    made, cache = runs
    config = _config(
        cache,
        VARIANT,
        "evaluate.methods=[mkdt, mkdt_random]",
        "evaluate.seeds=1",
        "evaluate.label_fractions=[0.5]",
        "evaluate.probe_max_iter=20",
    )
    assert "distill" in STAGES["evaluate"].inputs(_config(cache, VARIANT, "evaluate.methods=[mkdt_random]"))
    with pytest.raises(ArtifactError, match="no variant random; list it in distill.variants"):
        evaluate.run(config, _copy(made["plain"], tmp_path / "plain"))
    out = _copy(made["variant"], tmp_path / "run")
    seen = {}
    real = evaluate.pretrain

    def spy(config, method, seed, pset, *args):
        seen[method] = pset
        return real(config, method, seed, pset, *args)

    monkeypatch.setattr(evaluate, "pretrain", spy)
    evaluate.run(config, out)
    variant = RunDir(out).load_variant("random")
    assert seen["mkdt_random"].lr == variant.lr != seen["mkdt"].lr
    assert torch.equal(seen["mkdt_random"].images, variant.images)
    results = RunDir(out).load_results()
    assert [r["method"] for r in results] == ["mkdt", "mkdt_random"]
    table = (out / "results.md").read_text()
    assert (
        "| 50% | MKDT (random init) |" in table and f"MKDT (random init) learned lr {variant.lr:.4g}" in table
    )
    assert "MKDT minus each baseline, digits 50% labels: MKDT (random init) " in table


def test_a_variant_method_needs_its_variant_and_variants_need_other_subsets(tmp_path):
    with pytest.raises(ConfigError) as refused:
        load_config("demo", None, ["evaluate.methods=[mkdt, mkdt_random]"])
    assert "distill.variants" in str(refused.value) and "\n" not in str(refused.value)
    for variants in ("[high_loss]", "[random, random]", "[nope]"):
        with pytest.raises(ConfigError, match="invalid config distill.variants"):
            load_config("demo", None, [f"distill.variants={variants}"])
    config = load_config("demo", None, ["distill.variants=[random, sas]", "evaluate.methods=[mkdt_sas]"])
    assert config.distill.variants == ["random", "sas"]
    data = real_data(_config(tmp_path / "cache"))
    plain, two = _config(tmp_path / "cache"), _config(tmp_path / "cache", "distill.variants=[random, sas]")
    assert estimated_bytes(two, data, "distill") == 3 * estimated_bytes(plain, data, "distill")


def test_variant_methods_name_every_init_subset_and_sit_before_mkdt():
    assert VARIANTS == tuple(f"mkdt_{subset}" for subset in INIT_METHODS)
    assert method_label("mkdt_random") == "MKDT (random init)"
    assert parse_method("mkdt_sas").subset == "sas" and parse_method("mkdt").subset is None
    assert method_order("mkdt_random") < method_order("mkdt")
    table2 = load_config("table2-cifar100")
    assert table2.distill.variants == ["random"] and "mkdt_random" in table2.evaluate.methods
