"""
data.py -- datasets, prompt formats and answer grading shared by every stage.

  * TRAIN_SETS: Tina's training sets by name (hub id, split, question / answer columns). Any local
    .jsonl / .json / .parquet path works in place of a name (load_examples).
  * SYSTEM_PROMPTS: the recipes' exact system prompts (open-r1's R1 style; open-rs's \\boxed{} variant).
  * format_prompt: chat formatting through the tokenizer's template, with a plain fallback.
  * grade(completion, gold, mode): math-verify grading, 1.0 / 0.0, or None when the gold answer cannot
    be parsed (such examples are counted and skipped, never scored as correct).
      mode="reward": exactly Tina's accuracy reward (gold parsed first-match; the completion parsed with
                     boxed answers first, malformed LaTeX operators refused, on purpose).
      mode="eval":   lighteval's extractive match used for the papers' benchmark numbers (expression and
                     LaTeX targets, boxed first, lenient normalisation, 5-digit float rounding).

Gold answers are normalised before parsing, as Tina's preprocessing does: a bare answer is wrapped in
$...$; in addition (our fix) escaped dollars such as `\\$36` are dropped, a gold that is a whole worked
solution is reduced to its last \\boxed{...}, and a GSM8K answer to the number after '####'.
"""
from __future__ import annotations

import inspect
import json
import logging
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from latex2sympy2_extended import NormalizationConfig
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# the recipes' system prompts, verbatim (Tina: tina/utils/prompt.py)
SYSTEM_PROMPTS = {
    "open_r1": (
        "\nYou are a helpful AI Assistant that provides well-reasoned and detailed responses.\n"
        "You first think about the reasoning process as an internal monologue and then provide the user "
        "with the answer.\nRespond in the following format: <think>\n...\n</think>\n<answer>\n...\n</answer>\n"
    ),
    "open_rs": (
        "\nA conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
        "The assistant first thinks about the reasoning process in the mind and then provides the user with "
        "the answer, and put your final answer within \\boxed{{}} .\n"
        "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
        "respectively, \ni.e., <think> reasoning process here </think> <answer> answer here </answer>.\n"
        "Note that respond by English, NOT use other languages.\n"
    ),
    # Resa's SAE trigger / elicitation text (resa/utils/prompt.py, "borrowed from deepseek r1")
    "resa": (
        "\nA conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
        "The assistant first thinks about the reasoning process in the mind and then provides the user\n"
        "with the answer. The reasoning process and answer are enclosed within <think> </think> and\n"
        "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think>\n"
        "<answer> answer here </answer>.\n"
    ),
    "none": "",
}

def system_prompt_for(choice: str, dataset: str) -> str:
    """--system_prompt: auto (the dataset's recipe prompt; open_r1 for local files), a name, or literal text."""
    if choice == "auto":
        spec = TRAIN_SETS.get(dataset)
        return SYSTEM_PROMPTS[spec.system_prompt if spec else "open_r1"]
    return SYSTEM_PROMPTS.get(choice, choice)


QUESTION_FIELDS = ("problem", "question", "prompt", "context")
ANSWER_FIELDS = ("answer", "final_answer", "solution")   # short answers before worked solutions


@dataclass(frozen=True)
class DatasetSpec:
    hub: str
    question: str = "problem"
    answer: str = "answer"
    config: str | None = None
    split: str = "train"
    system_prompt: str = "open_r1"   # Tina uses the open-rs prompt for the open-rs sets, open-r1's otherwise
    note: str = ""


TRAIN_SETS = {
    "still": DatasetSpec("RUC-AIBOX/STILL-3-Preview-RL-Data", question="question"),
    "deepscaler": DatasetSpec("agentica-org/DeepScaleR-Preview-Dataset"),
    # Tina grades against `solution` where a set has one (tina/post_train_hf/grpo.py renames `answer` to
    # `solution` only when `solution` is missing), and uses the open-rs prompt only for hub ids containing
    # "open-rs": knoveleng/open-s1 gets open-r1's
    "open_rs": DatasetSpec("knoveleng/open-rs", answer="solution", system_prompt="open_rs"),
    "open_s1": DatasetSpec("knoveleng/open-s1", answer="solution"),
    "limr": DatasetSpec("GAIR/LIMR", question="prompt"),
    "open_r1": DatasetSpec("open-r1/OpenR1-Math-220k", config="default"),
    "2thought": DatasetSpec("Intelligent-Internet/II-Thought-RL-v0-Math-50K", question="messages",
                            answer="verification_info", note="question in messages[0]; answer in a JSON field"),
    "thoughts": DatasetSpec("bethgelab/CuratedThoughts", config="OpenThoughts-114k-math-default",
                            answer="ground_truth_solution"),
    "gsm8k": DatasetSpec("openai/gsm8k", question="question", config="main"),
}
# the recipe names used by the Tina paper for the same sets
TRAIN_SETS.update(open_rs1=TRAIN_SETS["open_s1"], open_rs2=TRAIN_SETS["open_rs"], open_rs3=TRAIN_SETS["open_rs"])


# the papers' benchmarks: hub source, split and fields (local copies: ../shared/data/eval, see its README)
BENCHMARKS = {
    "aime24": DatasetSpec("HuggingFaceH4/aime_2024", question="problem", note="aime24.jsonl"),
    "aime25": DatasetSpec("yentinglin/aime_2025", question="problem", note="aime25.jsonl"),
    "amc23": DatasetSpec("knoveleng/AMC-23", question="problem", note="amc23.jsonl"),
    "math_500": DatasetSpec("HuggingFaceH4/MATH-500", question="problem", split="test", note="math500.jsonl"),
    "minerva": DatasetSpec("knoveleng/Minerva-Math", question="problem", note="minerva.json"),
    "olympiadbench": DatasetSpec("knoveleng/OlympiadBench", question="question", answer="final_answer",
                                 note="olympiadbench.jsonl"),
    "gsm8k": DatasetSpec("openai/gsm8k", question="question", config="main", split="test", note="gsm8k_test.jsonl"),
    "gpqa_diamond": DatasetSpec("Idavidrein/gpqa", question="Question", answer="Correct Answer", config="gpqa_diamond",
                                note="gated on the hub: log in with a token that has accepted its terms"),
}
# Qwen's copy of AIME25 appends its own instruction to each problem; the papers' prompt replaces it
_QUESTION_SUFFIXES = ("\nPlease reason step by step, and put your final answer within \\boxed{}.",)


@dataclass
class Example:
    question: str
    answer: str               # normalised gold answer text (what grade() parses)
    index: int
    raw: dict = field(default_factory=dict, repr=False)


# -----------------------------------------------------------------------------------------------
# Loading


def _read_local(path: Path) -> list[dict]:
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix == ".jsonl":
        rows = []
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{n} is not UTF-8 text ({e.reason} at byte {e.start}): re-save the file "
                                     "as UTF-8") from None
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n} is not valid JSON: {e}") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}:{n} is a JSON {type(row).__name__}, not one record per line "
                                         "({\"problem\": ..., \"answer\": ...}); a JSON list belongs in a .json file")
                    rows.append(row)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): re-save it as UTF-8") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if isinstance(data, dict):   # {"data": [...]} or a dict of columns
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
                return lists[0]
            if lists and all(len(v) == len(lists[0]) for v in lists):
                return [dict(zip(data, vals)) for vals in zip(*data.values())]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")


def _read_hub(spec: DatasetSpec) -> list[dict]:
    from datasets import load_dataset
    ds = load_dataset(spec.hub, spec.config, split=spec.split)
    return ds.to_list()


def load_texts(name_or_path: str, field: str = "text", max_chars: int = 0) -> tuple[list[str], dict]:
    """A plain-text corpus (Resa's SAE pre-training: sparsify on EleutherAI/SmolLM2-135M-10B) -> (texts, stats):
    the `field` column of a local file, or of a hub dataset streamed until max_chars characters (0 = all).
    Empty or missing texts are skipped and counted."""
    path = Path(name_or_path)
    if path.exists():
        rows, source = _read_local(path), str(path)
    elif "/" in name_or_path:
        from datasets import load_dataset
        rows, source, n = [], name_or_path, 0
        for r in load_dataset(name_or_path, split="train", streaming=True):
            rows.append(r)
            n += len(str(r.get(field) or ""))
            if max_chars and n >= max_chars:
                break
    else:
        raise ValueError(f"unknown corpus {name_or_path!r}: not a file and not a hub dataset id (owner/name)")
    if not rows:
        raise ValueError(f"{source}: no records")
    if field not in rows[0]:
        raise ValueError(f"{source}: no text field {field!r}; the records have fields {list(rows[0])}. "
                         "Pass --question_field NAME (the text column with --text_format plain).")
    texts = [str(r.get(field) or "") for r in rows]
    kept = [t for t in texts if t.strip()]
    if len(kept) < len(texts):
        print(f"{source}: skipped {len(texts) - len(kept)} of {len(texts)} records with an empty {field!r}")
    return kept, {"source": source, "records": len(texts), "examples": len(kept),
                  "skipped": len(texts) - len(kept), "text_field": field}


def _pick(rows: list[dict], wanted: str | None, defaults, kind: str, source: str) -> str:
    cols = list(rows[0].keys()) if rows else []
    for name in ([wanted] if wanted else []) + [d for d in defaults if d != wanted]:
        if name in cols:
            if wanted and name != wanted and wanted not in cols:
                logging.warning(f"{source}: no {kind} field {wanted!r}; using {name!r}")
            return name
    raise ValueError(f"{source}: no usable {kind} field (tried {[wanted] if wanted else []} + {list(defaults)}); "
                     f"the records have fields {cols}. Pass --{kind}_field NAME.")


def load_examples(name_or_path: str, question_field: str | None = None, answer_field: str | None = None,
                  limit: int | None = None) -> tuple[list[Example], dict]:
    """A registry name or a local file -> (examples, stats). Records whose gold answer is empty or
    missing are skipped and counted in stats["skipped"]; nothing is silently dropped."""
    path = Path(name_or_path)
    if path.exists():
        rows, source = _read_local(path), str(path)
        spec = None
    elif name_or_path in TRAIN_SETS:
        spec = TRAIN_SETS[name_or_path]
        rows, source = _read_hub(spec), spec.hub
    else:
        raise ValueError(f"unknown dataset {name_or_path!r}: not a file, and not one of {', '.join(TRAIN_SETS)}")
    if not rows:
        raise ValueError(f"{source}: no records")
    qf = _pick(rows, question_field or (spec.question if spec else None), QUESTION_FIELDS, "question", source)
    af = _pick(rows, answer_field or (spec.answer if spec else None), ANSWER_FIELDS, "answer", source)
    return _to_examples(rows, qf, af, source, limit)


def _to_examples(rows: list[dict], qf: str, af: str, source: str, limit: int | None):
    """Records -> Examples; records without a question or a gold answer are skipped and counted."""
    examples, skipped = [], 0
    for i, r in enumerate(rows):
        q, a = question_text(r.get(qf)), gold_text(r.get(af))
        if not q or not a:
            skipped += 1
            continue
        examples.append(Example(q, a, i, r))
        if limit and len(examples) >= limit:
            break
    if skipped:
        print(f"{source}: skipped {skipped} of {len(rows)} records without a {qf!r} question or an {af!r} answer")
    return examples, {"source": source, "records": len(rows), "examples": len(examples), "skipped": skipped,
                      "question_field": qf, "answer_field": af}


def load_benchmark(name: str, local_dir: str | None = None, limit: int | None = None, seed: int = 0):
    """A benchmark by name -> (examples, stats), from local_dir (a folder holding the files named in
    BENCHMARKS) when given, else from the hub; the same field mapping either way. GPQA examples get
    four shuffled choices (seeded) in the question and the correct letter as the answer."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    local = Path(local_dir) / spec.note if local_dir and spec.note.endswith((".json", ".jsonl")) else None
    if local_dir and (local is None or not local.exists()):
        raise FileNotFoundError(f"{name}: no local copy {spec.note!r} in {local_dir}")
    rows, source = (_read_local(local), str(local)) if local else (_read_hub(spec), spec.hub)
    if name == "gpqa_diamond":
        rng = random.Random(seed)
        examples = []
        for i, r in enumerate(rows[:limit] if limit else rows):
            choices = [r["Correct Answer"]] + [r[f"Incorrect Answer {j}"] for j in (1, 2, 3)]
            choices = [c.strip() for c in choices]
            order = rng.sample(range(4), 4)
            letters = "ABCD"
            q = r["Question"].strip() + "\n\n" + "\n".join(f"{letters[k]}) {choices[o]}" for k, o in enumerate(order))
            examples.append(Example(q, letters[order.index(0)], i, r))
        return examples, {"source": source, "records": len(rows), "examples": len(examples), "skipped": 0}
    qf = _pick(rows, spec.question, QUESTION_FIELDS, "question", source)
    af = _pick(rows, spec.answer, ANSWER_FIELDS, "answer", source)
    return _to_examples(rows, qf, af, source, limit)


def question_text(q) -> str:
    if isinstance(q, list):   # chat messages: the first user turn
        users = [m.get("content", "") for m in q if isinstance(m, dict) and m.get("role", "user") == "user"]
        q = users[0] if users else ""
    if q is None or isinstance(q, (bool, dict, list)):   # not a text: skipped and counted, never its Python repr
        return ""
    q = str(q).strip()
    for suffix in _QUESTION_SUFFIXES:
        q = q[:-len(suffix)].rstrip() if q.endswith(suffix) else q
    return q


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in text, braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def gold_text(a) -> str:
    """Normalise a gold answer field to a short answer string (before $-wrapping)."""
    if a is None or isinstance(a, bool):    # True is no answer (math-verify would read E*r*t*u): skipped
        return ""
    if isinstance(a, list):          # Minerva / OlympiadBench keep answers in lists: use the first
        return gold_text(a[0]) if a else ""
    if isinstance(a, dict):
        return gold_text(a.get("value", a.get("answer")))
    if not isinstance(a, (str, int, float)):
        return ""
    if isinstance(a, float) and a.is_integer():
        a = int(a)                   # AMC stores 27.0
    a = str(a).strip()
    if a.startswith("{") and a.endswith("}"):
        try:                         # 2thought: {"answer": {"value": "..."}, ...}
            obj = json.loads(a)
            return gold_text(obj.get("answer", obj))
        except (json.JSONDecodeError, AttributeError):
            pass
    if "####" in a:                  # GSM8K: reasoning, then '#### N'
        a = a.rsplit("####", 1)[1].strip().replace(",", "")
    elif "\\boxed" in a and len(a) > 40:   # a worked solution: keep its final boxed answer
        a = last_boxed(a) or a
    return a


# -----------------------------------------------------------------------------------------------
# Prompts

# the evaluation prompts of lighteval / open-r1, which both papers used for their benchmark numbers
EVAL_TEMPLATES = {
    "math": ("Solve the following math problem efficiently and clearly.  The last line of your response should "
             "be of the following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' "
             "(without quotes) where ANSWER is just the final number or expression that solves the problem. "
             "Think step by step before answering.\n\n{question}"),
    "gpqa": ("Answer the following multiple choice question. The last line of your response should be of the "
             "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by "
             "step before answering.\n\n{question}"),
    "none": "{question}",
}


def apply_template(template: str, question: str) -> str:
    return EVAL_TEMPLATES[template].replace("{question}", question)


def format_prompt(tokenizer, question: str, system_prompt: str = "", template: str = "auto") -> str:
    """Chat-formatted prompt text ending where the assistant's reply starts. template "tina": Tina's own chat
    template (tina/utils/chat_template.py, REASON_CHAT_TEMPLATE), which is R1-Distill's with a generation
    prompt that ends at the assistant tag: the '<think>\\n' that R1-Distill's template opens is left to the
    model, so the completion holds both think tags (what Tina's format and tag_count rewards read)."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
               [{"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text.removesuffix("<think>\n") if template == "tina" else text
    head = f"{system_prompt.strip()}\n\n" if system_prompt else ""
    return f"{head}User: {question}\nAssistant:"


def trace_free_text(question: str, answer: str, system_prompt: str) -> tuple[str, str]:
    """Resa's trigger / elicitation text, split into (prefix, assistant part): the answer stands in for the
    missing reasoning trace. prefix + assistant = system prompt + "User:\\n {q}\\n\\nAssistant:\\n <think> ..."."""
    return (f"{system_prompt}User:\n {question}\n\nAssistant:\n",
            f" <think> {answer} </think>\n<answer> Answer: {answer}</answer>")


def resa_sft_text(tokenizer, question: str, answer: str) -> tuple[str, str]:
    """Resa's SFT baseline text (resa/post_train_hf/preprocess.py, make_conv_for_sft with trace_free): the
    question as the user turn and "think: \\n{answer}\\n answer: {answer}" as the assistant turn, through the
    tokenizer's chat template, no system prompt. -> (prefix up to the assistant's reply, the rest)."""
    reply = f"think: \n{answer}\n answer: {answer}"
    full = tokenizer.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
                                         tokenize=False, add_generation_prompt=False)
    i = full.rfind(reply)                          # the assistant part starts where its content does
    return (full[:i], full[i:]) if i >= 0 else ("", full)


def chat_trace_free_text(tokenizer, question: str, answer: str, system_prompt: str) -> tuple[str, str]:
    """Resa's trace-free text in the model's own chat format: the prompt exactly as at inference (so the
    token that decides between reasoning and guessing sits where it does when the model answers), then the
    answer standing in for the trace inside the think block, then the answer."""
    prefix = format_prompt(tokenizer, question, system_prompt)
    opened = "" if prefix.endswith("<think>\n") else "<think>\n"
    return prefix, f"{opened}{answer}\n</think>\n<answer>{answer}</answer>"


def text_pieces(tok, examples, text_format: str, system_prompt: str) -> list[tuple[str, str]]:
    """--text_format: resa (Resa's trigger / elicitation text, trace_free_text), chat (the same in the model's
    own chat format, chat_trace_free_text) or resa_sft (Resa's SFT baseline text, resa_sft_text)."""
    if text_format == "resa_sft":
        return [resa_sft_text(tok, e.question, e.answer) for e in examples]
    if text_format == "chat":
        return [chat_trace_free_text(tok, e.question, e.answer, system_prompt) for e in examples]
    return [trace_free_text(e.question, e.answer, system_prompt) for e in examples]


def pad_rows(tok, pieces: list[tuple[str, str]], ctx_len: int):
    """One example per row (no packing, as SFTTrainer with packing off): tokens cut at ctx_len, right-padded.
    -> ids [N, T] long, assistant_mask [N, T] bool, valid [N, T] bool (False on padding), T <= ctx_len."""
    rows, masks = [], []
    for prefix, assistant in pieces:
        p = tok(prefix, add_special_tokens=False).input_ids
        a = tok(assistant, add_special_tokens=False).input_ids
        rows.append((p + a)[:ctx_len])
        masks.append(([False] * len(p) + [True] * len(a))[:ctx_len])
    T = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    amask = torch.tensor([m + [False] * (T - len(m)) for m in masks])
    valid = torch.tensor([[True] * len(r) + [False] * (T - len(r)) for r in rows])
    return ids, amask, valid


def special_tokens_around(tok) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds around a text with add_special_tokens (R1-Distill: [BOS] before, none after)."""
    plain, full = tok("a", add_special_tokens=False).input_ids, tok("a").input_ids
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


def encode_piece(tok, prefix: str, assistant: str) -> tuple[list[int], list[bool]]:
    """prefix + assistant tokenised as one text (as the originals did), no special tokens. -> ids, and a mask
    True on the tokens that begin inside the assistant part (by character offsets; a slow tokenizer, without
    offsets, tokenises the two parts apart)."""
    if not getattr(tok, "is_fast", False):
        p, a = (tok(t, add_special_tokens=False).input_ids for t in (prefix, assistant))
        return p + a, [False] * len(p) + [True] * len(a)
    enc = tok(prefix + assistant, add_special_tokens=False, return_offsets_mapping=True)
    return enc.input_ids, [start >= len(prefix) and end > start for start, end in enc.offset_mapping]


TEXTS_PER_STREAM = 2048     # sparsify's chunk_and_tokenize: its map's batch of texts, one stream each
CHUNKING = {"method": "sparsify chunk_and_tokenize", "texts_per_stream": TEXTS_PER_STREAM,
            "stream_starts_with": "eos", "texts_joined_by": "eos",
            "chunk_starts_with": "the tokenizer's own special tokens (R1-Distill: BOS)",
            "stream_tail": "dropped"}     # what pack_chunks does, as the dry runs report it


def pack_chunks(tok, pieces: list[tuple[str, str]], ctx_len: int, texts_per_stream: int = TEXTS_PER_STREAM):
    """(prefix, assistant) texts -> fixed ctx_len chunks exactly as sparsify's chunk_and_tokenize (Resa's SAE
    training and SAE-Tuning data, resa/sae/sparsify/sparsify/data.py): every texts_per_stream texts (its map's
    batch of 2048) form one stream, EOS + text + EOS + text ... (the stream starts with EOS); the stream is cut
    into pieces of ctx_len minus the tokenizer's special tokens, and each chunk gets them back (R1-Distill: a
    BOS first in every chunk, the attention sink); the last piece of every stream is dropped, full or not. A set
    too small for one chunk gives one short chunk. -> ids [N, ctx_len] long, assistant_mask [N, ctx_len] bool."""
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to join texts with")
    before, after = special_tokens_around(tok)
    body = ctx_len - len(before) - len(after)
    if body < 1:
        raise ValueError(f"--ctx_len {ctx_len} leaves no room beside the tokenizer's {len(before) + len(after)} "
                         "special tokens")
    rows, masks, first = [], [], None
    for s in range(0, len(pieces), texts_per_stream):
        ids, mask = [], []
        for prefix, assistant in pieces[s:s + texts_per_stream]:
            i, m = encode_piece(tok, prefix, assistant)
            ids += [tok.eos_token_id] + i
            mask += [False] + m
        first = first or (ids, mask)
        for c in range(0, len(ids) - body, body):                # every full piece but the stream's last
            rows.append(before + ids[c:c + body] + after)
            masks.append([False] * len(before) + mask[c:c + body] + [False] * len(after))
    if not rows:                                                  # a tiny set: one short chunk
        if first is None:
            raise ValueError("no text to chunk")
        ids, mask = first
        return (torch.tensor([before + ids[:body] + after]),
                torch.tensor([[False] * len(before) + mask[:body] + [False] * len(after)]))
    return torch.tensor(rows), torch.tensor(masks)


# -----------------------------------------------------------------------------------------------
# Grading with math-verify

for _name in ("math_verify", "latex2sympy2_extended"):   # both log a warning per odd input
    logging.getLogger(_name).setLevel(logging.ERROR)


# math-verify renamed verify's precision to float_rounding after 0.5.2 (what Tina and Resa pinned); either works
_ROUNDING = "float_rounding" if "float_rounding" in inspect.signature(verify).parameters else "precision"


def _verify(gold, pred, rounding: int = 6) -> bool:
    return verify(gold, pred, **{_ROUNDING: rounding})


def _wrap_gold(gold: str) -> str:
    g = gold.strip().replace("\\$", "")          # "\$36" -> "36": escaped dollars are currency, not math
    if "$" in g or "\\boxed" in g or "\\(" in g or "\\[" in g:
        return g
    return f"${g}$"


@lru_cache(maxsize=1 << 16)
def _parse_gold(gold: str, mode: str):
    text = _wrap_gold(gold)
    if mode == "reward":                      # Tina's accuracy reward: default targets, first match
        parsed = parse(text, extraction_mode="first_match")
        return parsed if _usable(parsed) else []
    if mode == "reward_length":               # Tina's length and cosine rewards: LaTeX only, first match
        parsed = parse(text, extraction_config=[LatexExtractionConfig()], extraction_mode="first_match")
        return parsed if _usable(parsed) else []
    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    parsed = parse(text, extraction_config=cfg, extraction_mode="first_match")
    return parsed if _usable(parsed) else []


def _usable(parsed) -> bool:
    """math-verify returns [expr, text] for good input but just [text] for garbage: require an expr."""
    return any(not isinstance(x, str) for x in parsed)


@lru_cache(maxsize=None)
def _pred_config(mode: str) -> tuple:
    if mode in ("reward", "reward_length"):   # Tina's accuracy reward (boxed "all"), length / cosine (boxed True)
        return (LatexExtractionConfig(
            normalization_config=NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True,
                                                     equations=True, boxed="all" if mode == "reward" else True,
                                                     units=True),
            boxed_match_priority=0, try_extract_without_anchor=False),)
    return (ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0))   # lighteval


def _parse_pred(text: str, mode: str):
    return parse(text, extraction_config=list(_pred_config(mode)), extraction_mode="first_match")


def gold_parses(gold: str, mode: str = "eval") -> bool:
    return bool(_parse_gold(gold, mode))


GRADE_MODES = ("reward", "reward_length", "eval")


def grade(completion: str, gold: str, mode: str = "reward") -> float | None:
    """1.0 if the completion's final answer equals gold, 0.0 if not, None if gold cannot be parsed.
    reward: Tina's accuracy reward (tina/post_train_hf/rewards.py accuracy_reward); reward_length: the
    correctness inside its len_reward and cosine_scaled_reward (LaTeX-only gold, boxed=True, verify(answer,
    gold) in that order); eval: our evaluation's lighteval-style extraction."""
    if mode not in GRADE_MODES:
        raise ValueError(f"grading mode must be one of {', '.join(GRADE_MODES)}, not {mode!r}")
    g = _parse_gold(gold, mode)
    if not g:
        return None
    p = _parse_pred(completion, mode)
    if not p:
        return 0.0
    try:
        if mode == "reward_length":
            return float(_verify(p, g))
        return float(_verify(g, p, 5 if mode == "eval" else 6))
    except Exception:  # math-verify raises on pathological sympy input: the completion is wrong
        return 0.0


