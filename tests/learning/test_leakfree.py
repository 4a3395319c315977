"""Leak-free split and evaluation (learning/leakfree.py), and NT-Xent pre-training (learning/pretrain.py),
on a tiny project-layout data folder made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from siamese_analog_plugin.engine.encoder import load_model  # noqa: E402
from siamese_analog_plugin.learning.datasets import discover_dataset  # noqa: E402
from siamese_analog_plugin.learning.leakfree import (  # noqa: E402
    Bench,
    build_bench,
    fewshot_accuracy,
    format_leakfree_table,
    leakfree_roles,
    leakfree_split_record,
    score_bench,
    site_of,
)
from siamese_analog_plugin.learning.pretrain import (  # noqa: E402
    PretrainConfig,
    build_pool,
    nt_xent_loss,
    pretrain,
    random_scale_crops,
)


def _img(rng, size, kind):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == 0:
        img = 0.5 + 0.4 * np.sin(2 * np.pi * (xx * np.cos(rng.uniform(0, 3)) + yy) / rng.uniform(5, 9))
    elif kind == 1:
        img = np.full((size, size), 0.3, np.float32)
        for _ in range(6):
            cy, cx = rng.uniform(0, size, 2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = 0.9
    else:
        img = rng.uniform(0, 1, (size, size))
    return (np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """HiRISE (4 classes x 6 observations x 3 crops), AID (3 classes x 8), 3 dune sites x 2 scenes,
    aeolian patches, one CTX tile and one georeferenced Mars raster."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("crater", "dark_dune", "bright_dune", "other")):
        d = root / "mars" / "hirise_landmarks" / cls
        d.mkdir(parents=True)
        for o in range(6):
            for k in range(3):
                Image.fromarray(_img(rng, 48, c % 3)).save(d / f"ESP_{c}{o:02d}_RED-{k:04d}.jpg")
    for c, cls in enumerate(("Desert", "Forest", "Beach")):
        d = root / "earth" / "aid" / cls
        d.mkdir(parents=True)
        for k in range(8):
            Image.fromarray(_img(rng, 40, c)).save(d / f"{cls.lower()}_{k}.jpg")
    for site in ("Alpha", "Beta", "Gamma"):
        d = root / "earth" / "dune_fields" / site
        d.mkdir(parents=True)
        Image.fromarray(_img(rng, 320, 0)).save(d / f"{site}_1_image.jpg")
        Image.fromarray(_img(rng, 300, 0)).save(d / f"{site}-1_test.jpg")
    for c, cls in enumerate(("sand_ripple", "sand_fine", "terrain")):
        d = root / "mars" / "hirise_aeolian_patches" / cls
        d.mkdir(parents=True)
        for k in range(4):
            Image.fromarray(_img(rng, 32, c)).save(d / f"1_{cls}_{k}.png")
    (root / "mars" / "ctx_mc11e").mkdir(parents=True)
    Image.fromarray(_img(rng, 200, 1)).save(root / "mars" / "ctx_mc11e" / "T-A.png")
    (root / "mars" / "georeferenced").mkdir(parents=True)
    Image.fromarray(_img(rng, 120, 0)).save(root / "mars" / "georeferenced" / "clip.tif")
    return root


