"""The SAS subset baseline: k-means latent classes, budgets, the augmentation similarity, the greedy
rule on hand-checked examples, and the init stage's ``sas`` subset on the tiny digits run."""

import pytest
import torch

from mkdt.config import load_config
from mkdt.data.real import load_real
from mkdt.errors import ArtifactError
from mkdt.graph import STAGES, defining
from mkdt.nn.augment import SSLAugment
from mkdt.runtime import derive_seed
from mkdt.stages import evaluate, experts, init, targets, teacher
from mkdt.store import RunDir
from mkdt.train.sas import (
    augmentation_similarity,
    class_budgets,
    encode_views,
    greedy_select,
    latent_classes,
    sas_select,
)
from tests.helpers import load_indices, real_data, tiny_config

# s_ij of 4 examples: 0 and 1 are near-duplicates (s_01 = 0.9), 3 is unlike 1 (s_13 < 0)
SIMILARITY = torch.tensor(
    [
        [1.0, 0.9, 0.5, 0.0],
        [0.9, 1.0, 0.3, -0.4],
        [0.5, 0.3, 1.0, 0.2],
        [0.0, -0.4, 0.2, 1.0],
    ]
)


def test_kmeans_recovers_well_separated_blobs():
    gen = torch.Generator().manual_seed(0)
    truth = torch.randperm(60, generator=gen) % 3
    centres = 10 * torch.eye(16)[:3]
    points = centres[truth] + 0.1 * torch.randn(60, 16, generator=gen)
    found = latent_classes(points, 3, seed=7)
    mapping = {int(t): set(found[truth == t].tolist()) for t in range(3)}
    assert all(len(clusters) == 1 for clusters in mapping.values())  # each blob is one cluster
    assert len(set().union(*mapping.values())) == 3  # and the blobs are different clusters
    assert torch.equal(latent_classes(points, 3, seed=7), found)  # same seed, same clusters


def test_greedy_rule_by_hand():
    # r = sum_j max(s_ij, 0) = [2.4, 2.2, 2.0, 1.2]: step 1 adds 0. Gains r_e - s_e0 then are
    # 1: 2.2 - 0.9 = 1.3, 2: 2.0 - 0.5 = 1.5, 3: 1.2 - 0.0 = 1.2, so step 2 adds 2, not the
    # near-duplicate 1 that a ranking by r alone (the SAS release) would add.
    assert greedy_select(SIMILARITY, 2).tolist() == [0, 2]
    assert sorted(greedy_select(SIMILARITY, 4).tolist()) == [0, 1, 2, 3]
    # negative similarities do not lower r: unclipped row sums (1.1, 1.5, 0.5) would pick 1
    s = torch.tensor([[1.0, 0.6, -0.5], [0.6, 0.9, 0.0], [-0.5, 0.0, 1.0]])
    assert greedy_select(s, 1).tolist() == [0]


def test_augmentation_similarity_by_hand_and_against_a_loop():
    view1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    view2 = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    # s_00 = <(1,0),(.6,.8)> = .6, s_11 = <(0,1),(.8,.6)> = .6,
    # s_01 = (<u_0^1,u_1^2> + <u_0^2,u_1^1>) / 2 = (.8 + .8) / 2
    expected = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    assert torch.allclose(augmentation_similarity(torch.stack([view1, view2])), expected)
    u = torch.nn.functional.normalize(torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1)), dim=2)
    loop = sum(u[p] @ u[q].T for p in range(3) for q in range(3) if p != q) / 6
    assert torch.allclose(augmentation_similarity(u), loop, atol=1e-6)
    assert torch.allclose(augmentation_similarity(u[:1]), u[0] @ u[0].T)


def test_class_budgets_are_proportional_and_sum_exactly():
    # quotas 2.5, 1.5, 1.0 -> floors 2, 1, 1; one left goes to the largest remainder (tie: class 0)
    assert class_budgets(torch.tensor([5, 3, 2]), 5).tolist() == [3, 1, 1]
    assert class_budgets(torch.tensor([1, 1, 1]), 2).tolist() == [1, 1, 0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        sizes = torch.randint(0, 40, (7,), generator=gen)
        total = int(torch.randint(0, int(sizes.sum()) + 1, (1,), generator=gen))
        budgets = class_budgets(sizes, total)
        assert int(budgets.sum()) == total and (budgets <= sizes).all()
        assert ((budgets - total * sizes / sizes.sum()).abs() < 1).all()
    with pytest.raises(ValueError, match="cannot take 4 of 3"):
        class_budgets(torch.tensor([1, 2]), 4)


def test_sas_select_takes_each_class_budget_greedily():
    clusters = torch.tensor([0, 1, 0, 1, 0, 0, 1, 0])  # class 0: 5 examples, class 1: 3
    u = torch.nn.functional.normalize(torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(2)), dim=2)
    chosen = sas_select(clusters, u, 4)  # quotas 2.5 and 1.5: the tied remainder goes to class 0
    assert torch.bincount(clusters[chosen], minlength=2).tolist() == [3, 1]
    members = (clusters == 0).nonzero().flatten()
    expected = members[greedy_select(augmentation_similarity(u[:, members]), 3)]
    assert chosen[:3].tolist() == expected.tolist()


