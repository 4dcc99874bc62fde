"""What an experienced transformers / PEFT user does, with memory (issue 14): continue from a returned cache,
generate from `inputs_embeds`, a static cache (each decoding step compared to recomputing the whole sequence from
scratch); AutoModel, PEFT defaults, loading traps, tokenizer output, quiet loads, tooling edges, one loader, and
layers spread over devices (compared to the single-device model)."""

import pytest
import torch

from memoryllm_hf.tiny import tiny_model


@pytest.fixture
def model(read_model):
    return read_model


def assert_matches_recomputation(model, sequence: torch.Tensor, out) -> None:
    """Each step's logits equal a from-scratch forward (memory prefix + whole sequence, no cache)."""
    start = out.sequences.shape[1] - len(out.logits)  # sequences hold the input ids too (none for embeddings)
    for step, logits in enumerate(out.logits):
        reference = model(sequence).logits[:, -1]
        assert (reference - logits).abs().max() < 1e-5, f"step {step}"
        sequence = torch.cat([sequence, out.sequences[:, start + step][:, None]], dim=1)


GREEDY = {"do_sample": False, "output_logits": True, "return_dict_in_generate": True}


@pytest.mark.parametrize("mask", ["none", "tokens", "prefix+tokens"])
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
@torch.no_grad()
def test_generate_continues_from_a_returned_cache(model, mask, name):
    first = model.generate(torch.randint(3, 128, (1, 5)), max_new_tokens=3, **GREEDY)
    turn = torch.cat([first.sequences, torch.randint(3, 128, (1, 4))], dim=1)  # next user turn appended
    kwargs = {name: first.cache}
    if mask == "tokens":
        kwargs["attention_mask"] = torch.ones_like(turn)
    elif mask == "prefix+tokens":
        kwargs["attention_mask"] = torch.ones(1, model.memory_prefix_length + turn.shape[1], dtype=torch.long)
    second = model.generate(turn, max_new_tokens=4, **kwargs, **GREEDY)
    assert_matches_recomputation(model, turn, second)


@torch.no_grad()
def test_forward_continues_from_a_returned_cache(model):
    ids = torch.randint(3, 128, (2, 9))
    first = model(ids[:, :5], use_cache=True)
    mask = torch.ones(2, 9, dtype=torch.long)  # the tokens so far, as with any transformers model
    second = model(ids[:, 5:], cache=first.cache, attention_mask=mask)
    assert (second.logits - model(ids).logits[:, 5:]).abs().max() < 1e-5


@torch.no_grad()
def test_continuing_with_only_cached_tokens_says_what_to_pass(model):
    first = model.generate(torch.randint(3, 128, (1, 5)), max_new_tokens=3, **GREEDY)
    with pytest.raises(ValueError, match="whole sequence so far"):
        model.generate(first.sequences[:, -1:], cache=first.cache, max_new_tokens=2)


@torch.no_grad()
def test_generate_from_inputs_embeds_reads_memory(model):
    ids = torch.randint(3, 128, (2, 6))
    out = model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=4, **GREEDY)
    assert out.sequences.shape == (2, 4)  # like any decoder: only the new tokens come back
    assert_matches_recomputation(model, ids, out)
    assert torch.equal(out.sequences, model.generate(ids, max_new_tokens=4, do_sample=False)[:, 6:])


@torch.no_grad()
def test_static_cache_generation_reads_memory(model):
    ids = torch.randint(3, 128, (2, 5))
    out = model.generate(ids, max_new_tokens=5, cache_implementation="static", **GREEDY)
    assert type(out.cache).__name__ == "StaticCache"
    assert_matches_recomputation(model, ids, out)
    model.generation_config.cache_implementation = "static"  # the torch.compile recipe sets it on the model
    again = model.generate(ids, max_new_tokens=5, **GREEDY)
    assert torch.equal(again.sequences, out.sequences)


