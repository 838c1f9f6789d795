"""Tests of twist.protocols and `twist eval`: splits, subsets, the four protocols, and the
acceptance check that `twist eval --json` cluster metrics equal scikit-learn / scipy metrics
computed here from the CSV that `twist predict` writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

from twist.cli import main
from twist.config import ConfigError
from twist.protocols import (
    EvalOptions,
    balanced_subset,
    parse_protocols,
    run_protocols,
    semi_supervised,
    split_for_eval,
    stratified_split,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

FAST = ["--linear-epochs", "10", "--semi-epochs", "1", "--semi-min-steps", "8", "--semi-batch-size", "32",
        "--no-progress"]


# ---------------------------------------------------------------------- pure helpers
def test_balanced_subset_is_balanced_seeded_and_sized():
    y = np.repeat(np.arange(10), [100, 120, 90, 110, 100, 100, 95, 105, 100, 80])
    a = balanced_subset(y, 0.1, seed=3)
    assert np.array_equal(a, balanced_subset(y, 0.1, seed=3))
    assert not np.array_equal(a, balanced_subset(y, 0.1, seed=4))
    assert np.all(np.diff(a) > 0)
    assert np.bincount(y[a]).tolist() == [100] * 0 + [round(0.1 * len(y) / 10)] * 10
    one = balanced_subset(y, 0.01, seed=0)
    assert np.bincount(y[one], minlength=10).tolist() == [1] * 10  # every class kept, at least one each
    with pytest.raises(ValueError):
        balanced_subset(y, 0.0)


def test_stratified_split_disjoint_complete_and_deterministic():
    y = np.repeat(np.arange(4), [10, 20, 5, 1])
    tr, te = stratified_split(y, 0.2, seed=0)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(y)
    assert np.bincount(y[te], minlength=4).tolist() == [2, 4, 1, 0]  # a singleton class stays in train
    tr2, te2 = stratified_split(y, 0.2, seed=0)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)


def test_parse_protocols():
    assert parse_protocols("knn, cluster,knn") == ["knn", "cluster"]
    assert parse_protocols("all") == ["cluster", "knn", "linear", "semi"]
    with pytest.raises(ConfigError, match="valid protocols"):
        parse_protocols("cluster,bogus")


def test_split_for_eval_rules(tmp_path, digits_eval_npz):
    tr, te, info = split_for_eval("digits", image_size=16)
    assert info["mode"] == "stratified" and len(tr) + len(te) == 1797
    assert tr.images.shape[1:] == (1, 16, 16)
    # explicit pair of files
    a, b = digits_eval_npz
    tr2, te2, info2 = split_for_eval(str(b), train_data=str(a))
    assert info2["mode"] == "explicit" and len(tr2) == len(tr) and len(te2) == len(te)
    assert torch.equal(te2.images, te.images) and np.array_equal(te2.labels, te.labels)
    # a folder of npz splits: train*.npz vs test.npz
    folder = a.parent
    tr3, te3, info3 = split_for_eval(str(folder))
    assert info3["mode"] == "npz-splits" and len(tr3) == len(tr) and len(te3) == len(te)


# ---------------------------------------------------------------------- acceptance
def _read_csv(path):
    from twist.predict import read_predictions

    return read_predictions(path)


def test_eval_all_protocols_json_and_metrics_match_independent(trained_digits_run, digits_eval_npz, tmp_path,
                                                               capsys):
    train_npz, test_npz = digits_eval_npz
    out_dir = tmp_path / "eval"
    rc = main(["eval", str(trained_digits_run), str(test_npz), "--train-data", str(train_npz),
               "--protocol", "cluster,knn,linear,semi", "--json", "--out-dir", str(out_dir), *FAST])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"cluster", "knn", "linear", "semi"}
    for name in res:
        on_disk = json.loads((out_dir / f"{name}.json").read_text())
        assert on_disk["protocol"] == name
    c, k, lin, semi = res["cluster"], res["knn"], res["linear"], res["semi"]
    assert (out_dir / "confusion.csv").is_file() and (out_dir / "confusion.png").is_file()
    assert set(k) >= {"top1_k20", "top1_k200"} and 0 <= k["top1_k20"] <= 1
    assert 0 <= lin["top1"] <= lin["top5"] <= 1 and lin["augmentation"].startswith("none")
    assert set(semi["fractions"]) == {"1pct", "10pct"}

    # semi-supervised subsets: class-balanced, seeded, listed in a file and in the JSON
    y_train = np.load(train_npz)["y"]
    for tag, frac in (("1pct", 0.01), ("10pct", 0.1)):
        s = semi["fractions"][tag]
        listed = [int(v) for v in (out_dir / f"semi_subset_{tag}.txt").read_text().split()]
        assert listed == s["subset_indices"] == balanced_subset(y_train, frac, seed=0).tolist()
        assert 0 <= s["top1"] <= 1

    # predictions of the same checkpoint on the same test file, through `twist predict`
    pred_csv, emb = tmp_path / "pred.csv", tmp_path / "test_emb.npy"
    assert main(["predict", str(trained_digits_run), str(test_npz), "--out", str(pred_csv), "--embeddings", str(emb),
                 "--no-progress"]) == 0
    p = _read_csv(pred_csv)
    y = np.load(test_npz)["y"]
    assert np.array_equal(p["index"], np.arange(len(y))) and np.array_equal(p["label"], y)
    pred = p["cluster"]
    # independent metrics: Hungarian on the contingency table (scipy), NMI/AMI/ARI (scikit-learn)
    table = np.zeros((y.max() + 1, 10), dtype=np.int64)
    np.add.at(table, (y, pred), 1)
    rows, cols = linear_sum_assignment(-table)
    acc = table[rows, cols].sum() / len(y)
    assert c["acc"] == pytest.approx(acc, abs=1e-12)
    assert c["nmi"] == pytest.approx(normalized_mutual_info_score(y, pred), abs=1e-12)
    assert c["ami"] == pytest.approx(adjusted_mutual_info_score(y, pred), abs=1e-12)
    assert c["ari"] == pytest.approx(adjusted_rand_score(y, pred), abs=1e-12)
    assert c["clusters_used"] == len(np.unique(pred))
    assert c["num_samples"] == len(y)

    # independent kNN (k = 20, T = 0.07) on the embeddings `twist predict` wrote
    train_emb = tmp_path / "train_emb.npy"
    assert main(["predict", str(trained_digits_run), str(train_npz), "--out", str(tmp_path / "tr.csv"),
                 "--embeddings", str(train_emb), "--no-progress"]) == 0
    ftr, fte = np.load(train_emb).astype(np.float64), np.load(emb).astype(np.float64)
    ftr /= np.linalg.norm(ftr, axis=1, keepdims=True)
    fte /= np.linalg.norm(fte, axis=1, keepdims=True)
    sim = fte @ ftr.T
    nn_idx = np.argsort(-sim, axis=1, kind="stable")[:, :20]
    votes = np.zeros((len(fte), 10))
    for i in range(len(fte)):
        np.add.at(votes[i], y_train[nn_idx[i]], np.exp(sim[i, nn_idx[i]] / 0.07))
    knn_acc = (votes.argmax(1) == y).mean()
    assert k["top1_k20"] == pytest.approx(knn_acc, abs=2.5 / len(y))  # float32 vs float64 near-ties


def test_eval_default_protocols_on_digits_writes_next_to_checkpoint(trained_digits_run, capsys):
    rc = main(["eval", str(trained_digits_run), "digits", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "cluster:" in out and "knn:" in out and "linear" not in out
    eval_dir = trained_digits_run / "eval"
    assert (eval_dir / "cluster.json").is_file() and (eval_dir / "knn.json").is_file()
    info = json.loads((eval_dir / "cluster.json").read_text())
    assert info["split"]["mode"] == "stratified" and info["num_test"] == 359


def test_linear_with_augmentation_and_semi_leaves_model_untouched(trained_digits_run):
    from twist.serving import load_trained

    trained = load_trained(trained_digits_run)
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    tr, te, _ = split_for_eval("digits", image_size=trained.image_size)
    res = run_protocols(trained, tr, te, ["linear"], linear_aug=True, linear_epochs=1)
    assert res["linear"]["augmentation"].startswith("random-resized-crop")
    assert 0 <= res["linear"]["top1"] <= 1
    s = semi_supervised(trained, tr, te, 0.05, options=EvalOptions(semi_epochs=1, semi_min_steps=3,
                                                                     semi_batch_size=16))
    assert s["steps"] == max(3, (s["num_labels"] // 16)) and s["num_labels"] == len(s["subset_indices"])
    after = trained.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_eval_user_errors(trained_digits_run, tmp_path, capsys):
    assert main(["eval", str(trained_digits_run), "digits", "--protocol", "cluster,nope"]) == 2
    assert "valid protocols" in capsys.readouterr().err
    x = np.zeros((12, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "unlabelled.npz", x=x)
    assert main(["eval", str(trained_digits_run), str(tmp_path / "unlabelled.npz"), "--no-progress"]) == 2
    assert "no labels" in capsys.readouterr().err
