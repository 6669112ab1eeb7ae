"""The torch model zoo: every model at the image sizes the project uses, and checkpoints."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the zoo needs the orchestrator extra")

from orchestrator import cli  # noqa: E402
from orchestrator.train.zoo import (  # noqa: E402
    MODELS,
    ZooError,
    build_model,
    input_shape,
    load_checkpoint,
    model_info,
    model_names,
    patch_size_for,
)

NARROW = {"cnn": 4, "resnet18-gn": 4, "resnet18-bn": 4, "vit": 16}


def test_registry_lists_the_four_models_and_the_cli_offers_the_same():
    assert model_names() == ["cnn", "resnet18-gn", "resnet18-bn", "vit"]
    assert tuple(model_names()) == cli.MODEL_NAMES
    assert model_info("resnet18-bn").batchnorm and not model_info("resnet18-gn").batchnorm
    assert input_shape(1, 28) == (1, 28, 28)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("channels,size", [(1, 8), (1, 28), (3, 32)])
def test_every_model_maps_images_to_logits(name, channels, size):
    model = build_model(name, 7, channels, size, width=NARROW[name], seed=0)
    assert not model.training
    with torch.no_grad():
        logits = model(torch.randn(3, channels, size, size))
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()


def test_resnet18_has_the_published_size_and_norms():
    gn, bn = build_model("resnet18-gn", 10), build_model("resnet18-bn", 10)
    count = sum(p.numel() for p in gn.parameters())
    assert 11_100_000 < count < 11_200_000  # CIFAR ResNet-18: 11.17 M
    assert count == sum(p.numel() for p in bn.parameters())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in gn.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gn.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules())
    stem = gn.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in gn.modules())


def test_width_and_class_count_are_parameters():
    narrow = build_model("vit", 5, width=32)
    wide = build_model("vit", 5, width=64)
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters())
    assert build_model("cnn", 3, width=4).classifier.out_features == 3
    assert patch_size_for(32) == 4 and patch_size_for(28) == 4 and patch_size_for(8) == 2


def test_a_seed_gives_the_same_weights():
    a = build_model("cnn", 10, width=4, seed=3).state_dict()
    b = build_model("cnn", 10, width=4, seed=3).state_dict()
    c = build_model("cnn", 10, width=4, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("bad", [dict(name="resnet50"), dict(num_classes=1), dict(width=0),
                                 dict(image_size=2)])
def test_bad_requests_are_refused_with_a_reason(bad):
    args = {"name": "cnn", "num_classes": 10, "width": 4, **bad}
    with pytest.raises(ZooError):
        build_model(**args)


def test_checkpoint_round_trip_and_wrapped_form(tmp_path):
    source = build_model("resnet18-bn", 10, width=4, seed=1)
    with torch.no_grad():
        source.stem[1].running_mean.add_(0.5)  # buffers travel too
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    torch.save({"model": source.state_dict(), "round": 7}, tmp_path / "wrapped.pt")
    for file in ("plain.pt", "wrapped.pt"):
        target = build_model("resnet18-bn", 10, width=4, seed=2)
        load_checkpoint(target, tmp_path / file)
        want, got = source.state_dict(), target.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_checkpoint_of_another_shape_is_an_error_naming_the_flags(tmp_path):
    torch.save(build_model("cnn", 10, width=8).state_dict(), tmp_path / "w8.pt")
    with pytest.raises(ZooError, match="--width"):
        load_checkpoint(build_model("cnn", 10, width=4), tmp_path / "w8.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ZooError, match="state_dict"):
        load_checkpoint(build_model("cnn", 10, width=4), tmp_path / "list.pt")
