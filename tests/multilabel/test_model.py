"""The n-furcated head, the multi-task loss (checked against a by-hand re-derivation) and freezing."""

import pytest
import torch
import torch.nn.functional as F

from metallo_core.models.backbones import BackboneSpec, build_backbone
from metallo_core.multilabel.baseline_cnn import SmallCNN
from metallo_core.multilabel.model import (
    ExportedMultilabelNet,
    ImageEncoder,
    MultilabelNet,
    MultiTaskLoss,
    NFurcatedHead,
    decode_outputs,
    freeze_backbone,
)
from metallo_core.multilabel.properties import PropertyInfo


def seed002_properties(weights=(1.0, 1.0, 1.0), regression_loss="mse"):
    return [
        PropertyInfo("morphology", "class", [f"m{i}" for i in range(7)], weight=weights[0]),
        PropertyInfo("volume_fraction_class", "class", [f"v{i}" for i in range(10)], weight=weights[1]),
        PropertyInfo("volume_fraction", "value", weight=weights[2], loss=regression_loss, huber_delta=0.5,
                     target_mean=0.275, target_std=0.14),
    ]


def test_head_has_one_output_per_property_of_the_right_shape():
    head = NFurcatedHead(in_dim=32, fc_width=100, properties=seed002_properties())
    outputs = head(torch.randn(5, 32))
    assert list(outputs) == ["morphology", "volume_fraction_class", "volume_fraction"]
    assert outputs["morphology"].shape == (5, 7)
    assert outputs["volume_fraction_class"].shape == (5, 10)
    assert outputs["volume_fraction"].shape == (5,)
    assert head.shared[0].weight.shape == (100, 32)  # the one shared fc layer every head reads
    assert [tuple(h.weight.shape) for h in head.heads] == [(7, 100), (10, 100), (1, 100)]


def test_property_names_that_clash_with_module_attributes_are_fine():
    props = [PropertyInfo("train", "class", ["a", "b"]), PropertyInfo("type", "value")]
    outputs = NFurcatedHead(4, 3, props)(torch.randn(2, 4))
    assert outputs["train"].shape == (2, 2) and outputs["type"].shape == (2,)


