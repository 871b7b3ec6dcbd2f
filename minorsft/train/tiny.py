"""The built-in tiny default: a character-level tokenizer, a tiny Llama model and a
synthetic task set, all made locally (no network, no third-party data).

The tasks have exact answers, so accuracy can be measured by greedy generation, and a
plausible wrong answer makes a natural rejected response for DPO-style losses:

- ``add``: ``"7+5="`` -> ``"12"`` (wrong: off by one or two)
- ``rev``: ``"rev abc="`` -> ``"cba"`` (wrong: the input unchanged or rotated)
- ``up``:  ``"up abc="`` -> ``"ABC"`` (wrong: one letter left lower-case)

Three more, in the same style (the demo trains a base model on ``rev`` and ``up``, then
fine-tunes it on these; :data:`TASK_FAMILIES` names both families):

- ``low``:  ``"low ABC="`` -> ``"abc"`` (wrong: one letter left upper-case)
- ``rot``:  ``"rot abc="`` -> ``"bcd"`` (each letter shifted by one, ``z`` -> ``a``; wrong: one
  letter left unshifted)
- ``swap``: ``"swap abc="`` -> ``"bac"`` (the first two letters swapped; wrong: the input
  unchanged, or the last two swapped)
"""
from __future__ import annotations

import os
import random
import string

from minorsft.train.data import write_jsonl

# One token per character; role markers are special tokens.
_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " +-*=?:.,!'\"()\n"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

# Role markers, content, end-of-turn; the generation prompt is the assistant marker.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` built with the ``tokenizers`` library.

    Vocabulary: the special tokens, then one token per character of a fixed alphabet;
    other characters map to ``<unk>``. ``tokenizer(text)`` prepends ``<s>``; it has a
    chat template (role markers + ``</s>`` after each turn). Saved and reloaded with
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any HF tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, max_positions: int = 256):
    """A ``LlamaConfig`` for a model of about 0.1M parameters (untied lm_head)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_tiny_model(tokenizer=None, *, seed: int = 0, **config_kwargs):
    """A freshly initialised tiny ``LlamaForCausalLM`` (fp32, deterministic for a seed).

    Returns ``(model, tokenizer)``; the tokenizer is built when not given.
    """
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    config = tiny_config(len(tokenizer), **config_kwargs)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    return model, tokenizer


def save_tiny_model(directory: str, *, seed: int = 0, **config_kwargs) -> str:
    """Build the tiny model + tokenizer and save both in Hugging Face format to ``directory``."""
    model, tokenizer = build_tiny_model(seed=seed, **config_kwargs)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------- synthetic tasks

def _task_add(rng: random.Random):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    answer = a + b
    wrong = answer + rng.choice([-2, -1, 1, 2])
    wrong = wrong if wrong >= 0 else answer + 1
    return f"{a}+{b}=", str(answer), str(wrong)


def _word(rng: random.Random, lo: int = 3, hi: int = 3) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _task_rev(rng: random.Random):
    w = _word(rng)
    while w == w[::-1]:
        w = _word(rng)
    wrong = w if rng.random() < 0.5 else w[1:] + w[0]
    if wrong == w[::-1]:
        wrong = w
    return f"rev {w}=", w[::-1], wrong


def _task_up(rng: random.Random):
    w = _word(rng)
    k = rng.randrange(len(w))
    wrong = w.upper()[:k] + w[k] + w.upper()[k + 1:]
    return f"up {w}=", w.upper(), wrong


def _task_low(rng: random.Random):
    w = _word(rng).upper()
    k = rng.randrange(len(w))
    wrong = w.lower()[:k] + w[k] + w.lower()[k + 1:]
    return f"low {w}=", w.lower(), wrong


def _task_rot(rng: random.Random):
    w = _word(rng)
    answer = "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("a")) for c in w)
    k = rng.randrange(len(w))
    return f"rot {w}=", answer, answer[:k] + w[k] + answer[k + 1:]


def _task_swap(rng: random.Random):
    w = _word(rng)
    while w[0] == w[1]:
        w = _word(rng)
    wrong = w if rng.random() < 0.5 else w[0] + w[2] + w[1]
    return f"swap {w}=", w[1] + w[0] + w[2:], wrong


TASKS = {"add": _task_add, "rev": _task_rev, "up": _task_up,
         "low": _task_low, "rot": _task_rot, "swap": _task_swap}
# The demo's two families: a base model learns "A", then is fine-tuned on "B". Their
# answers are all three characters. `add` is left out of "A": a held-out sum (a digit
# pair never seen in training) has to be memorised, not worked out by a rule, and the
# tiny model's held-out exact match on it stayed under one half while `rev` and `up`
# reached 1.0.
TASK_FAMILIES = {"A": ("rev", "up"), "B": ("low", "rot", "swap")}


def synthetic_rows(n: int, *, seed: int = 0, tasks=("add", "rev", "up")):
    """``n`` rows ``{"prompt", "response", "chosen", "rejected", "task"}``; deterministic in ``seed``."""
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"tasks: unknown task {t!r}; choose from {sorted(TASKS)}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        prompt, answer, wrong = TASKS[task](rng)
        rows.append({"prompt": prompt, "response": answer, "chosen": answer, "rejected": wrong,
                     "task": task})
    return rows


def write_synthetic_dataset(directory: str, *, n_train: int = 600, n_eval: int = 60, seed: int = 0,
                            tasks=("add", "rev", "up")) -> dict:
    """Write ``train.jsonl`` / ``eval.jsonl`` (prompt/response/chosen/rejected rows) and
    ``train_chat.jsonl`` (the same rows as chat ``messages``) to ``directory``.

    Train and eval prompts are disjoint. Returns a dict of the written paths.
    """
    rows = synthetic_rows(n_train + 4 * n_eval, seed=seed, tasks=tasks)
    seen, train, evals = set(), [], []
    for r in reversed(rows):  # eval from the tail first, so train never sees an eval prompt
        if len(evals) < n_eval and r["prompt"] not in seen:
            evals.append(r)
            seen.add(r["prompt"])
    for r in rows:
        if len(train) < n_train and r["prompt"] not in seen:
            train.append(r)
    chat = [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["response"]}]} for r in train]
    return {
        "train": write_jsonl(os.path.join(directory, "train.jsonl"), train),
        "eval": write_jsonl(os.path.join(directory, "eval.jsonl"), evals[::-1]),
        "train_chat": write_jsonl(os.path.join(directory, "train_chat.jsonl"), chat),
    }
