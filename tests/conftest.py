"""Shared fixtures: tiny random models for the default run, SmolLM2 for tests marked `slow`."""

import shutil
from pathlib import Path

import pytest
import torch

from memoryllm_hf.tiny import tiny_model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """Tiny models run many small steps: a second thread only adds synchronisation (much slower on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["output", "input"])
def read_model(request):
    """Tiny model of each update rule with one injection of 40 random tokens (reads see a real memory)."""
    overrides = {"memory_update": "input", "fresh_pool": "grow"} if request.param == "input" else {}
    model = tiny_model(**overrides)
    model.inject(torch.randint(3, 128, (40,)))
    return model


@pytest.fixture
def output_model():
    """Tiny model with the official update rule and a tiled pool."""
    return tiny_model()


@pytest.fixture
def input_model():
    """Tiny model with the training-free update rule and a growing pool."""
    return tiny_model(memory_update="input", fresh_pool="grow")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the offline default; slow tests only."""
    from memoryllm_hf import load

    return load("default")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A tiny MemoryLlama folder with a real tokenizer (copy it with `folder` before changing it)."""
    from tiny_folder import save_tiny_folder

    return save_tiny_folder(tmp_path_factory.mktemp("template") / "model")


@pytest.fixture
def folder(template, tmp_path) -> Path:
    """A fresh copy of `template` for one test."""
    return Path(shutil.copytree(template, tmp_path / "model"))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """(folder, model) of a plain tiny Llama (random, norm weights jittered) saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memoryllm_hf.tiny import TINY

    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in TINY.items() if k in LlamaConfig().to_dict()})
    llama = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in llama.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("llama")
    llama.save_pretrained(folder)
    return folder, llama
