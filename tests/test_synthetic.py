"""Synthetic data (#5): the conditional GAN, its privacy in the ledger, sharing, quality."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from conftest import TINY, make_settings
from fedpriv.client import HospitalTrainer, hospital_shard
from fedpriv.data.sources import load_splits
from fedpriv.errors import FedprivError
from fedpriv.experiment import prepare, run_experiment
from fedpriv.privacy.accounting import epsilon_spent, poisson_plan
from fedpriv.privacy.plan import classifier_mechanism, gan_mechanism
from fedpriv.synthetic.gan import (
    ConditionalDiscriminator,
    ConditionalGenerator,
    GanShape,
    balanced_labels,
    generate,
    load_generator,
)
from fedpriv.privacy.hospital_state import history_from_metrics
from fedpriv.models import build_model, classifier_parameters
from fedpriv.synthetic.pool import FEDERATED_GAN as FEDERATED_POOL, SyntheticPool
from fedpriv.synthetic.merf import class_sums, run_embedding
from fedpriv.synthetic.prior import gan_prior
from fedpriv.synthetic.share import average_networks, initial_gan, share_synthetic
from fedpriv.synthetic.fidelity import Fidelity, score_features, trusted_hospitals
from fedpriv.synthetic.quality import frechet_distance, train_on_synthetic
from fedpriv.synthetic.sample import main as sample_main
from fedpriv.synthetic.train import train_gan
from in_process import run_in_process
from test_accounting import dp_accounting_epsilon

#: A short GAN for tests (the defaults are in configs/synthetic/_gan.yaml).
SHORT_GAN = ["synthetic.epochs=3", "synthetic.samples_per_class=20", "synthetic.train_epochs=1", "synthetic.batch_size=16"]
#: One GAN trained across the hospitals in three rounds of one epoch.
FEDERATED_GAN = ["synthetic.federated=true", "synthetic.rounds=3"]


@pytest.mark.parametrize("size", [64, 128])
def test_gan_shapes_and_the_discriminator_is_opacus_ready_with_per_layer_samplers(size):
    shape = GanShape(size, latent_dim=16, width=8)
    generator, discriminator = ConditionalGenerator(shape), ConditionalDiscriminator(shape)
    labels = torch.tensor([0, 1, 1])
    images = generator(torch.randn(3, 16), labels)
    assert images.shape == (3, 1, size, size) and images.abs().max() <= 1
    assert discriminator(images, labels).shape == (3,)
    assert ModuleValidator.validate(discriminator, strict=False) == []
    wrapped = GradSampleModule(discriminator, loss_reduction="sum", force_functorch=False)
    wrapped(images.detach(), labels).sum().backward()
    for p in discriminator.parameters():  # one gradient per example for every layer
        assert p.grad_sample.shape == (3, *p.shape)
    # the label reaches the discriminator as a channel: the same image, other label, other logit
    same = images[:1].detach().repeat(2, 1, 1, 1)
    out = discriminator(same, torch.tensor([0, 1]))
    assert out[0] != out[1]


def test_dp_generator_really_conditions_on_malignancy(tmp_path):
    """A classifier trained on real phantom images separates the generator's two classes."""
    settings = make_settings(["synthetic=augment", "data.image_size=32", "data.num_patients=300", "synthetic.epochs=8"])
    splits = load_splits(settings.data, settings.seed)
    real = LogisticRegression(C=0.01, max_iter=2000).fit(splits.train.images.reshape(len(splits.train), -1), splits.train.labels)
    mechanism = gan_mechanism(settings, len(splits.train))
    trained = train_gan(splits.train, settings.synthetic, False, mechanism.noise_multiplier, seed=0)
    assert sum(n for *_, n in trained.history) == mechanism.steps  # every discriminator step accounted
    labels = balanced_labels(150)
    images = generate(trained.generator, labels, seed=1).reshape(len(labels), -1) / 255.0
    auroc = roc_auc_score(labels, real.predict_proba(images)[:, 1])
    assert auroc > 0.75, f"generated classes are not separated (AUROC {auroc:.3f})"
    swapped = roc_auc_score(1 - labels, real.predict_proba(images)[:, 1])
    assert swapped < 0.25  # and the label means what it says: malignant looks malignant


