"""Tokenizers: a byte-level one for tiny models, local Hugging Face folders, or a given object.

Every tokenizer returned by `load_tokenizer` has `pad_token_id`, `eos_token_id` and a chat
template set, so the rest of the data layer never has to special-case a tokenizer.

Padding policy: a tokenizer without a pad token (GPT-2) gets a NEW dedicated token `<pad>`
(GPT-2: id 50257, so `len(tokenizer)` becomes 50258). Pad positions are never attended to,
never scored and never predicted, so the values in their embedding row do not matter, but
the model's embedding table must have at least `len(tokenizer)` rows (pad a pretrained
50257-row table with one row when loading GPT-2 weights). Reusing EOS as pad is possible by
asking for it explicitly (`pad_token="<|endoftext|>"`); every batch this package builds
carries an `attention_mask`, so that is safe here, but any code that finds padding by
comparing ids with `pad_token_id` would then also drop real EOS tokens — which is why it is
not the default.
"""

from __future__ import annotations

import logging
from typing import Any

import tokenizers
import transformers

_log = logging.getLogger(__name__)

# Used for the byte tokenizer and for any tokenizer that ships without a chat template
# (GPT-2). Each turn is `<|role|>\n{content}{eos}`; the generation prompt is
# `<|assistant|>\n`. Ending every turn with EOS means a policy trained on it stops at EOS,
# the one stop token the sampler knows about. No text after the EOS, so the rendered
# conversation is a prefix-stable concatenation of turns (needed to find assistant spans).
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)

BYTE_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    The `tokenizers` ByteLevel pre-tokenizer rewrites text into these characters; giving
    character `_bytes_to_unicode()[b]` the id `b` makes token id == byte value.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level tokenizer for tiny models: ids 0..255 are the bytes of the UTF-8 text.

    Special tokens follow the bytes: 256 `<pad>`, 257 `<bos>`, 258 `<eos>`, 259 `<|system|>`,
    260 `<|user|>`, 261 `<|assistant|>` (vocabulary size 262). Built with the `tokenizers`
    library (a BPE model without merges over the byte alphabet) and wrapped in
    `PreTrainedTokenizerFast`, so `save_pretrained` / `AutoTokenizer.from_pretrained` round
    trip, and it has the default chat template.
    """
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no GPT-2 word splitting, so every byte stays its own token and
    # spaces are never merged or dropped.
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in BYTE_SPECIAL_TOKENS])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=list(BYTE_SPECIAL_TOKENS[3:]),
        chat_template=DEFAULT_CHAT_TEMPLATE,
        model_max_length=1 << 30,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(spec: Any, *, pad_token: str = "<pad>") -> transformers.PreTrainedTokenizerBase:
    """Returns a tokenizer with pad, EOS and a chat template set.

    Args:
      spec: "byte" (see `byte_tokenizer`), a local directory or hub name for
        `transformers.AutoTokenizer.from_pretrained`, or a tokenizer object (passed through;
        it is completed in place if it lacks a pad token or a chat template).
      pad_token: the pad token to add when the tokenizer has none. The default adds a new,
        dedicated token; passing the EOS text reuses EOS (logged; see the module docstring).
    """
    if isinstance(spec, transformers.PreTrainedTokenizerBase):
        tok = spec
    elif isinstance(spec, str) and spec == "byte":
        return byte_tokenizer()
    elif isinstance(spec, (str,)) or hasattr(spec, "__fspath__"):
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(spec))
        except (OSError, ValueError) as e:
            raise ValueError(
                f"could not load a tokenizer from {str(spec)!r}: {e}. Pass 'byte', a local "
                "directory with tokenizer files (tokenizer.json, or vocab.json + merges.txt), "
                "or a tokenizer object."
            ) from None
    else:
        raise TypeError(f"tokenizer spec must be 'byte', a path or a tokenizer, got {type(spec).__name__}")

    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no EOS token; set tokenizer.eos_token")
    if tok.pad_token_id is None:
        if pad_token == tok.eos_token:
            _log.warning("tokenizer %r: pad token = EOS (%r); padding must be read from attention_mask",
                         tok.name_or_path, pad_token)
            tok.pad_token = pad_token
        else:
            tok.add_special_tokens({"pad_token": pad_token})
    if not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok
