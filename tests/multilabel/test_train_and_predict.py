"""End to end on a small synthetic set: heads learn, the model is registered with lineage, predict writes a CSV;
plus the torchvision weights path, the feature cache and the unfrozen last stage."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from metallo_core import cli, tracking
from metallo_core.config import load_config
from metallo_core.data.images import decode_resized
from metallo_core.data.manifest import read_manifest
from metallo_core.data.synth_dataset import write_nfurcated
from metallo_core.errors import ConfigError
from metallo_core.models.backbones import BackboneSpec, build_backbone
from metallo_core.multilabel.config import BackboneSettings, MultilabelConfig
from metallo_core.multilabel.features import load_feature_table, load_image_table, resolve_backbone
from metallo_core.multilabel.model import (
    MultilabelNet,
    NFurcatedHead,
    decode_outputs,
    images_to_unit_tensor,
)
from metallo_core.tracking.multilabel_store import load_model_directory, save_model_files
from metallo_core.train import multilabel as stage
from metallo_core.train.multilabel import (
    check_dataset,
    make_image_encoder,
    model_spec,
    prepare_inputs,
    run_multilabel_training,
    train_choosing_layers,
    train_model,
)

# A random-init ResNet-18 with the small stem: no pretrained weights exist offline, and a test must not
# depend on the local registry. Random conv features still separate these textures well enough to learn.
SMALL_BACKBONE = ["backbone.source=scratch", "backbone.arch=resnet18", "backbone.small_input=true",
                  "data.image_size=32"]
FINAL_FEATURES = ["backbone.feature_layers=final"]  # the set these tests were written for (auto has its own)


@pytest.fixture(scope="module")
def nfurcated(tmp_path_factory):
    """7 morphologies x 10 volume fractions x 4 images at 32 px (280 images)."""
    path = tmp_path_factory.mktemp("multilabel") / "nfurcated"
    write_nfurcated(str(path), images_per_combination=4, size=32, seed=0)
    return path


def in_process_predictions(network: MultilabelNet, properties, paths: list, size: int) -> dict[str, np.ndarray]:
    """The trained network's own outputs on the image files, decoded as predict decodes them."""
    images = np.stack([decode_resized(path.read_bytes(), size) for path in paths])
    with torch.inference_mode():
        decoded = decode_outputs(network.eval()(images_to_unit_tensor(torch.from_numpy(images))), properties)
    return {name: value.numpy() for name, value in decoded.items()}


def test_heads_learn_model_is_registered_and_predict_writes_one_row_per_image(nfurcated, tmp_path, monkeypatch):
    config = load_config(MultilabelConfig, None, [f"data.uri={nfurcated}", *SMALL_BACKBONE, *FINAL_FEATURES,
                                                  "data.test_fraction=0.3",
                                                  "optim.max_epochs=40", "torch_threads=2"])
    trained_in_process = {}

    def keep_trained_network(*args, **kwargs):
        trained = train_model(*args, **kwargs)
        trained_in_process.update(trained=trained, encoder=kwargs["image_encoder"])
        return trained

    monkeypatch.setattr(stage, "train_model", keep_trained_network)
    result = run_multilabel_training(config)

    # Default properties: every label column of the dataset (two classification heads, one regression head).
    assert set(result.errors) == {"morphology", "volume_fraction_class", "volume_fraction"}
    assert result.num_train == 196 and result.num_test == 84
    # Chance is 1/7 and 1/10 accuracy. Fixed seed; margins well inside what the run reaches (~45% / ~35%).
    assert 1 - result.errors["morphology"] >= 1 / 7 + 0.20
    assert 1 - result.errors["volume_fraction_class"] >= 1 / 10 + 0.15
    assert result.cumulative_error == pytest.approx(result.errors["morphology"]
                                                    + result.errors["volume_fraction_class"])
    mae_curve = [m.value for m in sorted(
        tracking.client().get_metric_history(result.run_id, "test_error/volume_fraction"), key=lambda m: m.step)]
    assert len(mae_curve) == 41  # epoch 0 (untrained) to 40
    assert mae_curve[-1] < 0.5 * mae_curve[0]  # the regression head's error falls
    assert mae_curve[-1] < 0.06  # predicting the mean fraction would be ~0.125 off on average

    version = tracking.client().get_model_version("metallo-multilabel", "1")
    assert result.model == "models:/metallo-multilabel/1"
    assert version.tags["metallo.dataset_uri"] == str(nfurcated)
    assert len(version.tags["metallo.dataset_manifest_sha256"]) == 64
    assert version.tags["metallo.backbone_random_init"] == "true"
    assert version.tags["metallo.config_hash"] and version.tags["metallo.run_id"] == result.run_id

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(3):
        pixels = (rng.random((48, 48)) < 0.3).astype(np.uint8) * 255
        Image.fromarray(pixels).save(images / ("sub" if index == 2 else "") / f"im{index}.png")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "preds.csv"
    code = cli.main(["multilabel", "predict", "--model", "models:/metallo-multilabel@current",
                     "--images", str(images), "--out", str(out)])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [row["file"] for row in rows] == ["im0.png", "im1.png", "sub/im2.png"]
    assert list(rows[0]) == ["file", "morphology", "morphology_probability", "volume_fraction_class",
                             "volume_fraction_class_probability", "volume_fraction"]
    manifest = read_manifest(str(nfurcated))
    for row in rows:
        assert row["morphology"] in manifest.extra_columns["morphology"].classes
        assert row["volume_fraction_class"] in manifest.extra_columns["volume_fraction_class"].classes

    # Oracle: the network as trained in this process, on the same files. A predict that loaded other
    # weights (an untrained head, another version) would disagree; the guard below shows by how much.
    trained = trained_in_process["trained"]
    paths = [images / row["file"] for row in rows]
    expected = in_process_predictions(MultilabelNet(trained_in_process["encoder"], trained.head),
                                      trained.properties, paths, size=32)
    by_name = {prop.name: prop for prop in trained.properties}
    for name in ("morphology", "volume_fraction_class"):
        classes = by_name[name].classes
        assert [row[name] for row in rows] == [classes[i] for i in expected[name].argmax(-1)]
        np.testing.assert_allclose([float(row[f"{name}_probability"]) for row in rows], expected[name].max(-1),
                                   atol=2e-6)
    np.testing.assert_allclose([float(row["volume_fraction"]) for row in rows], expected["volume_fraction"],
                               atol=2e-6)

    torch.manual_seed(1)
    untrained_head = NFurcatedHead(trained.head.shared[0].in_features, config.head.fc_width, trained.properties)
    untrained = in_process_predictions(MultilabelNet(trained_in_process["encoder"], untrained_head),
                                       trained.properties, paths, size=32)
    assert np.abs(untrained["morphology"].max(-1) - expected["morphology"].max(-1)).max() > 1e-2
    assert np.abs(untrained["volume_fraction"] - expected["volume_fraction"]).max() > 1e-2