@torch.no_grad()
def test_cache_implementation_that_cannot_hold_memory_is_refused_in_one_line(model):
    with pytest.raises(ValueError, match="cannot start with the memory prefix"):
        model.generate(torch.randint(3, 128, (1, 5)), max_new_tokens=2, cache_implementation="offloaded")


# ---------------------------------------------------------------------- PEFT, loading, tokenizer output
def test_lora_without_target_modules_uses_llamas_defaults():
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    peft_model = get_peft_model(tiny_model(), LoraConfig(task_type="CAUSAL_LM", r=2))
    assert peft_model.peft_config["default"].target_modules == set(DEFAULTS["llama"])
    assert any("lora_A" in name for name, _ in peft_model.named_parameters())


def test_lora_defaults_registered_by_a_fresh_import():
    """`import memoryllm_hf` before or after peft: both register (in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import {first}; import {second}\n"
        "from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M\n"
        "from transformers import AutoConfig\n"
        "assert M['memory_llama'] == M['llama'] and AutoConfig.for_model('memory_llama').model_type == 'memory_llama'"
    )
    for first, second in (("memoryllm_hf", "peft"), ("peft", "memoryllm_hf")):
        result = subprocess.run([sys.executable, "-c", code.format(first=first, second=second)], capture_output=True)
        assert result.returncode == 0, result.stderr.decode()[-2000:]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from memoryllm_hf.tiny import TINY

    config = LlamaConfig(**{k: v for k, v in TINY.items() if k in LlamaConfig().to_dict()})
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_from_pretrained_of_a_plain_llama_points_to_from_base(llama_folder):
    from memoryllm_hf import MemoryLlamaForCausalLM

    with pytest.raises(ValueError, match="from_base"):
        MemoryLlamaForCausalLM.from_pretrained(llama_folder)


@pytest.mark.parametrize("name", ["dtype", "torch_dtype"])
def test_from_base_honours_the_dtype(llama_folder, name):
    from memoryllm_hf import MemoryLlamaForCausalLM

    pool = {"num_memory_tokens": 16, "num_update_tokens": 4}
    model = MemoryLlamaForCausalLM.from_base(llama_folder, **pool, **{name: torch.bfloat16})
    assert model.dtype == torch.bfloat16 and model.memory.dtype == torch.bfloat16


def test_inject_takes_tokenizer_output():
    from memoryllm_hf.tiny import tiny_tokenizer

    tokenizer, texts = tiny_tokenizer(), ["Alice lives in Paris.", "Bob keeps three cats."]
    by_ids, by_encoding, by_batch = tiny_model(), tiny_model(), tiny_model()
    for text in texts:
        by_ids.inject(tokenizer(text)["input_ids"])
        by_encoding.inject(tokenizer(text, return_tensors="pt"))
    by_batch.inject(tokenizer(texts, padding=True, return_tensors="pt"))  # rows in order, padding removed
    for model in (by_encoding, by_batch):
        assert torch.equal(model.memory, by_ids.memory) and model.num_injections == by_ids.num_injections
    with pytest.raises(ValueError, match="input_ids"):
        tiny_model().inject({"attention_mask": [1, 1, 1]})


# ---------------------------------------------------------------------- tooling edges
def test_chat_undo_also_drops_the_turns_that_read_the_undone_text(tmp_path, capsys):
    from memoryllm_hf.chat import ChatSession
    from memoryllm_hf.tiny import tiny_tokenizer

    model = tiny_model(memory_update="input", fresh_pool="grow")
    session = ChatSession(str(tmp_path), model, tiny_tokenizer(), max_new_tokens=2)
    for line in ["hello there", "/remember Zorblat was born in Velmora.", "Where was Zorblat born?", "/undo"]:
        session.handle(line)
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["hello there"]
    assert model.num_injections == 0 and "and the 1 conversation turn since" in capsys.readouterr().out


# ---------------------------------------------------------------------- one loader
def test_one_loader_for_every_source(tmp_path, llama_folder):
    from memoryllm_hf import MemoryLlamaForCausalLM, load
    from memoryllm_hf.tiny import tiny_tokenizer

    tiny, tokenizer = load("tiny", seed=3, num_memory_tokens=12)
    assert tiny.config.num_memory_tokens == 12 and not tiny.training and tokenizer("ab")["input_ids"] == [69, 70]
    tiny.inject(torch.randint(3, 128, (20,)))
    tiny.save_pretrained(tmp_path / "saved")
    tiny_tokenizer().save_pretrained(tmp_path / "saved")
    saved, saved_tokenizer = load(tmp_path / "saved", dtype="bfloat16")
    assert saved.dtype == torch.bfloat16 and torch.equal(saved.memory, tiny.memory.bfloat16())
    assert saved_tokenizer is not None
    with pytest.raises(ValueError, match="cannot be changed on a saved model"):
        load(tmp_path / "saved", num_memory_tokens=30)
    wrapped, _ = load(llama_folder, num_memory_tokens=16, num_update_tokens=4)  # a plain Llama gets a fresh memory
    assert type(wrapped) is MemoryLlamaForCausalLM and wrapped.config.memory_update == "input"
    with pytest.raises(ValueError, match="neither"):
        load("no/such/place/here")


# ---------------------------------------------------------------------- device_map
def split_device_map(model, offloaded: str, layer: int = 1) -> dict[str, str]:
    """Everything on the CPU except decoder layer `layer` (on `offloaded`: "disk", "cuda:0", ...)."""
    names = ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head", "memory_embeddings"]
    names += [name for name, _ in model.named_buffers(recurse=False)]
    layers = {f"model.layers.{i}": "cpu" for i in range(model.config.num_hidden_layers)}
    return {**dict.fromkeys(names, "cpu"), **layers, f"model.layers.{layer}": offloaded}


def assert_same_reads_and_injects(single, spread) -> None:
    ids = torch.randint(4, 100, (2, 7))
    for step in range(3):
        context = torch.randint(4, 100, (9 + step,))
        for model in (single, spread):
            model.inject(context, generator=torch.Generator().manual_seed(step))
        filled = single.num_filled_slots  # (the empty slots of a fresh pool hold random values, never read)
        assert spread.num_filled_slots == filled > 0
        assert (spread.memory[:, -filled:] - single.memory[:, -filled:]).abs().max() <= 1e-5
        assert (spread(ids).logits - single(ids).logits).abs().max() <= 1e-5
    assert torch.equal(
        spread.generate(ids, max_new_tokens=4, do_sample=False), single.generate(ids, max_new_tokens=4, do_sample=False)
    )


@torch.no_grad()
def test_disk_offloaded_layer_reads_and_injects_like_one_device(llama_folder, tmp_path):
    from memoryllm_hf import MemoryLlamaForCausalLM
    from memoryllm_hf.modeling.memory_prefix import execution_device

    pool = {"num_memory_tokens": 24, "num_update_tokens": 6, "min_inject_tokens": 2}
    single = MemoryLlamaForCausalLM.from_base(llama_folder, **pool).eval()
    device_map = split_device_map(single, "disk")
    spread = MemoryLlamaForCausalLM.from_base(
        llama_folder, device_map=device_map, offload_folder=str(tmp_path / "offload"), **pool
    ).eval()
    assert spread.model.layers[1].self_attn.k_proj.weight.device.type == "meta"  # really offloaded
    assert execution_device(spread.model.layers[1]) == torch.device("cpu")  # where its memory keys are computed
    assert torch.equal(spread.memory_embeddings.bos_embedding, single.memory_embeddings.bos_embedding)
    assert_same_reads_and_injects(single, spread)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device next to the CPU")
@torch.no_grad()
def test_layers_on_two_devices_read_and_inject_like_one_device(tmp_path):
    from memoryllm_hf import MemoryLlamaForCausalLM

    single = tiny_model(memory_update="input", fresh_pool="grow")
    single.save_pretrained(tmp_path)
    spread = MemoryLlamaForCausalLM.from_pretrained(tmp_path, device_map=split_device_map(single, "cuda:0")).eval()
    assert spread.model.layers[1].self_attn.k_proj.weight.device.type == "cuda"
    assert_same_reads_and_injects(single, spread)


# ---------------------------------------------------------------------- quiet loads
QUIET = """
import sys, torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from memoryllm_hf import MemoryLlamaForCausalLM
from memoryllm_hf.tiny import TINY, tiny_tokenizer
folder = sys.argv[1]
LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY.items() if k in LlamaConfig().to_dict()})).save_pretrained(
    folder + "/llama")