# lighteval as Tina and Resa ran it (ed084813 + their scripts/eval/run_eval_custom_tasks.py): the gold text and
# its extraction target per task; MATH-500 and Minerva are graded against the full reference `solution`
LIGHTEVAL_GOLD = {"math_500": ("solution", "latex"), "minerva": ("solution", "latex"),
                  "olympiadbench": ("answer", "latex"), "aime24": ("answer", "expr"), "aime25": ("answer", "expr"),
                  "amc23": ("answer", "expr")}


def lighteval_gold_text(benchmark: str, example: "Example") -> tuple[str, str]:
    """(gold text, "latex" | "expr") as lighteval's task took it; other sets: our gold, expression target."""
    column, kind = LIGHTEVAL_GOLD.get(benchmark, (None, "expr"))
    raw = example.raw.get(column) if column else None
    return (gold_text(raw) if raw not in (None, "") else example.answer), kind


def grade_lighteval(completion: str, gold: str, kind: str) -> tuple[str, float]:
    """lighteval's multilingual_extractive_match_metric as the papers configured it: gold parsed with the LaTeX
    (MATH-500, Minerva, OlympiadBench) or the expression target, the prediction with expression then boxed-first
    LaTeX, both with extraction_mode any_match (a later match is tried when one fails to parse) and fallback
    first_match; a gold nothing is extracted from is compared as its raw string (never left out); precision 5.
    -> (extracted answer, 1.0 or 0.0)."""
    gold_cfg = [LatexExtractionConfig()] if kind == "latex" else [ExprExtractionConfig()]
    golds = _lighteval_parse(gold, tuple(gold_cfg)) or [gold]
    preds = _lighteval_parse(completion, (ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0)))
    try:
        ok = bool(preds) and _verify(golds, preds, 5)
    except Exception:  # math-verify raises on pathological sympy input: the completion is wrong
        ok = False
    return (str(preds[-1]) if preds else ""), float(ok)      # (the last element is the matched text)


