"""Every registered space samples valid configs; freezing depth is conditional on the backbone."""
import optuna
import pytest

from spaces import UnknownSpace, get_space, list_spaces
from spaces.recipes import RECIPES
from trainables.config import validate_config
from trainables.models import num_stages

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _draw(space, n, *, pretrained=True, seed=0):
    stages = {b: num_stages(b) for b in space.backbones}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5))
    for point in space.points:
        study.enqueue_trial(point)
    configs = []
    for k in range(n):
        trial = study.ask()
        configs.append(space.sample(trial, backbones=space.backbones, stages=stages, pretrained=pretrained))
        study.tell(trial, (k * 37 % 11) / 11)
    return configs


def test_registry_lists_and_finds_spaces():
    assert {"backbones", "recipes", "tiny"} <= set(list_spaces())
    assert list_spaces("rec*") == ["recipes"]
    with pytest.raises(UnknownSpace, match="unknown space 'nope'; known spaces: backbones, grid, lite, plain, recipes, tiny"):
        get_space("nope")


@pytest.mark.parametrize("name", list_spaces())
def test_every_space_samples_valid_configs(name):
    space = get_space(name)
    configs = _draw(space, 30 if not space.fixed else len(space.points))
    for config in configs:
        validate_config(config, num_classes=3)
        assert config["backbone"] in space.backbones


def test_freeze_depth_is_conditional_on_the_backbone():
    configs = _draw(get_space("backbones"), 60)
    assert {c["backbone"] for c in configs} >= {"resnet50", "inception_v3"} or len({c["backbone"] for c in configs}) > 4
    for c in configs:
        if c["backbone"] == "small_cnn":  # no ImageNet weights: from scratch, nothing frozen
            assert c["weights"] == "random" and "freeze_depth" not in c and "head_lr_ratio" not in c
        else:
            assert 0 <= c["freeze_depth"] <= num_stages(c["backbone"]) and "weights" not in c
    assert len({c["freeze_depth"] for c in configs if "freeze_depth" in c}) > 2
    # trained from scratch, freezing random layers makes no sense: the space does not draw it
    scratch = _draw(get_space("backbones"), 10, pretrained=False)
    assert all("freeze_depth" not in c and "head_lr_ratio" not in c for c in scratch)


def test_conditional_parameters_appear_only_with_their_parent():
    for c in _draw(get_space("backbones"), 60, seed=1):
        assert ("momentum" in c) == (c["optimizer"] == "sgd")
        assert ("minority_weight" in c) == (c["class_weights"] == "ratio")
        assert ("head_hidden" in c) == (c["head"] == "mlp")


def test_recipes_are_the_classic_pipelines():
    space = get_space("recipes")
    configs = {c["recipe"]: c for c in _draw(space, len(space.points))}
    assert set(configs) == set(RECIPES)
    v3 = configs["mobilenetv3_small_warm_restarts"]
    assert v3["freeze_depth"] == num_stages("mobilenetv3_small_100") - 2
    assert v3["lr"] == 1e-6 and v3["lr"] * v3["head_lr_ratio"] == pytest.approx(1e-2)
    assert (v3["optimizer"], v3["weight_decay"], v3["schedule"], v3["class_weights"]) == \
        ("adamw", 5e-2, "cosine_restarts", "balanced")
    inc = configs["inceptionv3_frozen_heavy_aug"]
    assert (inc["head"], inc["dropout"], inc["optimizer"], inc["lr"], inc["augment"]) == ("mlp", 0.7, "sgd", 2e-3, "heavy")
    assert configs["small_cnn_scratch"]["weights"] == "random"
    assert {c["backbone"] for c in configs.values()} >= {"mobilenetv2_100", "resnet50", "densenet121",
                                                         "inception_resnet_v2", "inception_v3", "small_cnn"}


def test_small_cnn_in_backbones_is_always_trained_from_scratch():
    space = get_space("backbones")
    study = optuna.create_study()
    study.enqueue_trial({"backbone": "small_cnn"})
    stages = {b: num_stages(b) for b in space.backbones}
    config = space.sample(study.ask(), backbones=space.backbones, stages=stages, pretrained=True)
    assert config["backbone"] == "small_cnn" and config["weights"] == "random"
    assert validate_config(config, num_classes=2)["freeze_depth"] == 0


def test_the_grid_space_tries_each_backbone_at_three_learning_rates_first():
    from spaces.backbones import GRID_LRS, LITE, plain_recipe
    grid, lite, plain = get_space("grid"), get_space("lite"), get_space("plain")
    first = grid.first_trials(LITE, pretrained=True)
    assert [(p["backbone"], p["lr"]) for p in first] == [(b, lr) for b in LITE for lr in GRID_LRS]
    for point in first:  # the plain recipe otherwise, fine-tuned end to end
        assert {k: v for k, v in point.items() if k not in ("backbone", "lr")} == {
            k: v for k, v in plain_recipe(point["backbone"], pretrained=True).items() if k != "lr"}
    assert all(p.get("freeze_depth", 0) == 0 for p in first)
    # the sweep is the plain recipe at 1e-4; the default search starts each pretrained backbone at 1e-3
    sweep, default = plain.first_trials(LITE, pretrained=True), lite.first_trials(LITE, pretrained=True)
    assert [p["backbone"] for p in sweep] == [p["backbone"] for p in default] == list(LITE)
    assert [p["lr"] for p in sweep] == [1e-4, 1e-4, 1e-4, 1e-3]
    assert [p["lr"] for p in default] == [1e-3] * 4
    assert [{**p, "lr": 0} for p in sweep] == [{**p, "lr": 0} for p in default]
    assert [p["lr"] for p in plain.first_trials(LITE, pretrained=False)] == [1e-3] * 4