def test_gan_and_classifier_compose_to_the_target_and_agree_with_dp_accounting():
    settings = make_settings([*TINY, "synthetic=augment", "privacy.target_epsilon=6", "synthetic.epsilon_share=0.3"])
    n = 25
    gan, classifier = gan_mechanism(settings, n), classifier_mechanism(settings, n)
    gan_alone = epsilon_spent([gan.entry], 1e-5)
    assert gan_alone == pytest.approx(0.3 * 6, rel=0.01) and gan_alone <= 1.8
    whole = [gan.entry] + [classifier.entry] * settings.rounds
    total = epsilon_spent(whole, 1e-5)
    assert total <= 6 and total == pytest.approx(6, rel=0.01)
    assert total == pytest.approx(dp_accounting_epsilon(whole, 1e-5), rel=0.01)
    # the GAN's share is not free: the classifier needs more noise than without a GAN
    plain = classifier_mechanism(make_settings([*TINY, "privacy.target_epsilon=6"]), n)
    pretrain = classifier_mechanism(make_settings([*TINY, "synthetic=pretrain", "privacy.target_epsilon=6"]), n)
    assert pretrain.sample_rate == plain.sample_rate and pretrain.noise_multiplier > plain.noise_multiplier
    # augment: Poisson sampling runs over real + synthetic records (mix_ratio=1: twice as many)
    assert classifier.sample_rate == poisson_plan(2 * n, settings.training.batch_size)[0] < plain.sample_rate


def test_a_gan_without_dp_has_infinite_epsilon():
    assert epsilon_spent([(0.0, 0.5, 10)], 1e-5) == math.inf
    assert epsilon_spent([(0.0, 0.5, 10), (1.0, 0.1, 5)], 1e-5) == math.inf
    settings = make_settings([*TINY, "synthetic=pretrain", "synthetic.dp=false"])
    assert gan_mechanism(settings, 30).noise_multiplier == 0.0
    # the classifier keeps its own calibration (a non-private GAN is not "composed" away)
    assert classifier_mechanism(settings, 30) == classifier_mechanism(make_settings(TINY), 30)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["privacy=none", "synthetic=augment"], "synthetic.dp=true"),
        (["synthetic=augment", "synthetic.epsilon_share=1.0"], "synthetic.epsilon_share"),
        (["synthetic=augment", "synthetic.mix_ratio=0"], "synthetic.mix_ratio"),
        (["synthetic=pretrain", "+synthetic.mix_ratio=1.0"], "synthetic.mix_ratio"),
        (["synthetic=augment", "synthetic.epochs=0"], "synthetic.epochs"),
        (["synthetic=augment", "data.image_size=48"], "power of two"),
        (["synthetic=augment", "data=phantom_ct", "model=cnn3d_small"], "volumes"),
        (["synthetic=augment", "synthetic.dp=yes"], "synthetic.dp"),
        (["synthetic=augment", "synthetic.name=sometimes"], "synthetic="),
        (["synthetic=augment", "synthetic.min_fidelity=2"], "synthetic.min_fidelity"),
        (["synthetic=augment", "synthetic.prior=imagenet"], "synthetic.prior"),
        (["synthetic=augment", "synthetic.prior=phantom", "synthetic.prior_epochs=0"], "synthetic.prior_epochs"),
        (["synthetic=augment", "synthetic.federated=true", "synthetic.rounds=7"], "synthetic.rounds"),
        (["synthetic=augment", "synthetic.federated=maybe"], "synthetic.federated"),
        (["synthetic=augment", "synthetic.generator=vae"], "synthetic.generator"),
        (["synthetic=augment", "synthetic.generator=merf", "synthetic.embedding_dims=0"], "synthetic.embedding_dims"),
        (["synthetic=augment", "synthetic.generator=merf", "synthetic.federated=true"], "synthetic.generator=merf"),
    ],
)
def test_bad_synthetic_settings_are_named(overrides, named):
    with pytest.raises(FedprivError, match=named.replace(".", r"\.")):
        make_settings(overrides)


