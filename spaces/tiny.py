"""`tiny`: a small fast space for CPUs, smoke runs and CI: small models from scratch."""
from spaces._registry import register_space

BACKBONES = ("small_cnn", "resnet10t", "mobilenetv3_small_050")


def first_trial(backbone: str, *, pretrained: bool) -> dict:
    """Each backbone first with Adam at 1e-3, light augmentation, a little dropout."""
    return {"lr": 1e-3, "dropout": 0.1, "optimizer": "adam", "augment": "light"}


@register_space("tiny", backbones=BACKBONES, first_trial=first_trial)
def tiny(trial, *, backbones, stages, pretrained):
    """Three small backbones trained from scratch; learning rate, dropout, optimizer, augmentation."""
    trial.suggest_categorical("backbone", list(backbones))
    trial.suggest_float("lr", 3e-4, 1e-2, log=True)
    trial.suggest_float("dropout", 0.0, 0.5)
    trial.suggest_categorical("optimizer", ["adam", "adamw", "sgd"])
    trial.suggest_categorical("augment", ["none", "light"])
    return {"weights": "random"}  # fast and offline: these small models train well from scratch