def test_train_json_ends_with_errors_cumulative_error_and_model(nfurcated, capsys):
    import json

    code = cli.main(["multilabel", "train", "--data", str(nfurcated), *SMALL_BACKBONE, "optim.max_epochs=2",
                     "data.max_images=140", "properties=[{name: morphology}, {name: volume_fraction, kind: value}]",
                     "--json"])
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last["errors"]) == {"morphology", "volume_fraction"}
    assert last["cumulative_error"] == pytest.approx(last["errors"]["morphology"])
    assert last["model"].startswith("models:/metallo-multilabel/")
    # No feature setting: the set is chosen on the validation rows, and the run and model record it.
    assert last["feature_layers_chosen"] and [c["layers"] for c in last["feature_candidates"]] == \
        ["early1", "early2", "final", "early2+final"]
    chosen = min(last["feature_candidates"], key=lambda c: c["validation_cumulative_error"])
    assert last["feature_layers"] == chosen["layers"]
    name, version = last["model"].removeprefix("models:/").split("/")
    tags = tracking.client().get_model_version(name, version).tags
    assert tags["metallo.feature_layers"] == last["feature_layers"]
    assert tags["metallo.feature_layers_chosen_by"] == "validation"
    run = tracking.client().get_run(last["run_id"])
    assert run.data.tags["metallo.feature_layers"] == last["feature_layers"]
    assert "feature_choice/early2_final/validation_cumulative_error" in run.data.metrics