def test_budget_check_counts_the_gan():
    # enough for the classifier's first round alone, not for the GAN plus that round
    settings = make_settings([*TINY, "synthetic=augment", "privacy.budget_epsilon=1.0", "synthetic.epsilon_share=0.9"])
    with pytest.raises(FedprivError, match="its GAN and one round"):
        prepare(settings)


def test_a_hospital_releases_only_generated_images_and_its_generator(tmp_path):
    settings = make_settings([*TINY, "synthetic=augment", *SHORT_GAN])
    trainer = HospitalTrainer(settings, str(tmp_path))
    released, metrics = trainer.synthesize(0)
    assert set(released) == {"images", "labels"} | {k for k in released if k.startswith("generator.")}
    real = hospital_shard(settings, 0).images
    fake = released["images"].numpy().astype(np.float32) / 255.0
    assert fake.shape == (40, *real.shape[1:])
    distance = np.abs(fake[:, None] - real[None]).reshape(len(fake), len(real), -1).max(axis=-1)
    assert distance.min() > 1 / 255, "a released image equals a real record"
    state = json.loads((tmp_path / "hospital_0.json").read_text())
    assert [s["round"] for s in state["spent"]] == [0]  # recorded before anything left
    assert metrics["epsilon"] == pytest.approx(epsilon_spent([gan_mechanism(settings, len(real)).entry], 1e-5))


def test_the_gan_prior_is_public_cached_and_where_every_hospital_gan_starts(tmp_path):
    settings = make_settings([*TINY, "synthetic=augment", *SHORT_GAN, "synthetic.prior=phantom", "synthetic.prior_epochs=1",
                              f"prior.cache_dir={tmp_path}"])
    weights, step = gan_prior(settings)
    assert step["mechanism"] == "public-gan-prior" and step["epsilon"] == 0.0
    assert {k.split(".")[0] for k in weights} == {"generator", "discriminator"}
    again, same_step = gan_prior(settings)
    assert same_step == step and all(torch.equal(weights[k], again[k]) for k in weights)  # read from the cache
    wider = make_settings([*TINY, "synthetic=augment", *SHORT_GAN, "synthetic.prior=phantom", "synthetic.prior_epochs=1",
                           f"prior.cache_dir={tmp_path}", "synthetic.width=32"])
    assert gan_prior(wider)[1]["cache_key"] != step["cache_key"]  # a setting that shapes the GAN: another prior
    shard = hospital_shard(settings, 0)
    still = dataclasses.replace(settings.synthetic, lr=1e-12, epochs=1)  # (Adam's step ≈ lr): the networks stay where they start
    trained = train_gan(shard, still, False, None, 0, start=weights)
    for name, value in trained.generator.named_parameters():
        assert torch.allclose(value, weights[f"generator.{name}"], atol=1e-6), name
    for name, value in trained.discriminator.named_parameters():
        assert torch.allclose(value, weights[f"discriminator.{name}"], atol=1e-6), name


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, a + 1.0) == pytest.approx(5.0, rel=0.01)  # ‖Δμ‖² = 5
    assert frechet_distance(a, rng.normal(size=(400, 5))) < frechet_distance(a, a * 3)


def _labelled_features(rng, n, shift=1.5):
    labels = np.arange(n) % 2
    return rng.normal(size=(n, 8)) + shift * labels[:, None] * np.eye(8)[0], labels


