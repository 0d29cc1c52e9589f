"""
A character-level tokenizer that transformers loads like any other (tokenizer.json + config, with a
chat template), for the toy world and the tests. Every printable ASCII character and the newline is
one token; <pad>, <eos> and <bos> are special.
"""
from __future__ import annotations

import string

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% else %}A: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A: <think>\n{% endif %}"
)
SPECIALS = ["<pad>", "<eos>", "<bos>"]


def build_char_tokenizer(out_dir=None, chars: str | None = None):
    """-> PreTrainedTokenizerFast (ids: <pad>=0, <eos>=1, <bos>=2, then the characters); saved if out_dir."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = chars or (string.printable[:-5] + "\n")   # printable ASCII without \t\r\x0b\x0c, plus newline
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": []})
    if out_dir is not None:
        from model import save_tokenizer
        save_tokenizer(tok, out_dir)
    return tok