print("LOADS START", file=sys.stderr, flush=True)
model = MemoryLlamaForCausalLM.from_base(folder + "/llama", num_memory_tokens=16, num_update_tokens=4)
model.save_pretrained(folder + "/memory")
tiny_tokenizer().save_pretrained(folder + "/memory")
MemoryLlamaForCausalLM.from_base(folder + "/llama", num_memory_tokens=16, num_update_tokens=4)  # twice: no state left
for auto in (AutoModelForCausalLM, AutoModel):
    auto.from_pretrained(folder + "/memory")
AutoTokenizer.from_pretrained(folder + "/memory")
model.train()
model.activation_checkpointing_enable()
"""


def test_loading_prints_no_warning_the_package_causes(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-W", "always", "-c", QUIET, str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    after = result.stderr.split("LOADS START", 1)[1]
    lines = [line for line in after.splitlines() if line.strip() and "Writing model shards" not in line]
    assert lines == [], "\n".join(lines)


@pytest.mark.parametrize("branch", [None, "customer-b"])
def test_memory_push_to_a_missing_repo_says_to_push_the_model_first(tmp_path, branch):
    from memoryllm_hf.hub import hub_endpoint
    from memoryllm_hf.testing import LocalHub

    model = tiny_model()
    model.inject(torch.randint(3, 128, (20,)))
    with LocalHub() as server, hub_endpoint(server.url, cache_dir=tmp_path, token="hf_test"):
        with pytest.raises(ValueError, match="push the whole model once"):
            model.push_memory_to_hub("tester/missing", revision=branch, create_branch=branch is not None)


def test_convert_official_of_a_plain_llama_says_what_to_run(llama_folder, tmp_path, capsys):
    from memoryllm_hf.cli import main

    assert main(["convert", "--official", str(llama_folder), str(tmp_path / "out")]) == 1
    assert "without --official" in capsys.readouterr().err


def test_stats_of_one_injection_has_no_degenerate_bins(tmp_path, capsys):
    from memoryllm_hf.cli import main

    model = tiny_model(memory_update="input", fresh_pool="grow")
    model.inject(torch.randint(3, 128, (6,)))  # one injection: every slot age is 0
    model.save_pretrained(tmp_path)
    assert main(["stats", str(tmp_path), "--png", str(tmp_path / "norms.png")]) == 0
    out = capsys.readouterr().out
    assert "e-07" not in out and "(every value)" in out


def test_peft_example_default_data_is_in_the_repository():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "peft_finetune.py"
    spec = importlib.util.spec_from_file_location("peft_finetune", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.DEFAULT_DATA.is_file() and Path(__file__).parents[1] in example.DEFAULT_DATA.parents


@pytest.mark.parametrize("name", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_both_checkpointing_names_keep_the_memory_prefix(name):
    import warnings

    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name is deprecated by transformers itself
        getattr(model, name)()
    assert all(layer._can_checkpoint_with_cache for layer in model.model.layers)


@torch.no_grad()
def test_a_batch_continues_from_its_shared_prefix_cache(model):
    """Two rows share one copy of the memory prefix (SharedPrefixCache); continuing from that cache works too."""
    first = model.generate(torch.randint(3, 128, (2, 5)), max_new_tokens=3, **GREEDY)
    turn = torch.cat([first.sequences, torch.randint(3, 128, (2, 4))], dim=1)
    second = model.generate(turn, cache=first.cache, max_new_tokens=3, **GREEDY)
    assert_matches_recomputation(model, turn, second)