def test_fidelity_tells_faithful_swapped_and_meaningless_labels_apart():
    rng = np.random.default_rng(0)
    synthetic, labels = _labelled_features(rng, 200)
    val, val_labels = _labelled_features(rng, 200)
    faithful = score_features(synthetic, labels, val, val_labels)
    swapped = score_features(synthetic, 1 - labels, val, val_labels)
    meaningless = score_features(synthetic, rng.permutation(labels), val, val_labels)
    assert faithful.verdict == "ok" and faithful.val_auroc > 0.8 and faithful.separability > 0.8
    assert swapped.verdict == "swapped" and swapped.val_auroc < 0.2 and swapped.separability > 0.8  # distinct, misnamed
    assert meaningless.separability < 0.65 and abs(meaningless.val_auroc - 0.5) < 0.25
    one_class = score_features(synthetic[labels == 1], labels[labels == 1], val, val_labels)
    assert math.isnan(one_class.val_auroc) and one_class.verdict == "one class"


def test_min_fidelity_keeps_only_the_hospitals_that_reach_it():
    scores = {"0": Fidelity(0.71, 0.9, 40), "1": Fidelity(0.52, 0.6, 40), "2": Fidelity(float("nan"), float("nan"), 20),
              "pooled": Fidelity(0.6, 0.7, 100)}
    assert trusted_hospitals(scores, None) == [0, 1, 2]
    assert trusted_hospitals(scores, 0.6) == [0]
    assert trusted_hospitals(scores, 0.9) == []


