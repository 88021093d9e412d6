"""Config validation, sweep expansion, run ids, checkpoint plans and the JSON schema."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from sharpflow.config import DatasetConfig, RunConfig, checkpoint_steps, run_id, steps_per_epoch, total_steps
from sharpflow.errors import ConfigError
from sharpflow.study import expand_runs, json_schema, load_config, parse_config, spectrum_config

ROOT = Path(__file__).resolve().parents[1]


def base_raw() -> dict:
    return {
        "datasets": {"d": {"source": "mnist1d", "mnist1d_samples": 500, "hessian_subset": 64}},
        "defaults": {"dataset": "d", "model": {"name": "mlp"}, "optimizer": {"lr": 0.1, "batch_size": 32},
                     "steps": 100},
        "studies": {"eta": {"sweep": {"optimizer.lr": [0.01, 0.1]}}},
    }


def test_shipped_configs_are_valid():
    for name in ("config.yaml", "paper.yaml"):
        path = ROOT / "config" / name
        if path.exists():
            cfg = load_config(path)
            assert expand_runs(cfg)
    # the smoke overlay over the paper's study, merged key by key as Snakemake merges config files
    from snakemake.utils import update_config

    raw = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    paper_studies, paper_figures = set(raw["studies"]), set(raw["figures"])
    update_config(raw, yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text()))
    cfg = parse_config(raw)
    assert set(cfg.studies) == paper_studies and set(cfg.figures) == paper_figures
    assert {d.source for d in cfg.datasets.values()} == {"synthetic_images", "synthetic_text"}
    models = {"simplecnn", "simplecnn_medium", "resnet32", "vgg11_bn", "lstm_lm", "mlp"}  # mlp: the EoS studies
    assert {rc.model.name for rc in expand_runs(cfg).values()} == models
    assert {rc.model.name for rc in expand_runs(load_config(ROOT / "config" / "paper.yaml")).values()} == models


def test_sweep_expands_to_named_runs():
    cfg = parse_config(base_raw())
    runs = expand_runs(cfg)
    assert list(runs) == ["eta-lr0.01", "eta-lr0.1"]
    assert runs["eta-lr0.01"].optimizer.lr == 0.01
    assert runs["eta-lr0.1"].optimizer.batch_size == 32


def test_adding_a_sweep_value_keeps_other_runs_identical():
    raw = base_raw()
    before = expand_runs(parse_config(raw))
    raw["studies"]["eta"]["sweep"]["optimizer.lr"].append(0.5)
    after = expand_runs(parse_config(raw))
    assert set(before) < set(after)
    for name, run in before.items():
        assert after[name].model_dump() == run.model_dump()


def test_grid_is_a_product_and_ids_are_readable():
    raw = base_raw()
    raw["studies"]["eta"]["sweep"] = {"optimizer.lr": [0.1, 0.02], "optimizer.batch_size": [8, "full"],
                                      "seed": [0, 1]}
    runs = expand_runs(parse_config(raw))
    assert len(runs) == 8
    assert "eta-lr0.02-bsfull-seed1" in runs
    assert runs["eta-lr0.02-bsfull-seed1"].optimizer.batch_size == "full"


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: r["defaults"].update(bogus=1), "bogus"),
        (lambda r: r["studies"]["eta"]["sweep"].update({"optimizer.lr": [-0.1]}), "optimizer.lr"),
        (lambda r: r["studies"]["eta"]["sweep"].update({"optimizer.lr": ["fast"]}), "optimizer.lr"),
        (lambda r: r["defaults"]["optimizer"].update(batch_size=0), "optimizer.batch_size"),
        (lambda r: r["defaults"]["model"].update(name="nonet"), "nonet"),
        (lambda r: r["datasets"]["d"].update(source="imagenet"), "datasets.d.source"),
        (lambda r: r["defaults"].update(dataset="other"), "'other'"),
        (lambda r: r["studies"]["eta"]["sweep"].update({"optimizer.momentum": [1.5]}), "optimizer.momentum"),
        (lambda r: r["defaults"].update(epochs=3), "exactly one of 'epochs' and 'steps'"),
        (lambda r: r["studies"].update({"bad-name": {}}), "bad-name"),
        (lambda r: r["studies"].update({"../../x": {}}), "../../x"),
        (lambda r: r["studies"]["eta"]["sweep"].update({"a..b": [1]}), "a..b"),
        (lambda r: r["studies"]["eta"]["sweep"].update({"seed": []}), "no values"),
        (lambda r: r.update(spectrum={"frobenius_probes": 1}), "frobenius_probes: 1 gives no standard error"),
        (lambda r: r.update(spectrum={"trace_probes": 3}), "trace_probes: 3 is too few"),
        # a study's override is checked when the config is read, naming the study (not in a job)
        (lambda r: r["studies"]["eta"].update(spectrum={"frobenius_probes": 1}), "studies.eta.spectrum: frobenius"),
        (lambda r: r["studies"]["eta"].update(spectrum={"k": 0}), "studies.eta.spectrum: k"),
        (lambda r: r["studies"]["eta"].update(project={"k": "five"}), "studies.eta.project: k"),
        # the Hessian subset must come from the examples the run trains on
        (lambda r: (r["datasets"]["d"].update(valid_size=100), r["defaults"].update(train_subset=50)),
         "train_subset 50 trains on the first 50 of 300 examples, but the Hessian subset"),
        # 1,000 examples in batches of 37: a last batch of one, which BatchNorm cannot train on
        (lambda r: (r["datasets"].update(img={"source": "synthetic_images", "synthetic_train": 1100,
                                             "valid_size": 100}),
                    r["defaults"].update(dataset="img", model={"name": "vgg11_bn"}, optimizer={"batch_size": 37})),
         "1000 training examples in batches of 37 leave a last batch of one example"),
    ],
)
def test_bad_config_names_the_field(mutate, needle):
    raw = base_raw()
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "my.yaml")
    msg = str(info.value)
    assert msg.startswith("my.yaml: ")
    assert needle in msg
    assert "\n" not in msg


def test_unknown_run_field_in_sweep_is_an_error_naming_the_run():
    raw = base_raw()
    raw["studies"]["eta"]["sweep"]["optimizer.lrr"] = [1]
    with pytest.raises(ConfigError, match=r"studies\.eta .*optimizer\.lrr"):
        parse_config(raw)


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_run_id_sanitises_values():
    assert run_id("s", {"optimizer.lr": 1e-4}) == "s-lr0.0001"
    assert run_id("s", {"model.name": "pkg.mod:Net"}) == "s-pkg.mod_Net"
    assert run_id("s", {"augment": True}) == "s-augmentT"


def test_checkpoint_schedule_is_dense_early_then_per_epoch():
    ds = DatasetConfig(source="mnist1d", mnist1d_samples=1000)  # 800 - 400 valid = 400 train
    assert ds.train_size() == 400
    run = RunConfig.model_validate({
        "dataset": "d", "model": {"name": "mlp"}, "optimizer": {"lr": 0.1, "batch_size": 40},
        "epochs": 5, "checkpoints": {"zoom_every": 3, "zoom_until": 1, "every_epochs": 2},
    })
    assert steps_per_epoch(run, ds) == 10
    assert total_steps(run, ds) == 50
    # zoom: 0,3,6,9 (until epoch 1 = step 10); every 2 epochs: 0,20,40; last: 50
    assert checkpoint_steps(run, ds) == [0, 3, 6, 9, 20, 40, 50]


def test_checkpoint_schedule_log_points_and_full_batch():
    ds = DatasetConfig(source="mnist1d", mnist1d_samples=1000)
    run = RunConfig.model_validate({
        "dataset": "d", "model": {"name": "mlp"}, "optimizer": {"lr": 0.1, "batch_size": "full"},
        "steps": 1000, "train_subset": 100, "checkpoints": {"every_epochs": None, "log_points": 4},
    })
    assert steps_per_epoch(run, ds) == 1
    # log-spaced: 1000^(1/4), 1000^(2/4), 1000^(3/4), 1000
    assert checkpoint_steps(run, ds) == [0, 6, 32, 178, 1000]


def test_checkpoint_schedule_cap():
    ds = DatasetConfig(source="mnist1d", mnist1d_samples=1000)
    run = RunConfig.model_validate({
        "dataset": "d", "model": {"name": "mlp"}, "steps": 100000,
        "checkpoints": {"zoom_every": 1, "zoom_until": 10000, "max_checkpoints": 50},
    })
    with pytest.raises(ValueError, match="max_checkpoints"):
        checkpoint_steps(run, ds)


def test_study_overrides_spectrum():
    raw = base_raw()
    raw["spectrum"] = {"k": 10}
    raw["studies"]["eta"]["spectrum"] = {"k": 5}
    cfg = parse_config(raw)
    assert spectrum_config(cfg, "eta-lr0.1").k == 5
    raw["studies"]["eta"]["spectrum"] = {"kk": 5}
    with pytest.raises(ConfigError, match=r"studies\.eta\.spectrum: kk: Extra inputs"):
        parse_config(raw)  # when the config is read, not later in a job


def test_a_replicate_study_presents_as_the_study_it_repeats():
    """``replicates: eta``: its runs keep their own ids but figures and claims see study "eta"; a
    replicate of an unknown study, of itself or of a replicate is refused with the field named."""
    from sharpflow.study import expand_runs, presentation_runs

    raw = base_raw()
    raw["datasets"]["d"]["mnist1d_samples"] = 5000  # presentation_runs needs steps per epoch
    raw["studies"]["eta_seeds"] = {"replicates": "eta", "sweep": {"optimizer.lr": [0.1], "seed": [1, 2]}}
    cfg = parse_config(raw)
    runs = expand_runs(cfg)
    meta = presentation_runs(cfg, runs, [r for r in runs if r.startswith("eta_seeds")])
    assert sorted(meta) == ["eta_seeds-lr0.1-seed1", "eta_seeds-lr0.1-seed2"]
    assert {m["study"] for m in meta.values()} == {"eta"} and {m["seed"] for m in meta.values()} == {1, 2}
    assert "replicates" not in cfg.studies["eta"].model_dump()  # omitted at its default
    for target in ("nope", "eta_seeds"):
        raw["studies"]["eta_seeds"]["replicates"] = target
        with pytest.raises(ConfigError, match=r"studies\.eta_seeds\.replicates"):
            parse_config(raw)


def test_dataset_sizes():
    assert DatasetConfig(source="cifar10").train_size() == 45000
    assert DatasetConfig(source="fashion_mnist").train_size() == 50000
    assert DatasetConfig(source="ptb", ptb_location="/x").train_size() == (929589 - 1) // 20
    with pytest.raises(ValueError, match="ptb_location"):
        DatasetConfig(source="ptb")


def test_schema_file_in_sync():
    path = ROOT / "workflow" / "schemas" / "config.schema.json"
    assert json.loads(path.read_text()) == json_schema(), (
        "workflow/schemas/config.schema.json is stale: run `sharpflow schema --out workflow/schemas/config.schema.json`"
    )


def test_yaml_roundtrip_of_default(tmp_path):
    raw = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    again = copy.deepcopy(raw)
    assert expand_runs(parse_config(raw)).keys() == expand_runs(parse_config(again)).keys()