def _lighteval_parse(text: str, cfg: tuple):
    try:
        return parse(text, extraction_config=list(cfg), fallback_mode="first_match", extraction_mode="any_match")
    except Exception:     # sympy can recurse without end on odd input (RecursionError): nothing extracted
        return []


def extract_letter(completion: str) -> str:
    """The multiple-choice letter a completion chose, or '': the last one after the word answer ('Answer: C',
    '**Answer:** C', 'ANSWER - C', 'the answer is (C)'), else the last boxed one ('\\boxed{C}', '\\boxed{(C)}').
    A bare letter with no anchor is not read ('(A) is wrong, (C) is right')."""
    found = re.findall(r"(?i:answer)\s*(?:is)?\s*[:：\-–]?\s*(?:\*\*)?\s*\$?\(?\\?(?:boxed\{|text\{)?\s*\(?([ABCD])\b",
                       completion)
    found = found or re.findall(r"\\boxed\{\s*(?:\\text\{)?\s*\(?([ABCD])\b", completion)
    return found[-1] if found else ""


def extract_letter_lighteval(completion: str, letters: str = "ABCD") -> str:
    """The letter lighteval (ed084813) extracts for the papers' GPQA task (IndicesExtractionConfig with native
    letters, lighteval/metrics/utils/extractive_match_utils.py): its patterns from the most specific ('final
    answer is C. I hope', 'answer: ... C') to the least (a letter between spaces or punctuation, then any
    capital of the choices); the first pattern that matches anywhere decides, and of its matches the one that
    ends last. The last resort reads 'Answer: E' as A (the A of 'Answer'), as lighteval did. -> letter or ''."""
    i = f"(?P<i>[{re.escape(letters)}])"
    end = r"(?:\*\*)?(?:[.,:]| |$)"                                     # after the letter
    loose = rf"(?:^| )(?:\*\*)?{i}{end}"                                # a letter standing alone
    for pattern in (rf"(?i:final answer is):?\s*{i}\.?\s?I hope", rf"(?i:final answer.{{0,100}}?)\s+is:?\s*{i}",
                    rf"(?i:answer):.{{0,50}}?{loose}", rf"(?i:answer).{{0,50}}?{loose}", rf"^(?:\*\*)?{i}{end}",
                    loose, i):
        found = [(m.end(), -m.start(), m.group("i")) for m in re.finditer(pattern, completion)]
        if found:
            return max(found)[2]                                          # the match ending last
    return ""


