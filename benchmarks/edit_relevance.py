"""The "nothing relevant" cut on CounterFact edits, without the model: which prompts read a lone stored edit.

A memory holding one edit (its `edit_text`) is asked the edit's prompt, a paraphrase, and a neighbourhood prompt (the
same relation about another subject: reading the edit there is what costs specificity). For each scorer, the share
of each kind whose score reaches the cut is reported (n and a Wilson 95% interval) at the scorer's calibrated cut and
at candidate cuts. Prompts are the chat prompts the evaluation reads (`Prompter.completion`, kind "sentence"), scored
as the scorer parts score them: the user's words, whole and sentence by sentence (`user_queries`).

Run (a minute; the tokenizer, and the encoder if installed):
  python -m benchmarks.edit_relevance --limit 300 --json docs/results/edit_relevance.json
"""

import json

import torch
from tqdm import tqdm

from benchmarks.lexical_recall import read_jsonl, wilson
from benchmarks.likelihood_check import dev_parser
from memoryllm_hf.evaluation.prompts import Prompter
from memoryllm_hf.modeling import memory_lexical as lexical
from memoryllm_hf.modeling.memory_dense import encoder_installed, sentence_pieces
from memoryllm_hf.modeling.memory_scoring import RETRIEVAL_SCORERS

KINDS = ("prompt", "paraphrase", "neighbourhood")
CANDIDATES = {"bm25": (0.1, 0.15, 0.2), "bm25+encoder": (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7),
              "bm25+encoder+sentences": (0.9, 1.0, 1.1, 1.2, 1.3)}


def prompts_of(case: dict) -> dict[str, str]:
    return {"prompt": case["prompt"], "paraphrase": case["paraphrase_prompts"][0],
            "neighbourhood": case["neighborhood_prompts"][0]["prompt"]}


def main() -> None:
    args = dev_parser(__doc__, limit=300).parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from memoryllm_hf.default_model import smollm2_base_folder

    tokenizer = AutoTokenizer.from_pretrained(smollm2_base_folder())
    analyzer, markers = lexical.Analyzer(), lexical.chat_markers(tokenizer)
    prompter = Prompter(tokenizer, "chat", 8192)
    cases = read_jsonl(args.data_dir / "counterfact.jsonl")[: args.limit]
    encoder = None
    if encoder_installed():
        from memoryllm_hf.modeling.memory_dense import SentenceEncoder

        encoder = SentenceEncoder()
    scores = {name: {kind: [] for kind in KINDS} for name in CANDIDATES if name == "bm25" or encoder}
    for case in tqdm(cases, desc="edits", unit="edit"):
        index = lexical.LexicalIndex()
        index.add(0, analyzer.terms(case["edit_text"]))
        edit = encoder.encode([case["edit_text"]])[0] if encoder else None
        pieces = encoder.encode(sentence_pieces(case["edit_text"])) if encoder else None
        for kind, text in prompts_of(case).items():
            ids, _ = prompter.completion(text, "", "sentence")
            queries = lexical.user_queries(lexical.user_text(tokenizer.decode(ids), markers))
            relevance = max(float(index.scores(analyzer.terms(q), [0])[1][0]) for q in queries)
            scores["bm25"][kind].append(relevance)
            if encoder:
                cosine = float((encoder.encode(queries) @ edit).max())
                scores["bm25+encoder"][kind].append(relevance + cosine)
                best = float((encoder.encode(queries) @ pieces.T).max())
                scores["bm25+encoder+sentences"][kind].append(relevance + cosine + best)
    results = {}
    for name, by_kind in scores.items():
        entry = RETRIEVAL_SCORERS[name]
        calibrated = {entry.cut(True): " (with the gate)", entry.cut(False): " (calibrated)"}
        cuts = sorted({*calibrated, *CANDIDATES[name]})
        for cut in cuts:
            row = {}
            for kind, values in by_kind.items():
                passed = sum(v >= cut for v in values)
                row[kind] = {"read": passed / len(values), "read_ci95": wilson(passed, len(values)), "n": len(values)}
            label = calibrated.get(cut, "")  # (this benchmark reads scores only, without the subject gate)
            results[f"{name} cut {cut}{label}"] = row
            print(f"{name:13s} cut {cut:<5}{label:16s}", "  ".join(
                f"{kind} {row[kind]['read']:.3f} {row[kind]['read_ci95']}" for kind in KINDS))
    if args.json:
        args.json.write_text(json.dumps({"read_share": results, "meta": {"limit": args.limit,
                                                                          "encoder": bool(encoder)}}, indent=1))


if __name__ == "__main__":
    main()