def test_predict_rebuilds_the_chosen_feature_set_and_computes_the_columns_the_heads_trained_on(nfurcated, tmp_path):
    """Both candidates take columns out of the middle of the widest table; whichever wins, the saved model's
    encoder must compute exactly those columns from the images."""
    config = load_config(MultilabelConfig, None, [
        f"data.uri={nfurcated}", *SMALL_BACKBONE, "data.max_images=140", "optim.max_epochs=3",
        "backbone.feature_candidates=[early1+final, early2]", f"backbone.cache_dir={tmp_path / 'cache'}",
        "head.fc_width=32", "properties=[{name: morphology}, {name: volume_fraction_class}]"])
    manifest, properties = check_dataset(config)
    prepared = prepare_inputs(config, manifest, properties)
    assert prepared.table.inputs.shape == (140, 64 + 128 + 512) and prepared.stage_widths == (64, 128)
    choice = train_choosing_layers(config, prepared)
    encoder, dim = make_image_encoder(config, prepared.backbone, choice.layers)
    spec = model_spec(config, choice.trained, choice.prepared, dim, {}, encoder)
    save_model_files(tmp_path, spec, MultilabelNet(encoder, choice.trained.head))
    loaded = load_model_directory(tmp_path, "chosen model")

    assert loaded.spec.feature_layers == choice.layers.name
    assert loaded.network.encoder.pooled_stages == ("layer1", "layer2")[:choice.layers.early_stages]
    assert loaded.network.encoder.final_features == choice.layers.final
    images = load_image_table(str(nfurcated), "train", image_size=32, manifest=manifest, max_images=140).inputs[:6]
    with torch.inference_mode():
        features = loaded.network.encoder.eval()(images_to_unit_tensor(torch.from_numpy(images)))
    np.testing.assert_allclose(features.numpy(), choice.prepared.table.inputs[:6], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("override, message", [
    ("properties=[{name: grain_size}]", "properties[0] ('grain_size') is not a label column"),
    ("properties=[{name: volume_fraction, kind: class}]", "holds continuous float values"),
    ("data.split=test", "has no split 'test'"),
])
def test_cli_errors_name_the_setting_and_column(nfurcated, capsys, override, message):
    assert cli.main(["multilabel", "train", "--data", str(nfurcated), *SMALL_BACKBONE, override]) == 2
    assert message in capsys.readouterr().err


def test_torchvision_weights_come_from_a_local_file_and_name_the_cache_key(tmp_path):
    spec = BackboneSpec(arch="resnet18")
    torch.manual_seed(123)
    source = build_backbone(spec)
    state = {**source.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    weights = tmp_path / "resnet18-local.pth"
    torch.save(state, weights)

    resolved = resolve_backbone(BackboneSettings(source=str(weights), arch="resnet18"))
    assert not resolved.random_init and "sha256=" in resolved.identity
    assert torch.equal(resolved.module.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    other = tmp_path / "other.pth"
    torch.save({**state, "conv1.weight": state["conv1.weight"] + 1}, other)
    assert resolve_backbone(BackboneSettings(source=str(other), arch="resnet18")).identity != resolved.identity
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_backbone(BackboneSettings(source=str(tmp_path / "missing.pth")))
    with pytest.raises(ConfigError, match="does not fit a resnet50"):
        resolve_backbone(BackboneSettings(source=str(weights), arch="resnet50"))


def test_registry_sources_go_to_the_look_up_the_caller_hands_over():
    settings = BackboneSettings(source="models:/some-backbone@current")
    with pytest.raises(ConfigError, match="'models:/some-backbone@current' is a registry model"):
        resolve_backbone(settings)
    found = resolve_backbone(BackboneSettings(source="torchvision", arch="resnet18"))
    asked = []

    def registered(uri):
        asked.append(uri)
        return found

    assert resolve_backbone(settings, registered=registered) is found and asked == ["models:/some-backbone@current"]


def test_features_are_cached_and_an_unfrozen_last_stage_trains_on_images(nfurcated, tmp_path):
    config = load_config(MultilabelConfig, None, [f"data.uri={nfurcated}", *SMALL_BACKBONE, "data.image_size=16",
                                                  "data.max_images=70", f"backbone.cache_dir={tmp_path / 'cache'}"])
    manifest, properties = check_dataset(config)
    backbone = resolve_backbone(config.backbone)
    cache_dir = stage.feature_cache_dir(config.backbone)
    assert cache_dir == (tmp_path / "cache").resolve()
    first = load_feature_table(str(nfurcated), "train", backbone=backbone, image_size=16, manifest=manifest,
                               cache_dir=cache_dir, max_images=70)
    again = load_feature_table(str(nfurcated), "train", backbone=backbone, image_size=16, manifest=manifest,
                               cache_dir=cache_dir, max_images=70)
    assert not first.from_cache and again.from_cache and again.cache_path == first.cache_path
    assert first.cache_path.startswith(str(cache_dir))
    assert np.array_equal(first.inputs, again.inputs) and first.inputs.shape == (70, 512)
    assert np.array_equal(first.extras["volume_fraction"], again.extras["volume_fraction"])

    config.backbone.unfreeze_last_stage = True
    config.optim.max_epochs = 1
    prepared = prepare_inputs(config, manifest, properties, backbone=backbone)
    assert prepared.table.kind == "images" and prepared.table.cache_path is None  # no cache with a trained stage
    from metallo_core.train.multilabel import make_image_encoder

    encoder, dim = make_image_encoder(config, backbone)
    layer1 = backbone.module.layer1[0].conv1.weight.clone()
    layer4 = backbone.module.layer4[1].conv2.weight.clone()
    train_model(config, prepared, image_encoder=encoder, feature_dim=dim)
    assert torch.equal(backbone.module.layer1[0].conv1.weight, layer1)
    assert not torch.equal(backbone.module.layer4[1].conv2.weight, layer4)