class TestSplit:
    def test_no_observation_site_or_image_on_two_sides(self, project):
        ds = discover_dataset(project)
        roles = leakfree_roles(ds.records, seed=0, val_share=0.2, test_share=0.2)
        assert set(roles) == {"train", "val", "test"}
        sides: dict[str, set] = {}
        for r, ro in zip(ds.records, roles):
            unit = site_of(r) if r.source == "dune_field" else r.scene
            sides.setdefault(unit, set()).add(ro)
        assert all(len(s) == 1 for s in sides.values()), sides
        # Each HiRISE class keeps training observations and has val and test ones.
        for g in ("mars:crater", "mars:dark_dune", "mars:bright_dune", "mars:other"):
            got = {ro for r, ro in zip(ds.records, roles) if r.group == g}
            assert got == {"train", "val", "test"}

    def test_both_scenes_of_a_site_go_together_and_only_named_sites_train(self, project):
        ds = discover_dataset(project)
        roles = leakfree_roles(ds.records, 0, dune_train_sites=("Beta",))
        by_site: dict[str, set] = {}
        scenes: dict[str, set] = {}
        for r, ro in zip(ds.records, roles):
            if r.source == "dune_field":
                by_site.setdefault(site_of(r), set()).add(ro)
                scenes.setdefault(site_of(r), set()).add(r.scene)
        assert by_site == {"Alpha": {"test"}, "Beta": {"train"}, "Gamma": {"test"}}
        assert all(len(s) == 2 for s in scenes.values())  # *_image and *_test scenes of one site
        # By default no site is trained on.
        roles = leakfree_roles(ds.records, 0)
        assert {ro for r, ro in zip(ds.records, roles) if r.source == "dune_field"} == {"test"}

    def test_split_is_seeded_and_recorded(self, project):
        ds = discover_dataset(project)
        a, b = leakfree_roles(ds.records, 4), leakfree_roles(ds.records, 4)
        assert a == b
        rec = leakfree_split_record(ds, a, 4)
        assert not set(rec["val"]) & set(rec["test"])
        assert set(rec["held_out"]) == set(rec["val"]) | set(rec["test"])
        assert rec["dune_sites"]["train"] == [] and len(rec["dune_sites"]["test"]) == 3
        json.dumps(rec)

    def test_aeolian_patches_only_on_the_test_side(self, project):
        val = build_bench(project, "val", size=24)
        test = build_bench(project, "test", size=24)
        assert "aeolian" not in set(val.sources) and "dune_field" not in set(val.sources)
        assert (test.sources == "aeolian").sum() == 12
        assert set(test.sites[test.sources == "dune_field"]) == {"Alpha", "Beta", "Gamma"}
        assert not set(val.scenes[val.sources == "hirise"]) & set(test.scenes[test.sources == "hirise"])


class TestScores:
    def _bench(self):
        groups = (["mars:crater"] * 8 + ["mars:dark_dune"] * 8 + ["mars:bright_dune"] * 8 + ["mars:other"] * 8
                  + ["earth:Desert"] * 4 + ["earth:Forest"] * 4 + ["earth:dune_field"] * 6
                  + ["mars:sand_ripple"] * 3 + ["mars:terrain"] * 3)
        sources = ["hirise"] * 32 + ["aid"] * 8 + ["dune_field"] * 6 + ["aeolian"] * 6
        sites = [""] * 40 + ["A"] * 3 + ["B"] * 3 + [""] * 6
        n = len(groups)
        return Bench("test", np.zeros((n, 4, 4), np.uint8), np.array(groups), np.array(sources),
                     np.array([f"s{i % 5}" for i in range(n)]), np.array(sites))

    def test_perfect_embedding_scores_one_and_folds_per_site(self):
        b = self._bench()
        code = {"mars:dark_dune": 0, "mars:bright_dune": 0, "earth:Desert": 0, "earth:dune_field": 0,
                "mars:sand_ripple": 0, "mars:crater": 1, "mars:other": 2, "earth:Forest": 3, "mars:terrain": 4}
        emb = np.eye(8, dtype=np.float32)[[code[g] for g in b.groups]]
        rows = score_bench(emb, b, draws=4)
        assert rows["mars_dune_to_earth"]["mean"] == pytest.approx(1.0)
        assert rows["mars_dune_to_earth"]["n"] == 2 and set(rows["mars_dune_to_earth"]["folds"]) == {"A", "B"}
        assert rows["earth_dune_to_mars"]["mean"] == pytest.approx(1.0)
        assert rows["mars_sand_to_earth"]["mean"] == pytest.approx(1.0)
        assert rows["mars_sand_map"]["mean"] == pytest.approx(1.0)
        assert rows["aid"]["mean"] == pytest.approx(1.0)
        # Dark and bright dunes share one embedding here: the landform row sees that.
        assert rows["mars_landforms"]["mean"] < 1.0
        table = format_leakfree_table({"columns": {"m": rows}})
        assert "mars_dune_to_earth" in table and "±" in table

    def test_fewshot_balanced_accuracy(self):
        labels = np.repeat(np.array(["a", "b", "c"]), 10)
        emb = np.eye(3)[np.repeat(np.arange(3), 10)] + 0.01
        assert fewshot_accuracy(emb, labels, k=2, draws=3).tolist() == [1.0, 1.0, 1.0]
        rng = np.random.default_rng(0)
        acc = fewshot_accuracy(rng.normal(size=(30, 3)), labels, k=2, draws=50)
        assert 0.2 < acc.mean() < 0.5


