"""Tests of twist.evaluate: clustering metrics, confusion matrix, kNN, linear probe."""

from __future__ import annotations

import csv
import itertools
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    adjusted_mutual_info_score,
    adjusted_rand_score,
    normalized_mutual_info_score,
)

from twist.evaluate import (
    cluster_metrics,
    confusion_matrix,
    contingency,
    hungarian_match,
    knn_predict,
    knn_top1,
    linear_probe,
    mapped_topk,
    save_confusion,
)


# ----------------------------------------------------------------------------- helpers
def brute_force_acc(y_true, y_pred):
    """Best one-to-one matching by trying every injective map of the smaller side."""
    k, c = int(y_true.max()) + 1, int(y_pred.max()) + 1
    best = 0
    if c <= k:  # each cluster goes to a distinct class
        for classes in itertools.permutations(range(k), c):
            best = max(best, sum(int(np.sum((y_pred == j) & (y_true == classes[j]))) for j in range(c)))
    else:  # each class goes to a distinct cluster
        for clusters in itertools.permutations(range(c), k):
            best = max(best, sum(int(np.sum((y_true == i) & (y_pred == clusters[i]))) for i in range(k)))
    return best / len(y_true)


def brute_force_knn(train, labels, test, k, T, num_classes, exclude_self=False):
    tr = train / np.linalg.norm(train, axis=1, keepdims=True)
    te = test / np.linalg.norm(test, axis=1, keepdims=True)
    out = []
    for i, q in enumerate(te):
        sims = tr @ q
        order = [j for j in np.argsort(-sims, kind="stable") if not (exclude_self and j == i)]
        votes = np.zeros(num_classes)
        for j in order[:k]:
            votes[labels[j]] += np.exp(sims[j] / T)
        out.append(int(np.argmax(votes)))
    return np.array(out)


def blobs(n, num_classes, dim, sep, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * sep
    y = torch.randint(0, num_classes, (n,), generator=g)
    return centers, y, centers[y] + torch.randn(n, dim, generator=g)


# ----------------------------------------------------------------------------- clustering
def test_acc_is_one_for_permuted_labels():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 300)
    perm = rng.permutation(7)
    m = cluster_metrics(y, perm[y])
    assert m["acc"] == 1.0
    assert m["nmi"] == pytest.approx(1.0) and m["ami"] == pytest.approx(1.0)
    assert m["ari"] == pytest.approx(1.0)
    assert m["mapping"] == {int(perm[c]): c for c in range(7)}
    assert m["clusters_used"] == 7 and m["num_samples"] == 300


def test_acc_more_clusters_than_classes_counts_unmatched_as_errors():
    # contingency: class 0 -> clusters {0: 2, 1: 1}; class 1 -> clusters {2: 2, 3: 1}
    y_true = [0, 0, 0, 1, 1, 1]
    y_pred = [0, 0, 1, 2, 2, 3]
    m = cluster_metrics(y_true, y_pred)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["mapping"] == {0: 0, 2: 1}
    assert m["clusters_used"] == 4
    mapping, matched = hungarian_match(y_true, y_pred)
    assert matched == 4 and mapping == {0: 0, 2: 1}
    # an unused cluster changes neither ACC nor clusters_used
    m2 = cluster_metrics(y_true, y_pred, num_clusters=10)
    assert m2["acc"] == pytest.approx(4 / 6) and m2["clusters_used"] == 4
    assert m2["num_clusters"] == 10


def test_acc_fewer_clusters_than_classes_counts_unmatched_classes_as_errors():
    # contingency rows (classes) x cols (clusters): [[2, 0], [1, 1], [0, 2]]
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 1]
    m = cluster_metrics(y_true, y_pred)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["mapping"] == {0: 0, 1: 2}
    # one cluster for everything: ACC is the largest class's share
    m1 = cluster_metrics([0, 1, 1, 2, 2, 2], [0] * 6)
    assert m1["acc"] == pytest.approx(3 / 6) and m1["mapping"] == {0: 2}
    assert m1["clusters_used"] == 1


def test_contingency_table():
    t = contingency([0, 0, 1, 2], [1, 1, 0, 1], num_clusters=3)
    np.testing.assert_array_equal(t, [[0, 2, 0], [1, 0, 0], [0, 1, 0]])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_clusters", [3, 4, 6])