def extract_answer(completion: str, mode: str = "eval") -> str:
    """The answer string grade() found in a completion ('' if none), for per-sample records."""
    p = _parse_pred(completion, mode)
    return str(p[-1]) if p else ""


def add_text_args(parser, kind: str):
    """The trace-free text flags of train_sae.py ("trigger") and sae_tune.py ("elicitation"): Resa's STILL
    set by default, its system prompt, fixed-length chunks."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="still", help=f"{kind} set: registry name or local file (%(default)s)")
    g.add_argument("--question_field", default=None, help="question column")
    g.add_argument("--answer_field", default=None, help="answer column")
    g.add_argument("--system_prompt", default="resa", help="resa (Resa's), open_r1, open_rs, none, or literal text")
    g.add_argument("--ctx_len", type=int, default=2048, help="tokens per chunk (%(default)s)")
    formats = ["resa", "chat", "resa_sft"] + (["plain"] if kind == "trigger" else [])
    g.add_argument("--text_format", default="resa", choices=formats,
                   help="resa: Resa's trace-free text (default); chat: the same in the model's own chat format; "
                   "resa_sft: Resa's SFT baseline text (chat template, 'think: ... answer: ...')" +
                   ("; plain: a plain-text corpus, its 'text' column (or --question_field) as is, for pre-training "
                    "an SAE as Resa's pretrain_sae.sh does (sparsify on EleutherAI/SmolLM2-135M-10B), then "
                    "--init_from it on the trigger set" if kind == "trigger" else ""))
    return g