class TestNTXent:
    def test_equals_a_numpy_computation(self):
        rng = np.random.default_rng(1)
        z1, z2 = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
        t = 0.3
        z = np.concatenate([z1, z2])
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        sim = z @ z.T / t
        n = 5
        losses = []
        for i in range(2 * n):
            j = (i + n) % (2 * n)
            others = [k for k in range(2 * n) if k != i]
            losses.append(-sim[i, j] + np.log(np.sum(np.exp(sim[i, others]))))
        got = nt_xent_loss(torch.tensor(z1), torch.tensor(z2), t)
        assert float(got) == pytest.approx(float(np.mean(losses)), rel=1e-6)

    def test_twins_give_a_low_loss_strangers_a_high_one(self):
        z = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=1)
        assert float(nt_xent_loss(z, z, 0.1)) < float(nt_xent_loss(z, z.roll(1, 0), 0.1))

    def test_loss_decreases_when_training_a_tiny_encoder(self):
        from siamese_analog_plugin.engine.encoder import build_network
        from siamese_analog_plugin.learning.datasets import augment_batch

        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        images = torch.from_numpy(np.stack([_img(rng, 40, k % 3) for k in range(16)]))
        net = build_network("compact", 32, embedding_dim=8, widths=[4, 8], stem_stride=1, stem_kernel=3)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(30):
            v1 = augment_batch(random_scale_crops(images, 0.6, gen), 32, gen)
            v2 = augment_batch(random_scale_crops(images, 0.6, gen), 32, gen)
            loss = nt_xent_loss(net(v1), net(v2), 0.2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1

    def test_random_scale_crops_keep_shape_and_range(self):
        x = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
        y = random_scale_crops(x, 0.4, torch.Generator().manual_seed(0))
        assert y.shape == (3, 20, 20) and float(y.min()) >= 0 and float(y.max()) <= 1


class TestPretrain:
    def test_pool_keeps_test_ground_out(self, project, tmp_path):
        pool, sources = build_pool(project, 0, size=32)
        assert pool.dtype == np.uint8 and pool.shape[1:] == (32, 32)
        assert set(sources) == {"hirise", "aid", "ctx", "mars_geo"}  # no dune site, no aeolian patch
        ds = discover_dataset(project)
        roles = leakfree_roles(ds.records, 0)
        n_train = sum(ro == "train" and r.source in ("hirise", "aid") for r, ro in zip(ds.records, roles))
        assert (np.isin(sources, ("hirise", "aid"))).sum() == n_train

    def test_writes_a_model_file_that_round_trips(self, project, tmp_path):
        out = tmp_path / "pre.pt"
        pretrain(PretrainConfig(data=str(project), out=str(out), steps=2, batch=6, widths=(4, 8, 8, 8),
                                embedding_dim=8))
        enc = load_model(out, "cpu")
        assert enc.metadata.architecture == "compact" and enc.embedding_dim == 8
        assert enc.metadata.training["steps"] == 2
        emb = enc.embed(np.random.default_rng(0).random((3, 100, 100), dtype=np.float32))
        assert emb.shape == (3, 8) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
        # The state dict survives a second save/load unchanged.
        from siamese_analog_plugin.engine.encoder import save_model

        save_model(tmp_path / "again.pt", enc.network, enc.metadata)
        again = load_model(tmp_path / "again.pt", "cpu")
        for k, v in enc.network.state_dict().items():
            assert torch.equal(v, again.network.state_dict()[k])


class TestTrainOnTheLeakFreeSplit:
    def test_fine_tune_from_a_pretrained_file_never_sees_test_ground(self, project, tmp_path):
        from siamese_analog_plugin.learning.training import TrainConfig, train

        small = dict(widths=(4, 8, 8, 8), embedding_dim=8)
        pre = tmp_path / "pre.pt"
        pretrain(PretrainConfig(data=str(project), out=str(pre), steps=1, batch=4, **small))
        out = tmp_path / "ft.pt"
        summary = train(TrainConfig(data=str(project), epochs=1, batch_size=8, pairs_per_epoch=16, cache_size=40,
                                    embedding_dim=8, arch_params={"widths": [4, 8, 8, 8]}, out=str(out), threads=1,
                                    eval_pairs=32, split="leakfree", init=str(pre)))
        enc = load_model(out, "cpu")
        assert enc.metadata.training["protocol"] == "leakfree" and enc.metadata.training["init"] == "pre.pt"
        split = json.loads(out.with_suffix(".split.json").read_text())
        ds = discover_dataset(project)
        roles = leakfree_roles(ds.records, 0)
        test_keys = {r.key(ds.root) for r, ro in zip(ds.records, roles) if ro == "test" and r.source != "dune_field"}
        assert set(split["test"]) == test_keys
        assert split["dune_sites"]["train"] == []
        # No dune-field window was trained on: the class is not even in the pair table.
        assert enc.metadata.training["data"]["counts"]["earth:dune_field"]["train"] == 0
        assert "earth:dune_field" not in enc.metadata.training["data"]["classes"]
        assert summary["history"][0]["held_out"]  # per-epoch numbers are on the val side


def test_evaluate_command_prints_the_leak_free_table(project, tiny_model, tmp_path, capsys):
    from siamese_analog_plugin.cli import main

    out = tmp_path / "lf.json"
    rc = main(["evaluate", "--model", tiny_model, "--data", str(project), "--no-cache", "--quiet", "--draws", "2",
               "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    # (fewshot5 needs more than 5 test crops a class; this folder has 3)
    for row in ("mars_dune_to_earth", "earth_dune_to_mars", "mars_landforms", "aid", "mars_sand_to_earth",
                "mars_sand_map"):
        assert f"| {row} |" in printed
    report = json.loads(out.read_text())
    assert set(report["columns"]) == {"model", "untrained", "texture"}
    assert report["columns"]["texture"]["mars_dune_to_earth"]["n"] == 3  # one fold per dune site
    # This model trained on every site (the older 9:1 split): no site may score it.
    assert report["columns"]["model"]["_file"]["sites_seen"] == ["Alpha", "Beta", "Gamma"]
    assert "mars_dune_to_earth" not in report["columns"]["model"] and "aid" in report["columns"]["model"]


# -- leave-one-site-out: models trained with some dune sites, scored only on the others ------------

def _tiny_leakfree(project, out, sites):
    from siamese_analog_plugin.learning.training import TrainConfig, train

    train(TrainConfig(data=str(project), epochs=1, batch_size=8, pairs_per_epoch=16, cache_size=40, embedding_dim=8,
                      arch_params={"widths": [4, 8, 8, 8]}, out=str(out), threads=1, eval_pairs=32,
                      split="leakfree", dune_train_sites=tuple(sites), cache_dir=None))
    return str(out)


@pytest.fixture(scope="module")
def site_models(project, tmp_path_factory):
    """A model trained with every dune site, and a fold model that never saw Alpha."""
    d = tmp_path_factory.mktemp("sites")
    return {"all": _tiny_leakfree(project, d / "all.pt", ["all"]),
            "no_alpha": _tiny_leakfree(project, d / "no_alpha.pt", ["Beta", "Gamma"])}


class TestLeaveOneSiteOut:
    def test_site_names_are_checked(self, project):
        from siamese_analog_plugin.engine.errors import InputError
        from siamese_analog_plugin.learning.leakfree import resolve_dune_sites

        records = discover_dataset(project).records
        assert resolve_dune_sites(records, ["all"]) == ["Alpha", "Beta", "Gamma"]
        assert resolve_dune_sites(records, ["Gamma", "Beta"]) == ["Beta", "Gamma"]
        assert resolve_dune_sites(records, []) == []
        with pytest.raises(InputError, match="Unknown dune-field site 'Delta'.*Alpha, Beta, Gamma"):
            resolve_dune_sites(records, ["Delta"])

    def test_training_with_sites_keeps_the_others_out(self, project, site_models):
        enc = load_model(site_models["no_alpha"], "cpu")
        assert enc.metadata.training["dune_train_sites"] == ["Beta", "Gamma"]
        split = json.loads(Path(site_models["no_alpha"]).with_suffix(".split.json").read_text())
        assert split["dune_sites"] == {"train": ["Beta", "Gamma"], "test": ["Alpha"]}
        counts = enc.metadata.training["data"]["counts"]["earth:dune_field"]
        assert counts["train"] > 0 and counts["test"] > 0 and counts["val"] == 0
        assert load_model(site_models["all"], "cpu").metadata.training["dune_train_sites"] == ["Alpha", "Beta",
                                                                                                 "Gamma"]

    def test_sites_a_model_saw_never_score_it(self, project, site_models):
        from siamese_analog_plugin.learning.leakfree import evaluate_leakfree

        bench = build_bench(project, "test", size=100)
        report = evaluate_leakfree({"all": site_models["all"], "no_alpha": site_models["no_alpha"]}, str(project),
                                   draws=2, bench=bench, untrained=False, texture=False)
        # The all-sites model has no leak-free site row; the fold model is scored on Alpha alone.
        assert not any(r in report["columns"]["all"] for r in ("mars_dune_to_earth", "earth_dune_to_mars"))
        assert "aid" in report["columns"]["all"] and "mars_landforms" in report["columns"]["all"]
        assert list(report["columns"]["no_alpha"]["earth_dune_to_mars"]["folds"]) == ["Alpha"]

    def test_fold_models_fill_the_site_rows(self, project, site_models):
        from siamese_analog_plugin.learning.leakfree import evaluate_leakfree

        bench = build_bench(project, "test", size=100)
        alone = evaluate_leakfree({"f": site_models["no_alpha"]}, str(project), draws=2, bench=bench,
                                  untrained=False, texture=False)["columns"]["f"]
        both = evaluate_leakfree({"model": site_models["all"]}, str(project), draws=2, bench=bench,
                                 untrained=False, texture=False, folds=[site_models["no_alpha"]])
        row = both["columns"]["model"]["mars_dune_to_earth"]
        assert row["folds"] == {"Alpha": alone["mars_dune_to_earth"]["folds"]["Alpha"]} and row["n"] == 1
        assert row["fold_source"] == {"Alpha": site_models["no_alpha"]}
        assert both["info"]["folds"] == {"Alpha": site_models["no_alpha"]}
        # Rows without a site stay the model's own.
        mine = evaluate_leakfree({"m": site_models["all"]}, str(project), draws=2, bench=bench, untrained=False,
                                 texture=False)["columns"]["m"]
        assert both["columns"]["model"]["mars_landforms"]["mean"] == mine["mars_landforms"]["mean"]
        assert np.isfinite(mine["mars_landforms"]["mean"])

    def test_a_fold_model_that_saw_every_site_is_refused(self, project, site_models):
        from siamese_analog_plugin.engine.errors import InputError
        from siamese_analog_plugin.learning.leakfree import evaluate_leakfree

        bench = build_bench(project, "test", size=100)
        with pytest.raises(InputError, match="trained on every dune-field site"):
            evaluate_leakfree({"model": site_models["all"]}, str(project), bench=bench, draws=2,
                              folds=[site_models["all"]])
        with pytest.raises(InputError, match="Two fold models leave out the site 'Alpha'"):
            evaluate_leakfree({"model": site_models["all"]}, str(project), bench=bench, draws=2,
                              folds=[site_models["no_alpha"], site_models["no_alpha"]])

    def test_merge_is_mean_and_spread_over_the_unseen_sites(self):
        from siamese_analog_plugin.learning.leakfree import merge_site_folds

        rows = {"earth_dune_to_mars": {"mean": 0.5, "std": 0.1, "n": 2, "chance": 0.1, "folds": {"A": 0.4, "B": 0.6}},
                "aid": {"mean": 0.3}}
        fold = {"A": {"earth_dune_to_mars": {"folds": {"A": 0.2, "B": 0.9}}}}
        out = merge_site_folds(rows, ["A", "B"], fold)
        assert out["earth_dune_to_mars"]["folds"] == {"A": 0.2} and out["aid"] == {"mean": 0.3}
        out = merge_site_folds(rows, ["A"], fold)
        assert out["earth_dune_to_mars"]["folds"] == {"A": 0.2, "B": 0.6}
        assert out["earth_dune_to_mars"]["mean"] == pytest.approx(0.4) and out["earth_dune_to_mars"]["std"] == \
            pytest.approx(0.2)
        assert "earth_dune_to_mars" not in merge_site_folds(rows, ["A", "B"], {})


def test_sites_seen_by_older_models():
    from types import SimpleNamespace

    from siamese_analog_plugin.learning.leakfree import sites_seen

    legacy = SimpleNamespace(training={"protocol": "legacy", "data": {"sources": ["aid", "dune_field", "hirise"]}})
    assert sites_seen(legacy, ["B", "A"]) == ["A", "B"]  # the 9:1 split trained on every site's *_image scene
    assert sites_seen(SimpleNamespace(training={"data": {"sources": ["hirise"]}}), ["A"]) == []
    assert sites_seen(SimpleNamespace(training={"protocol": "leakfree", "dune_train_sites": ["A"]}), ["A", "B"]) \
        == ["A"]
    # A transfer step saw what its parent saw (transfer._parent_summary); unknown = every site.
    step1 = {"step": 1, "data": "hirise_landmarks", "parent": {"protocol": "leakfree", "dune_train_sites": ["B"]}}
    assert sites_seen(SimpleNamespace(training=step1), ["A", "B"]) == ["B"]
    assert sites_seen(SimpleNamespace(training={**step1, "parent": "<?>"}), ["A", "B"]) == ["A", "B"]
    assert sites_seen(SimpleNamespace(training={"data": "somewhere"}), ["A"]) == ["A"]


def test_train_command_names_dune_sites_only_with_the_leak_free_split(project, tmp_path, capsys):
    from siamese_analog_plugin.cli import main

    out = tmp_path / "m.pt"
    rc = main(["train", "--data", str(project), "--dune-sites", "Alpha", "--epochs", "1", "--out", str(out)])
    assert rc != 0 and not out.exists()
    assert "--dune-sites only applies to the leak-free split. Add --split leakfree" in capsys.readouterr().err
    rc = main(["train", "--data", str(project), "--split", "leakfree", "--dune-sites", "Nowhere", "--epochs", "1",
               "--out", str(out), "--no-cache"])
    assert rc != 0 and not out.exists()
    assert "Unknown dune-field site 'Nowhere'" in capsys.readouterr().err


def test_rows_without_sites_are_kept_as_they_are():
    from siamese_analog_plugin.learning.leakfree import merge_site_folds

    rows = {"mars_dune_to_earth": {"mean": 0.4, "std": 0.1, "n": 9, "chance": 0.1}}  # validation side
    assert merge_site_folds(rows, ["A"], {}) == rows


def test_review_findings_stay_fixed(project, tmp_path, capsys):
    """Folds fill only the sites the model saw; state files are not fold models; 'all' stands alone;
    too many layers are refused; a step trained on dune-field scenes saw their sites."""
    from types import SimpleNamespace

    from siamese_analog_plugin.cli import main
    from siamese_analog_plugin.engine.errors import InputError
    from siamese_analog_plugin.learning.leakfree import merge_site_folds, resolve_dune_sites, sites_seen

    rows = {"earth_dune_to_mars": {"mean": 0.5, "std": 0.0, "n": 1, "chance": 0.1, "folds": {"A": 0.5}}}
    fold = {"A": {"earth_dune_to_mars": {"folds": {"A": 0.9}}}}
    assert merge_site_folds(rows, [], fold)["earth_dune_to_mars"]["folds"] == {"A": 0.5}  # its own, unseen
    assert merge_site_folds(rows, ["A"], fold)["earth_dune_to_mars"]["folds"] == {"A": 0.9}
    with pytest.raises(InputError, match="'all' cannot be combined"):
        resolve_dune_sites(discover_dataset(project).records, ["all", "Alpha"])
    assert main(["train", "--data", str(project), "--widths", "4", "8", "8", "8", "8", "8", "--epochs", "1",
                 "--out", str(tmp_path / "m.pt"), "--no-cache"]) != 0
    assert "pool a 100 px patch below 2x2" in capsys.readouterr().err
    step = SimpleNamespace(training={"step": 1, "data": "x/earth/dune_fields", "parent": {"protocol": "leakfree"}})
    assert sites_seen(step, ["A"]) == ["A"]