def test_acc_equals_brute_force(seed, num_clusters):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, 40)
    # partly informative predictions so the optimum is not trivial
    y_pred = np.where(rng.random(40) < 0.5, (y_true + seed) % num_clusters,
                      rng.integers(0, num_clusters, 40))
    y_true[:4] = np.arange(4)  # make every class appear
    y_pred[4:4 + num_clusters] = np.arange(num_clusters)  # and every cluster
    assert cluster_metrics(y_true, y_pred)["acc"] == pytest.approx(brute_force_acc(y_true, y_pred))


@pytest.mark.parametrize("seed", range(4))
def test_nmi_ami_ari_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 10, 500)
    y_pred = np.where(rng.random(500) < 0.4, y_true, rng.integers(0, 15, 500))
    m = cluster_metrics(y_true, y_pred)
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(y_true, y_pred, average_method="arithmetic"))
    assert m["ami"] == pytest.approx(adjusted_mutual_info_score(y_true, y_pred))
    assert m["ari"] == pytest.approx(adjusted_rand_score(y_true, y_pred))
    assert m["clusters_used"] == len(np.unique(y_pred))
    assert all(isinstance(m[key], float) for key in ("acc", "nmi", "ami", "ari"))


def test_torch_inputs_are_accepted():
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    p = torch.tensor([1, 2, 0, 0, 2, 1])
    assert cluster_metrics(y, p)["acc"] == 1.0
    m = cluster_metrics(y, p, probs=torch.nn.functional.one_hot(p, 3).float())
    assert m["top5"] == 1.0


