"""The stage declaration: definitions, prerequisites and per-stage help all come from it."""

import subprocess
from pathlib import Path

import pytest
import torch

from mkdt.cli import main
from mkdt.config import load_config
from mkdt.errors import ArtifactError, ConfigError
from mkdt.files import fingerprint
from mkdt.graph import STAGES, defining, stage_keys
from mkdt.nn.models import resnet18
from mkdt.store import versions


def test_definitions_nest_like_the_config_and_include_what_a_stage_reads():
    config = load_config("demo")
    teacher = defining(config, "teacher")
    assert set(teacher) == {"seed", "data", "teacher"} and teacher["teacher"]["lr"] == 0.01
    assert "checkpoint_every" not in teacher["teacher"] and "root" not in teacher["data"]
    experts = defining(config, "experts")
    assert experts["teacher"] == teacher["teacher"] and experts["experts"]["lr"] == 0.1
    assert "parallel" not in experts["experts"] and "save_epochs" not in experts["experts"]
    assert defining(config, "distill")["init"] == {"images": 30}
    assert "backend" not in defining(config, "distill")["distill"]


def test_a_later_added_key_at_its_default_keeps_earlier_runs_valid():
    config = load_config("demo")
    assert "stem" not in defining(config, "teacher")["teacher"]["model"]  # as before stems existed
    pad2 = load_config("demo", None, ["teacher.model.stem=cifar-pad2"])
    assert defining(pad2, "teacher")["teacher"]["model"]["stem"] == "cifar-pad2"
    assert fingerprint(defining(pad2, "experts")) != fingerprint(defining(config, "experts"))


def test_a_distillation_key_does_not_invalidate_trained_experts():
    # regression: the experts' definition used to include the epochs distillation needs, so
    # changing distill.max_start_epoch made finished experts "incompatible"
    base = load_config("demo")
    other = load_config("demo", None, ["distill.max_start_epoch=1", "distill.lr_img=7"])
    assert fingerprint(defining(base, "experts")) == fingerprint(defining(other, "experts"))
    assert fingerprint(defining(base, "distill")) != fingerprint(defining(other, "distill"))


def test_evaluate_reads_init_and_distill_only_for_the_methods_that_need_them():
    assert set(STAGES["evaluate"].inputs(load_config("demo"))) == {"targets", "init", "distill"}
    only_full = load_config("demo", None, ["evaluate.methods=[no_pretrain,full]"])
    assert STAGES["evaluate"].inputs(only_full) == ("targets",)
    assert "distill" not in defining(only_full, "evaluate")
    mkdt = load_config("demo", None, ["evaluate.methods=[mkdt]", "evaluate.model=null"])
    assert defining(mkdt, "evaluate")["evaluate"]["model"] == {"arch": "convnet", "width": 32, "depth": 2}


def test_a_loaded_teacher_is_defined_by_the_file_not_the_recipe(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(resnet18(width=4).state_dict(), path)
    a = load_config("demo", None, [f"teacher.checkpoint={path}", "teacher.lr=0.5"])
    b = load_config("demo", None, [f"teacher.checkpoint={path}", "teacher.lr=0.7"])
    assert defining(a, "teacher") == defining(b, "teacher")
    assert len(defining(a, "teacher")["teacher"]["checkpoint_sha256"]) == 64


def test_stage_help_lists_the_stages_keys_from_the_declaration(capsys):
    with pytest.raises(SystemExit):
        main(["experts", "--help"])
    text = capsys.readouterr().out
    assert "experts.lr = 0.1" in text and "experts.parallel" in text and "reads: targets" in text
    assert "distill.lr_img" not in text and "teacher.lr " not in text
    for stage in STAGES:
        assert stage_keys(stage), stage


def test_moved_key_names_its_new_place():
    with pytest.raises(ConfigError, match="'distill.images' is now 'init.images'"):
        load_config("demo", None, ["distill.images=10"])


def test_records_carry_the_code_version():
    found = versions()
    assert found["mkdt"] and found["torch"] == torch.__version__
    root = Path(__file__).resolve().parents[1]
    inside = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if inside.returncode == 0 and Path(__import__("mkdt").__file__).resolve().is_relative_to(root):
        assert found["git_commit"] == inside.stdout.strip() and isinstance(found["git_dirty"], bool)


def test_a_prerequisite_made_with_another_config_is_named(tmp_path):
    from mkdt.store import RunDir

    config = load_config("demo")
    run = RunDir(tmp_path)
    run.finish("teacher", defining(load_config("demo", None, ["teacher.lr=0.5"]), "teacher"), 1.0, {})
    with pytest.raises(ArtifactError, match="teacher.lr: 0.5 -> 0.01"):
        run.require("teacher", defining(config, "teacher"), "mkdt teacher")
