"""The config: defaults, presets, merge order, typed overrides and one-line errors for bad values."""

import pytest

from mkdt.config import (
    Config,
    config_from_dict,
    iter_fields,
    load_config,
    loading,
    preset_description,
    preset_names,
)
from mkdt.errors import ConfigError


def test_defaults_are_the_paper_settings_and_valid():
    c = load_config()
    assert c.experts.num_experts == 100 and c.experts.epochs == 20 and c.experts.lr == 0.1
    assert c.teacher.model.arch == "resnet18" and c.teacher.model.width == 64
    assert c.experts.student.width == 128 and c.experts.student.depth == 3


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads(name):
    assert isinstance(load_config(name), Config)


def test_merge_order_defaults_preset_file_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("experts:\n  lr: 0.05\n  epochs: 6\n")
    c = load_config("demo", str(f), ["experts.epochs=7", "teacher.model.width=8"])
    assert c.data.name == "digits"  # preset
    assert c.experts.lr == 0.05  # file over preset and defaults
    assert c.experts.epochs == 7  # override over file
    assert c.teacher.model.width == 8 and c.teacher.model.arch == "resnet18"


def test_override_values_are_typed():
    c = load_config(
        "demo",
        None,
        [
            "experts.lr=1e-3",
            "data.pool_size=100",
            "data.download=true",
            "experts.save_epochs=[0,1,2,3,4]",
            "data.root=null",
        ],
    )
    assert c.experts.lr == 1e-3 and isinstance(c.experts.lr, float)
    assert c.data.pool_size == 100 and c.data.download is True and c.data.root is None
    assert c.experts.save_epochs == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "override, message",
    [
        ("experts.lrr=1", "did you mean experts.lr"),
        ("nope=1", "unknown config key 'nope'"),
        ("experts.lr=abc", "must be float"),
        ("experts.num_experts=2.5", "must be int"),
        ("experts.num_experts=0", "experts.num_experts"),
        ("data.download=maybe", "must be bool"),
        ("teacher.method=byol", "barlow_twins or simclr"),
        ("teacher.model.arch=vit", "convnet, resnet10 or resnet18"),
        ("experts.save_epochs=[0,2]", "must include [1, 3]"),
        ("experts.save_epochs=[0,1,2,3,99]", "outside"),
        ("distill.max_start_epoch=9", "exceeds experts.epochs"),
        ("teacher.checkpoint=/no/such/file.pt", "file not found"),
        ("device=tpu", "device"),
        ("experts.lr", "key=value"),
    ],
)
def test_bad_values_give_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("demo", None, [override])


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: .*demo"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(None, "/no/such.yaml")


def test_misspelled_key_in_nested_dict_is_rejected():
    with pytest.raises(ConfigError, match="teacher.model.widht"):
        config_from_dict({"teacher": {"model": {"widht": 3}}})


def test_default_expert_epochs_cover_init_and_distillation_and_final():
    c = load_config(
        "demo", None, ["distill.max_start_epoch=2", "distill.expert_epochs=2", "experts.epochs=6"]
    )
    assert c.required_expert_epochs() == [0, 1, 2, 3]
    assert c.expert_save_epochs() == [0, 1, 2, 3, 6]


def test_every_key_is_documented():
    fields = list(iter_fields(Config()))
    assert len(fields) > 30
    assert all(text for _, _, text in fields), [k for k, _, t in fields if not t]


def test_a_resnet_named_without_a_width_gets_64_and_null_sections_take_dotted_overrides():
    assert load_config(None, None, ["experts.student.arch=resnet10"]).experts.student.width == 64
    assert load_config(None).experts.student.width == 128  # the ConvNet's
    model = load_config(
        None, None, ["evaluate.model.arch=resnet10", "evaluate.model.width=16"]
    ).evaluate.model
    assert model is not None and (model.arch, model.width) == ("resnet10", 16)
    with pytest.raises(ConfigError, match="unknown config key 'evaluate.model.widht'"):
        load_config(None, None, ["evaluate.model.widht=16"])


SEVEN_TASKS = {
    *("cifar10", "cifar100", "tinyimagenet"),
    *("fgvc-aircraft", "cub200", "stanford-dogs", "flowers102"),
}


@pytest.mark.parametrize("name", [n for n in preset_names() if n.startswith("table")])
def test_table_presets_name_their_table_and_evaluate_the_seven_tasks(name):
    number = name[len("table")]
    assert preset_description(name).startswith(f"paper Table {number}")
    c = load_config(name)
    assert set(c.evaluate.tasks or ()) == SEVEN_TASKS  # the pre-training dataset among them
    assert c.evaluate.missing_tasks == "skip"


def test_table_presets_build_on_the_distillation_rows():
    row, table = load_config("cifar100-5pct"), load_config("table5-resnet18")
    assert table.init == row.init and table.experts == row.experts and table.teacher == row.teacher
    assert table.distill.iterations == 1000 and table.distill.lr_img == row.distill.lr_img == 10000
    assert (table.evaluate.model.arch, table.evaluate.model.width) == ("resnet18", 64)
    assert table.evaluate.label_fractions == [0.05]
    simclr = load_config("table6-cifar100-simclr")
    assert simclr.data.name == "cifar100" and simclr.distill == load_config("cifar100-2pct").distill
    assert (simclr.teacher.method, simclr.teacher.batch_size, simclr.teacher.lr) == ("simclr", 512, 0.0005)
    assert load_config("table7-tinyimagenet").evaluate.label_fractions == [0.1, 0.5]
    # a preset's own settings, then a file and overrides, come after its base's
    assert load_config("table1-cifar10", None, ["init.images=7"]).init.images == 7


@pytest.mark.parametrize(
    "presets, message",
    [
        ({"a": "base: a\n"}, "presets name each other as base: a -> a"),
        ({"a": "base: b\n", "b": "base: a\n"}, "a -> b -> a"),
        ({"a": "base: nope\n"}, "preset 'a' has unknown base 'nope'; available: a"),
        ({"a": "base: [b]\n"}, "base must be a preset name"),
    ],
)
def test_preset_bases_that_cannot_be_resolved_are_refused(monkeypatch, presets, message):
    monkeypatch.setattr(loading, "preset_names", lambda: sorted(presets))
    monkeypatch.setattr(loading, "_preset_text", lambda name: presets[name])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config("a")


def test_missing_tasks_is_error_or_skip():
    assert load_config("demo").evaluate.missing_tasks == "error"
    with pytest.raises(ConfigError, match="evaluate.missing_tasks: must be error or skip"):
        load_config("demo", None, ["evaluate.missing_tasks=ignore"])