def test_input_validation():
    with pytest.raises(ValueError, match="length"):
        cluster_metrics([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        cluster_metrics([], [])
    with pytest.raises(ValueError, match="non-negative"):
        cluster_metrics([0, -1], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        cluster_metrics(np.zeros((3, 2), dtype=int), np.zeros((3, 2), dtype=int))
    with pytest.raises(ValueError, match="integer"):
        cluster_metrics([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="num_clusters"):
        cluster_metrics([0, 1, 2], [0, 1, 5], num_clusters=4)
    with pytest.raises(ValueError, match="rows"):
        cluster_metrics([0, 1, 2], [0, 1, 2], probs=np.ones((2, 3)))
    with pytest.raises(ValueError, match="columns"):
        cluster_metrics([0, 1, 2], [0, 1, 2], num_clusters=4, probs=np.ones((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        cluster_metrics([0, 1], [0, 1], probs=np.array([[np.nan, 1.0], [0.0, 1.0]]))


# ----------------------------------------------------------------------------- mapped top-5
def test_top5_hand_example():
    # 2 classes, 7 clusters; class 0 <-> cluster 0, class 1 <-> cluster 1
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 0, 1, 1])
    probs = np.zeros((4, 7))
    probs[0] = [0.9, 0.1, 0, 0, 0, 0, 0]                  # matched cluster ranks 0: hit
    probs[1] = [0.02, 0.3, 0.2, 0.15, 0.12, 0.11, 0.10]   # cluster 0 ranks 6: miss
    probs[2] = [0.3, 0.1, 0.2, 0.15, 0.12, 0.13, 0.0]     # cluster 1 ranks 5: miss
    probs[3] = [0.3, 0.12, 0.2, 0.15, 0.11, 0.12, 0.0]    # cluster 1 ranks 4 (ties -> lower id first): hit
    m = cluster_metrics(y_true, y_pred, probs=probs)
    assert m["mapping"] == {0: 0, 1: 1}
    assert m["num_clusters"] == 7
    assert m["top5"] == pytest.approx(2 / 4)


def test_top5_unmatched_classes_are_misses():
    # 3 classes, 2 clusters: class 1 has no matched cluster, though every cluster is in its top-5
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 1]
    probs = np.eye(2)[y_pred]
    m = cluster_metrics(y_true, y_pred, probs=probs)
    assert m["mapping"] == {0: 0, 1: 2}
    assert m["top5"] == pytest.approx(4 / 6)


def test_mapped_top1_equals_acc_for_argmax_predictions():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 6, 400)
    logits = rng.normal(size=(400, 9))
    logits[np.arange(400), y_true] += 1.5
    y_pred = logits.argmax(1)
    m = cluster_metrics(y_true, y_pred, probs=logits)
    assert mapped_topk(y_true, logits, m["mapping"], k=1) == pytest.approx(m["acc"])
    assert m["acc"] <= m["top5"] <= 1.0
    # chunking gives the same answer
    assert mapped_topk(y_true, logits, m["mapping"], k=5, chunk_elems=50) == pytest.approx(m["top5"])


# ----------------------------------------------------------------------------- confusion matrix
def test_confusion_matrix_diagonal_is_the_matching():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 5, 300)
    perm = rng.permutation(8)
    y_pred = np.where(rng.random(300) < 0.7, perm[y_true], rng.integers(0, 8, 300))
    cm, ids = confusion_matrix(y_true, y_pred, return_clusters=True)
    assert cm.shape == (5, 8)
    assert cm.sum() == 300
    m = cluster_metrics(y_true, y_pred)
    assert np.trace(cm) / 300 == pytest.approx(m["acc"])
    for i in range(5):
        assert m["mapping"][int(ids[i])] == i
    assert sorted(ids.tolist()) == list(range(8))
    assert ids[5:].tolist() == sorted(set(range(8)) - set(ids[:5].tolist()))
    np.testing.assert_array_equal(cm, contingency(y_true, y_pred)[:, ids])
    assert confusion_matrix(y_true, y_pred, num_classes=6, num_clusters=9).shape == (6, 9)


def test_confusion_matrix_fewer_clusters():
    cm, ids = confusion_matrix([0, 0, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0], return_clusters=True)
    assert cm.shape == (3, 2)
    assert ids.tolist() == [1, 0]  # class 0 <-> cluster 1, class 2 <-> cluster 0
    np.testing.assert_array_equal(cm, [[2, 0], [1, 1], [0, 2]])


def test_save_confusion_csv(tmp_path):
    cm, ids = confusion_matrix([0, 0, 1, 2], [2, 2, 0, 1], return_clusters=True)
    paths = save_confusion(tmp_path / "sub" / "cm", cm, class_names=["a", "b", "c"], cluster_ids=ids)
    assert paths[0] == str(tmp_path / "sub" / "cm.csv")
    with open(paths[0]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["class", "cluster_2", "cluster_0", "cluster_1"]
    assert rows[1] == ["a", "2", "0", "0"]
    assert rows[3] == ["c", "0", "0", "1"]
    with pytest.raises(ValueError, match="class_names"):
        save_confusion(tmp_path / "x", cm, class_names=["a"])


def test_save_confusion_png_needs_no_matplotlib(tmp_path, monkeypatch):
    """The one confusion-matrix drawing is Pillow's: it is written with or without matplotlib."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    paths = save_confusion(str(tmp_path / "cm"), np.eye(3, dtype=int))
    assert paths == [str(tmp_path / "cm.csv"), str(tmp_path / "cm.png")]


def test_confusion_png_colours_the_row_fractions(tmp_path):
    from PIL import Image

    from twist.evaluate import confusion_png

    cm = np.array([[4, 0], [1, 3]])
    path = confusion_png(tmp_path / "cm.png", cm, cell=10)  # no labels: the bare grid, 10 px a cell
    with Image.open(path) as im:
        assert im.size == (20, 20)
        px = np.asarray(im.convert("RGB"))
    assert tuple(px[5, 5]) == (253, 231, 37)  # fraction 1: yellow
    assert tuple(px[5, 15]) == (68, 1, 84)  # fraction 0: dark blue
    assert px[15, 5].sum() < px[15, 15].sum()  # 0.25 darker than 0.75


# ----------------------------------------------------------------------------- kNN
@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_matches_brute_force(exclude_self):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(120, 16))
    labels = rng.integers(0, 6, 120)
    test = train if exclude_self else rng.normal(size=(50, 16))
    expect = brute_force_knn(train, labels, test, k=5, T=0.07, num_classes=6, exclude_self=exclude_self)
    got = knn_predict(train, labels, test, k=5, temperature=0.07, batch_size=7, exclude_self=exclude_self)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), expect)
    # float32 torch inputs, another batch size: same answer
    got32 = knn_predict(torch.tensor(train, dtype=torch.float32), torch.tensor(labels),
                        torch.tensor(test, dtype=torch.float32), k=5, temperature=0.07,
                        num_classes=6, exclude_self=exclude_self)
    assert (got32.numpy() == expect).mean() > 0.97  # float32 rounding may flip near-ties


def test_knn_exclude_self_drops_the_query():
    # each point's own label differs from all its neighbours': with itself it would win
    train = np.array([[1.0, 0.0], [0.99, 0.1], [0.98, 0.2]])
    labels = np.array([0, 1, 1])
    assert knn_predict(train, labels, train, k=1)[0].item() == 0
    assert knn_predict(train, labels, train, k=1, exclude_self=True)[0].item() == 1
    with pytest.raises(ValueError, match="exclude_self"):
        knn_predict(train, labels, train[:2], exclude_self=True)


def test_knn_small_temperature_and_large_k():
    rng = np.random.default_rng(2)
    train = rng.normal(size=(30, 8))
    labels = rng.integers(0, 3, 30)
    test = rng.normal(size=(10, 8))
    pred = knn_predict(train, labels, test, k=500, temperature=1e-4)  # k capped; no overflow
    nearest = np.argmax((test / np.linalg.norm(test, axis=1, keepdims=True))
                        @ (train / np.linalg.norm(train, axis=1, keepdims=True)).T, axis=1)
    np.testing.assert_array_equal(pred.numpy(), labels[nearest])  # tiny T: nearest neighbour decides


def test_knn_on_separated_blobs():
    centers, y, x = blobs(600, 5, 32, sep=4.0, seed=0)
    g = torch.Generator().manual_seed(9)
    yt = torch.randint(0, 5, (200,), generator=g)
    xt = centers[yt] + torch.randn(200, 32, generator=g)
    assert knn_top1(x, y, xt, yt, k=20) > 0.99
    assert knn_top1(x, y, x, y, k=20, exclude_self=True) > 0.99


def test_knn_validation():
    with pytest.raises(ValueError, match="dims"):
        knn_predict(np.ones((4, 3)), [0, 1, 0, 1], np.ones((2, 5)))
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(np.ones((4, 3)), [0, 1, 0], np.ones((2, 3)))
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(np.ones((4, 3)), [0, 1, 0, 1], np.ones((2, 3)), temperature=0)
    with pytest.raises(ValueError, match="test_labels"):
        knn_top1(np.ones((4, 3)), [0, 1, 0, 1], np.ones((2, 3)), [0, 1, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_knn_cuda_matches_cpu():
    rng = np.random.default_rng(0)
    train = torch.tensor(rng.normal(size=(500, 32)), dtype=torch.float64)
    labels = torch.tensor(rng.integers(0, 10, 500))
    cpu = knn_predict(train, labels, train, k=20, exclude_self=True, batch_size=64)
    gpu = knn_predict(train.cuda(), labels.cuda(), train.cuda(), k=20, exclude_self=True, batch_size=64)
    assert gpu.is_cuda
    np.testing.assert_array_equal(gpu.cpu().numpy(), cpu.numpy())


# ----------------------------------------------------------------------------- linear probe
def test_linear_probe_separable_blobs():
    centers, y, x = blobs(2000, 10, 64, sep=1.0, seed=1)
    g = torch.Generator().manual_seed(2)
    yt = torch.randint(0, 10, (1000,), generator=g)
    xt = centers[yt] + torch.randn(1000, 64, generator=g)
    r = linear_probe(x * 7 + 3, y, xt * 7 + 3, yt, epochs=10)  # scale/shift: standardised away
    assert r["top1"] > 0.95 and r["top5"] >= r["top1"]
    assert r["epochs"] == 10 and r["lr"] == pytest.approx(0.1)
    assert set(r) >= {"top1", "top5", "epochs", "lr"}


def test_linear_probe_random_labels_is_chance():
    g = torch.Generator().manual_seed(3)
    x, xt = torch.randn(2000, 32, generator=g), torch.randn(2000, 32, generator=g)
    y, yt = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (2000,), generator=g)
    r = linear_probe(x, y, xt, yt, epochs=10)
    assert 0.05 < r["top1"] < 0.15
    assert 0.4 < r["top5"] < 0.6


def test_linear_probe_deterministic_and_lr_scaling():
    centers, y, x = blobs(500, 3, 16, sep=0.5, seed=4)
    a = linear_probe(x, y, x, y, epochs=3, seed=5, batch_size=64)
    b = linear_probe(x, y, x, y, epochs=3, seed=5, batch_size=64)
    assert a == b
    assert a["lr"] == pytest.approx(0.1 * 64 / 256)
    assert a["top5"] == 1.0  # 3 classes: top-5 is top-3
    before = torch.get_rng_state()
    linear_probe(x.numpy(), y.numpy(), x.numpy(), y.numpy(), epochs=1, lr=0.05, weight_decay=1e-4,
                 normalize=False)
    assert torch.equal(before, torch.get_rng_state())  # global RNG untouched


def test_linear_probe_validation():
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    with pytest.raises(ValueError, match="dims"):
        linear_probe(x, y, torch.randn(5, 3), y[:5], epochs=1)
    with pytest.raises(ValueError, match="test_labels"):
        linear_probe(x, y, x, y[:4], epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        linear_probe(x, y, x, y, epochs=0)
