"""Quickstart (offline): give SmolLM2-135M-Instruct a memory, inject invented facts, ask, save, reload.

    python examples/quickstart.py [--output outputs/quickstart-memory]

The steps, in library calls (see `memoryllm_hf/demo.py` for the full script):

    from memoryllm_hf import load
    model, tok = load("default", num_memory_tokens=1024, num_update_tokens=64)
    model.inject("Zorblat Quenn was born in the town of Velmora in the year 1962.", tokenizer=tok)
    ids = tok.apply_chat_template([{"role": "user", "content": "Where was Zorblat Quenn born?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    print(tok.decode(model.generate(**ids, max_new_tokens=24, do_sample=False)[0]))
    model.save_pretrained("folder"); tok.save_pretrained("folder")
    # later, anywhere with transformers: AutoModelForCausalLM.from_pretrained("folder", trust_remote_code=True)
"""

import sys

from memoryllm_hf.demo import main

if __name__ == "__main__":
    sys.exit(main())
