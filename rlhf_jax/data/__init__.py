"""Data layer: datasets → tokenized examples → fixed-shape, left-padded numpy batches.

    tok = load_tokenizer("byte")                       # or a folder, or a tokenizer object
    ds = preference_dataset("hh.jsonl.gz", tok, max_length=512, max_prompt_length=384,
                            on_bad_row="skip")         # format auto-detected
    train, held_out = split(ds, eval_fraction=0.1, seed=0)
    for batch in batches(train, max_responses=64, max_pairs=64, seed=0, num_epochs=1):
        ...  # batch["input_ids"]: int32[N, T], batch["chosen_idx"]: int32[P], ...

Modules: `records` (reading rows, bad-row policy), `tokenizer`, `formats` (row formats →
text), `examples` (tokenization, truncation, datasets, split; `encode_prompt_response` gives
the ids an RM scores, truncated as its data was), `batching` (batches, iteration, multi-host
slicing), `pretrain` (stage 0: raw text packed into fixed-length blocks, shuffled,
resumable). Keyword arguments match the config fields: path, format, max_length,
max_prompt_length, on_bad_row, eval_fraction, seed, batch_size, max_responses, max_pairs,
pair_weighting.
"""

from rlhf_jax.data.batching import batches, left_pad, num_batches, pack_groups, prompt_texts
from rlhf_jax.data.examples import (
    Dataset,
    PreferenceGroup,
    PromptExample,
    SFTExample,
    encode_prompt_response,
    preference_dataset,
    prompt_dataset,
    response_first_lengths,
    sft_dataset,
    split,
    truncation_lengths,
)
from rlhf_jax.data.formats import PREFERENCE_FORMATS, PROMPT_FORMATS, SFT_FORMATS, split_implicit_prompt
from rlhf_jax.data.pretrain import (
    BlockIterator,
    Documents,
    PackReport,
    PretrainBatches,
    document_tokens,
    load_documents,
    pack_blocks,
    pack_report,
    shuffle_blocks,
    split_documents,
    unigram_cross_entropy,
)
from rlhf_jax.data.records import BadRowError, LoadReport, Records, load_records
from rlhf_jax.data.tokenizer import DEFAULT_CHAT_TEMPLATE, byte_tokenizer, load_tokenizer

__all__ = [
    "BadRowError", "BlockIterator", "DEFAULT_CHAT_TEMPLATE", "Dataset", "Documents", "LoadReport",
    "PREFERENCE_FORMATS", "PROMPT_FORMATS", "PackReport", "PreferenceGroup", "PretrainBatches",
    "PromptExample", "Records", "SFTExample", "SFT_FORMATS", "batches", "byte_tokenizer",
    "document_tokens", "encode_prompt_response", "left_pad", "load_documents", "load_records", "load_tokenizer",
    "num_batches", "pack_blocks", "pack_groups", "pack_report", "preference_dataset", "prompt_dataset",
    "prompt_texts", "response_first_lengths", "sft_dataset", "shuffle_blocks", "split", "split_documents",
    "split_implicit_prompt", "truncation_lengths", "unigram_cross_entropy",
]
