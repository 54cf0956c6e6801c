"""Fine-tuning with memory/reason control tokens: ``memreason train``.

* ``recipe``: ``TrainRecipe`` (setup → train → finish, read top to bottom) and ``main(cfg)``.
* ``trainer``: the ``Trainer`` subclass and its callbacks (validation accuracy, metrics file, log lines).
* ``data``: the validation split, ablations, token ids and labels, batches and the sampler.
* ``arguments``: what reaches ``TrainingArguments`` (tracking, the validated ``trainer_args`` pass-through).

``memreason.train.trainer`` imports transformers at its top; it is loaded only when one of its names is
asked for, so importing this package stays cheap.
"""

from memreason.train.config import TrainConfig, build_config, load_config
from memreason.model.runs import RUN_FORMAT
from memreason.train.data import (IGNORE_INDEX, LengthGroupedSampler, ListDataset, PadCollator,
                                  allocate_markers_randomly, encode, prepare_example, split_validation)
from memreason.train.recipe import TrainRecipe, main, wrap_model

__all__ = ["IGNORE_INDEX", "RUN_FORMAT", "LengthGroupedSampler", "ListDataset", "MetricsWriter", "PadCollator",
           "RecipeTrainer", "TrainConfig", "TrainRecipe", "ValidationAccuracy", "allocate_markers_randomly",
           "build_config", "encode", "load_config", "main", "prepare_example", "split_validation",
           "wrap_model"]

_TRAINER_NAMES = ("MetricsWriter", "RecipeTrainer", "ValidationAccuracy")


def __getattr__(name):
    if name in _TRAINER_NAMES:
        from memreason.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'memreason.train' has no attribute {name!r}")
