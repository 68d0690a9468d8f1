"""`recipes`: the classic COVID-19 / pneumonia transfer-learning pipelines as fixed points.

Each recipe is a config in the vocabulary of the `backbones` space, so the leaderboard ranks
them beside searched configs. Recipes that start from ImageNet weights take the search's
`--weights` setting; the small CNN is always trained from scratch.
"""
from spaces._registry import register_space

FINETUNE = {"freeze_depth": 0, "optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0, "schedule": "step",
            "step_epochs": 2, "step_gamma": 0.5, "class_weights": "balanced", "head": "linear",
            "dropout": 0.2, "augment": "light"}

RECIPES = {
    # MobileNetV2 with ImageNet weights, frozen backbone and a small head, Adam 1e-4
    "mobilenetv2_frozen_adam": {"backbone": "mobilenetv2_100", "freeze_depth": 5, "optimizer": "adam",
                                "lr": 1e-4, "weight_decay": 0.0, "schedule": "constant", "head": "linear",
                                "dropout": 0.2, "augment": "light"},
    # MobileNetV3-small, all but the last two blocks frozen, AdamW wd 5e-2, head LR 1e-2 and
    # backbone LR 1e-6, cosine annealing with warm restarts, balanced class weights
    "mobilenetv3_small_warm_restarts": {"backbone": "mobilenetv3_small_100", "freeze_depth": 3,
                                        "optimizer": "adamw", "weight_decay": 5e-2, "lr": 1e-6,
                                        "head_lr_ratio": 1e4, "schedule": "cosine_restarts",
                                        "restart_epochs": 2, "class_weights": "balanced", "head": "linear",
                                        "dropout": 0.2, "augment": "light"},
    # ResNet50 / DenseNet121 / InceptionResNetV2 fine-tuned with step LR decay and class weights
    "resnet50_finetune": {"backbone": "resnet50", **FINETUNE},
    "densenet121_finetune": {"backbone": "densenet121", **FINETUNE},
    "inception_resnet_v2_finetune": {"backbone": "inception_resnet_v2", **FINETUNE},
    # InceptionV3 frozen, BN-dropout(0.7)-dense(256)-BN-dropout head, SGD 0.002 momentum 0.9,
    # heavy augmentation (rotation 360, shifts 0.2, zoom 0.2, both flips)
    "inceptionv3_frozen_heavy_aug": {"backbone": "inception_v3", "freeze_depth": 5, "head": "mlp",
                                     "head_hidden": 256, "dropout": 0.7, "optimizer": "sgd", "lr": 2e-3,
                                     "momentum": 0.9, "weight_decay": 0.0, "schedule": "constant",
                                     "augment": "heavy"},
    # a small CNN (4 conv blocks, dense head) trained from scratch on grayscale input
    "small_cnn_scratch": {"backbone": "small_cnn", "weights": "random", "optimizer": "adam", "lr": 1e-3,
                          "weight_decay": 0.0, "schedule": "constant", "head": "mlp", "head_hidden": 256,
                          "dropout": 0.3, "augment": "light"},
}


@register_space("recipes", backbones=sorted({r["backbone"] for r in RECIPES.values()}),
                points=[{"recipe": name} for name in RECIPES], fixed=True)
def recipes(trial, **_):
    """The classic fixed pipelines, each run once and ranked beside searched configs."""
    return dict(RECIPES[trial.suggest_categorical("recipe", list(RECIPES))])