@pytest.fixture(scope="module")
def augment_run(tmp_path_factory):
    """One federated DP run with synthetic=augment (DP GAN), shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("augment")
    settings = make_settings([*TINY, "synthetic=augment", *SHORT_GAN])
    return settings, run_dir, run_in_process(settings, run_dir)


def test_augment_run_accounts_gan_and_classifier_in_one_epsilon_per_hospital(augment_run):
    settings, run_dir, summary = augment_run
    ledger = json.loads((run_dir / "ledger.json").read_text())
    for h, info in summary["privacy"]["hospitals"].items():
        entries = [e for e in ledger["entries"] if str(e["hospital"]) == h]
        assert [e["mechanism"] for e in entries] == ["dp-gan", "dp-sgd", "dp-sgd"]
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
        assert info["epsilon"] == pytest.approx(dp_accounting_epsilon(history, 1e-5), rel=0.01)
        assert info["epsilon"] <= 8.0 and info["epsilon"] == pytest.approx(8.0, rel=0.02)
        assert info["gan"]["epsilon"] == pytest.approx(0.25 * 8.0, rel=0.01)
        assert info["gan"]["epsilon"] < info["classifier_epsilon"] < info["epsilon"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(line["hospitals_trained"] == [0, 1] for line in lines)


def test_augment_run_reports_quality_and_writes_samples_generators_and_pool(augment_run):
    settings, run_dir, summary = augment_run
    block = summary["synthetic"]
    assert block["mode"] == "augment" and block["dp"] is True
    assert block["images"] == 2 * 2 * 20 and block["malignant"] == 40
    assert 0 <= block["tstr_auroc"] <= 1 and block["frechet_distance"] > 0 and block["frechet_distance_real_val_vs_test"] > 0
    assert set(block["gan_seconds"]) == {"0", "1"} and block["gan_seconds_max"] > 0
    for h in (0, 1):
        grid = Image.open(run_dir / "synthetic" / f"samples_hospital_{h}.png")
        assert grid.size[0] > 100
        assert (run_dir / "synthetic" / f"generator_hospital_{h}.pt").stat().st_size > 0
    assert json.loads((run_dir / "summary.json").read_text())["synthetic"]["images"] == 80
    fidelity = block["fidelity"]
    assert set(fidelity["scores"]) == {"0", "1", "pooled"} and fidelity["used_hospitals"] == [0, 1]
    for score in fidelity["scores"].values():
        assert score["verdict"] in ("ok", "chance", "swapped", "one class") and score["images"] > 0
        assert score["val_auroc"] is None or 0 <= score["val_auroc"] <= 1


def test_sampling_command_writes_an_image_folder_the_data_sources_read(augment_run, tmp_path):
    _, run_dir, _ = augment_run
    out = tmp_path / "samples"
    for seed, split in enumerate(("train", "val", "test")):  # other seeds, other images: the same image twice is refused
        assert sample_main([str(run_dir / "synthetic" / "generator_hospital_1.pt"), "--num", "12", "--out", str(out), "--split", split, "--seed", str(seed)]) == 0
    settings = make_settings(["data=image_folder", f"data.root={out}", "data.image_size=32", "data.class_folders={malignant: 1, benign: 0}"])
    splits = load_splits(settings.data, 0)
    assert len(splits.train) == 12 and splits.train.labels.sum() == 6
    generator, facts = load_generator(run_dir / "synthetic" / "generator_hospital_1.pt")
    assert facts["hospital"] == 1 and generator.shape.image_size == 32
    assert sample_main([str(run_dir / "summary.json"), "--num", "3", "--out", str(out)]) == 2


def test_pretrain_without_dp_reports_infinite_epsilon_with_a_warning(tmp_path):
    # a federated GAN here (each hospital's own GAN runs in augment_run): both through the real ClientApp
    settings = make_settings([*TINY, "rounds=1", "synthetic=pretrain", "synthetic.dp=false", *SHORT_GAN, *FEDERATED_GAN])
    summary = run_in_process(settings, tmp_path)
    privacy = summary["privacy"]
    assert privacy["max_epsilon"] == math.inf and "synthetic.dp=false" in privacy["warnings"][0]
    for info in privacy["hospitals"].values():
        assert info["epsilon"] == math.inf and info["gan"]["mechanism"] == "gan-without-dp"
        assert 0 < info["classifier_epsilon"] <= 8.0  # the classifier alone is still DP
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["privacy"]["max_epsilon"] == "inf" and float(written["privacy"]["max_epsilon"]) == math.inf
    assert "WITHOUT" not in written["synthetic"]["warning"] and "without DP" in written["synthetic"]["warning"]
    assert (tmp_path / "synthetic" / "pretrained.pt").exists() and (tmp_path / "synthetic" / "generator_federated.pt").exists()
    pretrained = torch.load(tmp_path / "synthetic" / "pretrained.pt", weights_only=True)
    assert any(not torch.equal(v, initial) for v, initial in zip(pretrained.values(), _initial(settings).values()))


def _initial(settings):
    from fedpriv.server import initial_weights

    return initial_weights(settings)


def test_federated_gan_averages_both_networks_by_records_in_hospital_order():
    a = {"generator.w": torch.tensor([1.0, 2.0]), "discriminator.w": torch.tensor([0.0])}
    b = {"generator.w": torch.tensor([5.0, 6.0]), "discriminator.w": torch.tensor([4.0])}
    averaged = average_networks({1: (b, 30), 0: (a, 10)})
    assert torch.equal(averaged["generator.w"], torch.tensor([4.0, 5.0])) and torch.equal(averaged["discriminator.w"], torch.tensor([3.0]))


def test_a_federated_gan_round_spends_its_share_of_the_gans_epsilon_and_releases_only_networks(tmp_path):
    settings = make_settings([*TINY, "synthetic=pretrain", *SHORT_GAN, *FEDERATED_GAN])
    trainer = HospitalTrainer(settings, str(tmp_path))
    start = initial_gan(settings)
    weights, metrics = trainer.train_gan_round(0, 1, start)
    assert set(weights) == set(start)  # both networks, nothing else: no image, no record
    assert any(not torch.equal(weights[k], start[k]) for k in start)
    for gan_round in (2, 3):
        weights, metrics = trainer.train_gan_round(0, gan_round, weights)
    state = json.loads((tmp_path / "hospital_0.json").read_text())
    assert [s["round"] for s in state["spent"]] == [-2, -1, 0]  # before the classifier's round 1, recorded before release
    whole = gan_mechanism(settings, len(hospital_shard(settings, 0)))
    assert sum(s["steps"] for s in state["spent"]) == whole.steps  # the planned GAN training, in three rounds
    assert metrics["epsilon"] == pytest.approx(epsilon_spent([whole.entry], 1e-5))  # the same ε as one hospital's own GAN
    assert metrics["epsilon"] == pytest.approx(0.25 * 8.0, rel=0.01)


class _InProcessFederation:
    """The hospitals' GAN rounds run in this process (the engine is not what is tested here);
    `fail_round`: the round in which hospital 1 fails."""

    def __init__(self, settings, state_dir, fail_round=None):
        self.trainer, self.fail_round, self.asked = HospitalTrainer(settings, str(state_dir)), fail_round, []

    def train_gan_round(self, gan_round, weights):
        self.asked.append(gan_round)
        released, failed = {}, {}
        for hospital in (0, 1):
            if gan_round == self.fail_round and hospital == 1:
                failed[hospital] = "injected"
            else:
                released[hospital] = self.trainer.train_gan_round(hospital, gan_round, weights)
        return released, failed


def test_a_federated_gan_killed_in_a_round_resumes_from_the_last_finished_one(tmp_path):
    settings = make_settings([*TINY, "synthetic=pretrain", *SHORT_GAN, *FEDERATED_GAN])
    whole = share_synthetic(_InProcessFederation(settings, tmp_path / "whole_hospitals"), settings, tmp_path / "whole")
    broken = _InProcessFederation(settings, tmp_path / "hospitals", fail_round=2)
    with pytest.raises(FedprivError, match="GAN round 2.*hospital 1: injected"):
        share_synthetic(broken, settings, tmp_path / "run")
    again = _InProcessFederation(settings, tmp_path / "hospitals")
    resumed = share_synthetic(again, settings, tmp_path / "run")
    assert again.asked == [2, 3]  # round 1 is not trained again
    assert np.array_equal(resumed.pool.images, whole.pool.images) and set(resumed.pool.hospitals) == {FEDERATED_POOL}
    for hospital in (0, 1):  # hospital 0's replayed round 2 is the same release: recorded once
        spent = json.loads((tmp_path / "hospitals" / f"hospital_{hospital}.json").read_text())["spent"]
        assert [s["round"] for s in spent] == [-2, -1, 0]
        assert history_from_metrics(resumed.reports[hospital]) == history_from_metrics(whole.reports[hospital])


@pytest.mark.slow
def test_federated_gan_run_accounts_every_gan_round_and_draws_the_pool_from_one_generator(tmp_path):
    settings = make_settings([*TINY, "rounds=1", "synthetic=pretrain", *SHORT_GAN, *FEDERATED_GAN])
    summary = run_experiment(settings, tmp_path)
    for entries in _accounted_hospitals(summary, tmp_path):
        assert [(e["round"], e["mechanism"]) for e in entries] == [(-2, "dp-gan"), (-1, "dp-gan"), (0, "dp-gan"), (1, "dp-sgd")]
    block = summary["synthetic"]
    assert block["federated"] is True and block["images"] == 2 * 2 * 20 and set(block["gan_seconds"]) == {"0", "1"}
    assert set(block["fidelity"]["scores"]) == {str(FEDERATED_POOL), "pooled"}
    assert (tmp_path / "synthetic" / "samples_federated.png").exists()
    generator, facts = load_generator(tmp_path / "synthetic" / "generator_federated.pt")
    assert facts["rounds"] == 3 and generator.shape.image_size == 32


def test_pretraining_under_a_frozen_backbone_trains_the_head_alone():
    settings = make_settings([*TINY, "synthetic=pretrain", *SHORT_GAN, "training.freeze=backbone"])
    rng = np.random.default_rng(0)
    pool = SyntheticPool(rng.integers(0, 256, (16, 1, 32, 32), dtype=np.uint8), np.repeat([0, 1], 8), np.zeros(16, np.int64))
    start = _initial(settings)
    pretrained = train_on_synthetic(settings, start, pool)
    head = classifier_parameters(build_model(settings.model, settings.data.image_size))
    changed = {k for k in start if not torch.equal(start[k], pretrained[k])}
    assert changed and changed <= head


def test_the_generator_step_leaves_a_frozen_part_of_the_discriminator_frozen():
    from fedpriv.synthetic.train import frozen

    discriminator = ConditionalDiscriminator(GanShape(32, latent_dim=16, width=8))
    discriminator.label_map.requires_grad_(False)  # e.g. a public part that DP-SGD must not train
    with frozen(discriminator):
        assert not any(p.requires_grad for p in discriminator.parameters())
    assert not discriminator.label_map.weight.requires_grad
    assert all(p.requires_grad for name, p in discriminator.named_parameters() if not name.startswith("label_map"))


MERF = ["synthetic.generator=merf", "synthetic.embedding_dims=16", "synthetic.generator_steps=20"]


def test_under_merf_a_hospital_releases_only_its_noisy_class_sums_once(tmp_path):
    settings = make_settings([*TINY, "synthetic=pretrain", *SHORT_GAN, *MERF])
    trainer = HospitalTrainer(settings, str(tmp_path))
    released, metrics = trainer.synthesize(0)
    assert set(released) == {"sums", "counts"}  # no image, no generator, no record
    shard = hospital_shard(settings, 0)
    exact_sums, exact_counts = class_sums(run_embedding(settings), shard)
    assert released["sums"].shape == exact_sums.shape and released["sums"].shape[0] == 2
    mechanism = gan_mechanism(settings, len(shard))
    assert (mechanism.sample_rate, mechanism.steps) == (1.0, 1)  # one Gaussian release
    noise = torch.cat([(released["sums"] - exact_sums).flatten(), released["counts"] - exact_counts])
    assert noise.std().item() == pytest.approx(mechanism.noise_multiplier, rel=0.3)
    per_record = run_embedding(settings)((torch.from_numpy(shard.images) - 0.5) / 0.5)
    assert per_record.norm(dim=1).max().item() <= 1 + 1e-5  # with the count: sensitivity 1
    state = json.loads((tmp_path / "hospital_0.json").read_text())
    assert [(s["round"], s["sample_rate"], s["steps"]) for s in state["spent"]] == [(0, 1.0, 1)]
    assert metrics["epsilon"] == pytest.approx(0.25 * 8.0, rel=0.01)


def test_a_merf_run_accounts_one_release_per_hospital_and_draws_the_pool_from_one_generator(tmp_path):
    settings = make_settings([*TINY, "rounds=1", "synthetic=pretrain", *SHORT_GAN, *MERF])
    summary = run_in_process(settings, tmp_path)
    for entries in _accounted_hospitals(summary, tmp_path):
        assert [(e["mechanism"], e["sample_rate"], e["steps"]) for e in entries][0] == ("dp-gan", 1.0, 1)
    block = summary["synthetic"]
    assert block["generator"] == "merf" and block["images"] == 2 * 2 * 20 and set(block["gan_seconds"]) == {"0", "1"}
    assert set(block["fidelity"]["scores"]) == {str(FEDERATED_POOL), "pooled"}
    assert (tmp_path / "synthetic" / "generator_federated.pt").exists()


def _accounted_hospitals(summary: dict, run_dir) -> list[list[dict]]:
    """Each hospital's ledger entries, after checking that its ε is their composition
    (cross-checked with dp-accounting), at most the target 8, and its generator's part a quarter."""
    ledger = json.loads((run_dir / "ledger.json").read_text())
    hospitals = []
    for h, info in summary["privacy"]["hospitals"].items():
        entries = [e for e in ledger["entries"] if str(e["hospital"]) == h]
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
        assert info["epsilon"] == pytest.approx(dp_accounting_epsilon(history, 1e-5), rel=0.01) and info["epsilon"] <= 8.0
        assert info["gan"]["epsilon"] == pytest.approx(0.25 * 8.0, rel=0.01)
        hospitals.append(entries)
    assert hospitals
    return hospitals
