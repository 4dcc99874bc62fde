"""Checkpoints: memory in its own safetensors file, bit-exact round trips, remote code, missing and bad tensors."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from memoryllm_hf import MemoryLlamaForCausalLM, MemoryLlamaModel
from memoryllm_hf.modeling.memory_state import MEMORY_BUFFERS
from memoryllm_hf.tiny import TINY, tiny_config, tiny_model

LORA = {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def assert_same_memory(a, b):
    for name in MEMORY_BUFFERS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact_and_keeps_drop_rng(tmp_path, dtype):
    tiny_model(lora_config=LORA, add_decoder_lora=True).save_pretrained(tmp_path / "base")
    model = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype).eval()
    model.inject(torch.randint(3, 128, (50,)))
    assert model.memory.dtype == dtype
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MemoryLlamaForCausalLM and loaded.dtype == dtype
    assert_same_memory(model, loaded)
    prompt = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, loaded(prompt).logits)
    context = torch.randint(3, 128, (20,))
    model.inject(context)
    loaded.inject(context)  # the saved generator state makes the next drops identical
    assert_same_memory(model, loaded)


def test_memory_has_its_own_file(tmp_path):
    model = tiny_model()
    model.inject(torch.randint(3, 128, (12,)))
    for _ in range(2):  # saving twice into the same folder keeps a consistent layout
        model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "memory.safetensors" in files and "model.safetensors" not in files
    with safe_open(tmp_path / "memory.safetensors", "pt") as handle:
        assert sorted(handle.keys()) == sorted(MEMORY_BUFFERS)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["memory_file"] == "memory.safetensors"  # named there, its tensors not listed
    index = index["weight_map"]
    assert "memory.safetensors" not in index.values()
    for shard in set(index.values()) - {"memory.safetensors"}:
        with safe_open(tmp_path / shard, "pt") as handle:
            assert not set(handle.keys()) & set(MEMORY_BUFFERS)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_memory_llama.MemoryLlamaConfig",
        "AutoModel": "modeling_memory_llama.MemoryLlamaModel",
        "AutoModelForCausalLM": "modeling_memory_llama.MemoryLlamaForCausalLM",
    }
    shipped = {f for f in files if f.endswith(".py")}
    package = {f for f in os.listdir(os.path.dirname(sys.modules["memoryllm_hf.modeling"].__file__))}
    assert shipped == {f for f in package if f.endswith(".py") and f != "__init__.py"}


REMOTE = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "memoryllm_hf":
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, Block())
    try:
        import memoryllm_hf
        raise SystemExit("memoryllm_hf must not be importable here")
    except ModuleNotFoundError:
        pass
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    folder, expected = sys.argv[1], torch.load(sys.argv[2])
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(base).__name__ == "MemoryLlamaModel", type(base)
    assert type(base).__module__.startswith("transformers_modules"), type(base).__module__
    with torch.no_grad():
        hidden = base(expected["prompt"]).last_hidden_state
    torch.testing.assert_close(hidden, expected["hidden"], rtol=0, atol=1e-6)
    for auto in (AutoModelForCausalLM,):
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert torch.equal(model.memory, expected["memory"])
        with torch.no_grad():  # (another process may use another thread count: float sums may differ in order)
            torch.testing.assert_close(model(expected["prompt"]).logits, expected["logits"], rtol=0, atol=1e-6)
            out = model.generate(expected["prompt"], max_new_tokens=4, do_sample=False)
        assert torch.equal(out, expected["generated"])
        model.inject(expected["context"])
        torch.testing.assert_close(model.memory, expected["memory_after"], rtol=0, atol=1e-6)
    print("remote ok")
    """
)


def test_remote_code_loads_without_the_package(tmp_path):
    model = tiny_model(lora_config=LORA, add_decoder_lora=True)
    model.inject(torch.randint(3, 128, (30,)))
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    prompt, context = torch.randint(3, 128, (2, 5)), torch.randint(3, 128, (1, 9))  # 2 rows: shared-prefix reads
    with torch.no_grad():
        expected = {
            "memory": model.memory.clone(),
            "prompt": prompt,
            "logits": model(prompt).logits,
            "hidden": model(prompt, output_hidden_states=True).hidden_states[-1],  # after the final norm
            "generated": model.generate(prompt, max_new_tokens=4, do_sample=False),
            "context": context,
        }
    model.inject(context)
    expected["memory_after"] = model.memory
    torch.save(expected, tmp_path / "expected.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE, str(folder), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok" in result.stdout


def test_checkpoint_without_memory_gets_real_initial_values(tmp_path):
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY.items() if k in LlamaConfig().to_dict()}))
    llama.save_pretrained(tmp_path)
    config = tiny_config(lora_config=LORA, add_decoder_lora=True)
    model = MemoryLlamaForCausalLM.from_pretrained(tmp_path, config=config)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(tensor.float()).all(), name
    assert not model.memory_is_initialized and model.num_injections == 0
    adapter = model.adapters.modules[0]
    assert adapter.adapter_A["write"].abs().sum() > 0 and adapter.adapter_B["write"].abs().sum() == 0
    assert torch.equal(model.model.embed_tokens.weight, llama.model.embed_tokens.weight)


def test_pool_shape_disagreeing_with_config(tmp_path):
    model = tiny_model()
    model.inject(torch.randint(3, 128, (12,)))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_memory_tokens": 30}))
    with pytest.raises(ValueError, match="num_memory_tokens"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    assert fresh.memory.shape[1] == 30 and not fresh.memory_is_initialized


def test_automodel_gives_the_memory_reading_base_model(tmp_path):
    model = tiny_model()
    model.inject(torch.randint(3, 128, (30,)))
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is MemoryLlamaModel and not base.can_generate()
    prompt = torch.randint(3, 128, (2, 5))
    with torch.no_grad():
        hidden = base(prompt).last_hidden_state
        reference = model(prompt, output_hidden_states=True)
        assert torch.allclose(hidden, reference.hidden_states[-1], atol=1e-6)  # reads the memory
        assert torch.allclose(model.lm_head(hidden), reference.logits, atol=1e-5)
        assert not torch.allclose(hidden, base(prompt, use_memory=False).last_hidden_state, atol=1e-3)
    with pytest.raises(ValueError, match="no LM head"):
        base(prompt, labels=prompt)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is MemoryLlamaForCausalLM