def test_input_statistics_standardise_the_features():
    head = NFurcatedHead(3, 4, seed002_properties())
    features = torch.randn(50, 3) * torch.tensor([1.0, 10.0, 100.0]) + 7
    head.set_input_statistics(features)
    standardised = (features - head.input_mean) / head.input_std
    assert torch.allclose(standardised.mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(standardised.std(0), torch.ones(3), atol=1e-4)


@pytest.mark.parametrize("regression_loss", ["mse", "huber"])
def test_loss_is_the_weighted_sum_of_per_property_losses(regression_loss):
    props = seed002_properties(weights=(1.0, 0.5, 2.0), regression_loss=regression_loss)
    torch.manual_seed(0)
    outputs = {"morphology": torch.randn(8, 7), "volume_fraction_class": torch.randn(8, 10),
               "volume_fraction": torch.randn(8)}
    targets = {"morphology": torch.randint(0, 7, (8,)), "volume_fraction_class": torch.randint(0, 10, (8,)),
               "volume_fraction": torch.rand(8) * 0.5}
    total, components = MultiTaskLoss(props)(outputs, targets)

    # By hand: CE per classification head; the regression head compares with (y - mean) / std.
    ce_m = -F.log_softmax(outputs["morphology"], -1)[torch.arange(8), targets["morphology"]].mean()
    ce_v = -F.log_softmax(outputs["volume_fraction_class"], -1)[
        torch.arange(8), targets["volume_fraction_class"]].mean()
    residual = outputs["volume_fraction"] - (targets["volume_fraction"] - 0.275) / 0.14
    if regression_loss == "mse":
        reg = (residual ** 2).mean()
    else:
        a = residual.abs()
        reg = torch.where(a <= 0.5, 0.5 * a ** 2, 0.5 * (a - 0.25)).mean()
    assert torch.allclose(components["morphology"], ce_m)
    assert torch.allclose(components["volume_fraction_class"], ce_v)
    assert torch.allclose(components["volume_fraction"], reg)
    assert torch.allclose(total, 1.0 * ce_m + 0.5 * ce_v + 2.0 * reg)


def test_a_zero_weight_property_sends_no_gradient_to_its_head():
    props = seed002_properties(weights=(1.0, 0.0, 1.0))
    head = NFurcatedHead(6, 5, props)
    targets = {"morphology": torch.tensor([0, 1]), "volume_fraction_class": torch.tensor([2, 3]),
               "volume_fraction": torch.tensor([0.1, 0.2])}
    total, _ = MultiTaskLoss(props)(head(torch.randn(2, 6)), targets)
    total.backward()
    assert head.heads[1].weight.grad is None or torch.all(head.heads[1].weight.grad == 0)
    assert torch.any(head.heads[0].weight.grad != 0) and torch.any(head.shared[0].weight.grad != 0)


def test_decoded_outputs_are_probabilities_and_values_in_property_units():
    props = seed002_properties()
    decoded = decode_outputs({"morphology": torch.randn(3, 7), "volume_fraction_class": torch.randn(3, 10),
                              "volume_fraction": torch.tensor([0.0, 1.0, -1.0])}, props)
    assert torch.allclose(decoded["morphology"].sum(-1), torch.ones(3))
    assert torch.allclose(decoded["volume_fraction"], torch.tensor([0.275, 0.415, 0.135]))


def test_frozen_backbone_trains_only_its_last_stage_and_keeps_frozen_batchnorm_in_eval_mode():
    backbone = build_backbone(BackboneSpec(arch="resnet18", small_input=True, image_size=16))
    trainable = freeze_backbone(backbone, train_last_stage=True)
    assert trainable and all(name.startswith("layer4.") for name in trainable)
    network = MultilabelNet(ImageEncoder(backbone, (0.5,) * 3, (0.5,) * 3),
                            NFurcatedHead(512, 8, seed002_properties())).train()
    assert not backbone.layer1[0].bn1.training  # frozen: running statistics stay as pretrained
    assert backbone.layer4[0].bn1.training and network.head.training
    assert freeze_backbone(backbone, train_last_stage=False) == []


def test_exported_network_maps_images_to_probabilities_then_values():
    props = seed002_properties()
    cnn = SmallCNN([4, 8], pooled_size=2)
    network = MultilabelNet(ImageEncoder(cnn, (0.5,) * 3, (0.5,) * 3), NFurcatedHead(cnn.feature_dim, 6, props))
    output = ExportedMultilabelNet(network, props).eval()(torch.rand(2, 3, 16, 16))
    assert output.shape == (2, 7 + 10 + 1)
    assert (torch.allclose(output[:, :7].sum(-1), torch.ones(2))
            and torch.allclose(output[:, 7:17].sum(-1), torch.ones(2)))


def test_model_files_rebuild_the_same_network_without_pickle(tmp_path):
    from metallo_core.tracking.multilabel_store import (
        MultilabelModelSpec,
        load_model_directory,
        save_model_files,
    )

    props = seed002_properties()
    cnn = SmallCNN([4, 8], pooled_size=2)
    network = MultilabelNet(ImageEncoder(cnn, (0.5,) * 3, (0.5,) * 3), NFurcatedHead(cnn.feature_dim, 6, props)).eval()
    network.head.set_input_statistics(torch.randn(10, cnn.feature_dim))
    spec = MultilabelModelSpec(properties=[p.to_dict() for p in props], in_dim=cnn.feature_dim, fc_width=6,
                               activation="relu", dropout=0.0, encoder="small_cnn", image_size=16,
                               mean=[0.5] * 3, std=[0.5] * 3, cnn={"channels": [4, 8], "pooled_size": 2})
    save_model_files(tmp_path, spec, network)
    loaded = load_model_directory(tmp_path, "test-model")
    images = torch.rand(3, 3, 16, 16)
    expected, actual = network(images), loaded.network(images)
    assert all(torch.allclose(expected[name], actual[name]) for name in expected)
    assert [p.name for p in loaded.properties] == [p.name for p in props]
    assert loaded.properties[2].target_std == pytest.approx(0.14)