def test_views_are_seeded():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    augment = SSLAugment(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    proxy = torch.nn.Flatten()

    def views(seed):
        return encode_views(proxy, images, augment, 2, torch.Generator().manual_seed(seed), batch_size=4)

    first = views(0)
    assert first.shape == (2, 6, 192) and torch.allclose(first.norm(dim=2), torch.ones(2, 6))
    assert torch.equal(views(0), first) and not torch.equal(views(1), first)


def test_init_definition_and_inputs_with_the_sas_keys():
    expert = load_config("demo", None, [])
    proxy = load_config("demo", None, ["init.sas_proxy=teacher", "init.sas_clusters=4"])
    assert "teacher" not in STAGES["init"].inputs(expert) and "teacher" in STAGES["init"].inputs(proxy)
    # keys added with SAS define init only away from their defaults: earlier runs stay valid
    assert defining(expert, "init")["init"] == {"images": 30}
    assert defining(proxy, "init")["init"] == {"images": 30, "sas_clusters": 4, "sas_proxy": "teacher"}


@pytest.fixture(scope="module")
def run_with_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sas")
    config = tiny_config(root / "cache", "teacher.probe=false", "init.images=30")
    for stage in (teacher, targets, experts):
        stage.run(config, root / "run")
    return config, RunDir(root / "run")


def test_init_stage_writes_the_sas_subset(run_with_experts):
    config, run = run_with_experts
    record = init.run(config, run.path)
    sas = load_indices(run, config)["sas"]
    num_train = real_data(config).num_train
    assert len(sas) == 30 and len(set(sas.tolist())) == 30
    assert 0 <= int(sas.min()) and int(sas.max()) < num_train
    result = record["result"]
    sizes = torch.tensor(result["sas_cluster_sizes"])
    assert len(sizes) == 10 and int(sizes.sum()) == num_train  # k = digits' 10 classes
    assert sum(result["classes_in_sas_subset"]) == 30
    clusters = latent_classes(run.load_targets(num_train), 10, derive_seed(config.seed, "sas-kmeans"))
    assert torch.equal(torch.bincount(clusters[sas], minlength=10), class_budgets(sizes, 30))
    init.run(config, run.path, force=True)
    assert torch.equal(load_indices(run, config)["sas"], sas)  # seeded


def test_init_adds_the_sas_subset_to_an_init_made_before_it(run_with_experts):
    config, run = run_with_experts
    init.run(config, run.path, force=True)
    before = load_indices(run, config)
    # the file and record an earlier mkdt wrote: no sas subset, the same definition at the defaults
    run.save_indices({"high_loss": before["high_loss"], "random": before["random"]}, before["loss"])
    run.finish("init", defining(config, "init"), 1.0, {"images": 30}, (run.indices_path,))
    with pytest.raises(ArtifactError, match="made before the sas subset existed; `mkdt init --out"):
        run.load_indices(30, ["sas"])
    record = init.run(config, run.path)
    after = load_indices(run, config)
    assert all(torch.equal(after[m], before[m]) for m in ("high_loss", "random", "sas", "loss"))
    assert record["result"]["images"] == 30 and sum(record["result"]["classes_in_sas_subset"]) == 30


def test_teacher_proxy_and_evaluation_of_the_sas_subset(run_with_experts):
    config, run = run_with_experts
    other = tiny_config(
        config.data.cache_dir,
        "teacher.probe=false",
        "init.images=30",
        "init.sas_proxy=teacher",
        "init.sas_views=3",
        "init.sas_clusters=5",
        "evaluate.methods=[sas]",
    )
    record = init.run(other, run.path, force=True)
    sas = load_indices(run, other)["sas"]
    assert len(set(sas.tolist())) == 30 and len(record["result"]["sas_cluster_sizes"]) == 5
    real = load_real(other.data, other.seed, torch.device("cpu"))
    z = run.load_targets(real.num_train)
    sets = evaluate.pretraining_sets(run, other, real, z)
    assert sets["sas"] is not None and sets["sas"].lr == other.evaluate.lr
    assert torch.equal(sets["sas"].images, real.inputs[sas]) and torch.equal(sets["sas"].targets, z[sas])
