import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fedpriv.data.phantom import PhantomSpec, generate_phantom_mammo

SPEC = PhantomSpec(
    num_patients=200, images_per_patient=2, image_size=32, num_sites=3,
    malignant_fraction=0.45, class_separation=2.5, noise_level=1.0,
)


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = generate_phantom_mammo(SPEC, 3), generate_phantom_mammo(SPEC, 3), generate_phantom_mammo(SPEC, 4)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)


def test_records_carry_patient_site_and_age_and_views_share_a_patient():
    r = generate_phantom_mammo(SPEC, 0)
    assert r.images.shape == (400, 1, 32, 32) and r.images.dtype == np.float32
    assert 0.0 <= r.images.min() and r.images.max() <= 1.0
    assert set(r.metadata) >= {"site", "age"}
    assert len(r.patients) == 200
    for patient in r.patients[:20]:
        rows = r.patient_ids == patient
        assert rows.sum() == 2 and len(set(r.labels[rows])) == 1 and len(set(r.metadata["site"][rows])) == 1
    assert set(r.metadata["site"]) == {"site_0", "site_1", "site_2"}
    assert 30 <= r.metadata["age"].min() and r.metadata["age"].max() <= 90
    assert 0.3 < r.malignant_fraction < 0.6


def test_classes_are_learnable_but_overlap():
    """A linear model on pixels finds signal, but the phantom is far from a solved toy."""
    r = generate_phantom_mammo(SPEC, 1)
    x, y = r.images.reshape(len(r), -1), r.labels
    model = LogisticRegression(C=0.01, max_iter=2000).fit(x[:300], y[:300])
    auroc = roc_auc_score(y[300:], model.predict_proba(x[300:])[:, 1])
    assert 0.65 < auroc < 0.97


def test_harder_setting_is_harder():
    """class_separation is a real difficulty knob: malignant and benign looks move apart."""
    def spiculated_gap(separation):
        r = generate_phantom_mammo(PhantomSpec(**{**SPEC.__dict__, "class_separation": separation}), 2)
        centre = r.images[:, 0, 10:22, 10:22].mean(axis=(1, 2))
        return centre[r.labels == 1].mean() - centre[r.labels == 0].mean()

    assert spiculated_gap(4.0) > spiculated_gap(0.5)
