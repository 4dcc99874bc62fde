"""Training MemoryLlama with the paper's objective (new knowledge, continuous context, forgetting, plain LM) on
`accelerate`. Entry point: `accelerate launch -m memoryllm_hf.train --config CONFIG` (or `python -m ...`)."""

from .checkpoint import export_adapter, load_trainables, load_trained_model
from .config import TrainConfig, config_from_dict, load_config
from .data import DocumentExamples, Example, split_document
from .synthetic import KeyValueTask, recall_accuracy
from .trainer import Trainer, make_accelerator

__all__ = [
    "DocumentExamples",
    "Example",
    "KeyValueTask",
    "TrainConfig",
    "Trainer",
    "config_from_dict",
    "export_adapter",
    "load_config",
    "load_trained_model",
    "load_trainables",
    "make_accelerator",
    "recall_accuracy",
    "split_document",
]
