"""Stage 0: generative pretraining on raw text (default: the tiny Shakespeare corpus in ../shared/data).

    python -m rlhf_jax.main --config configs/pretrain.py --workdir runs/pretrain
    python -m rlhf_jax.main --config configs/pretrain.py:smollm2 --workdir runs/pretrain_smollm2

The text (a .txt file or folder, JSONL/parquet with a `data.text_field` column, or a saved
`datasets` folder) is tokenised, joined with EOS between documents, cut into blocks of
`data.max_length` tokens and shuffled by a seeded buffer; the held-out split is by document
(one single file: its last `data.eval_fraction` of lines). Every token but a block's first is
a target. The summary holds eval/perplexity and the unigram baseline eval/unigram_perplexity.

Variants (after the colon): `tiny` (default: a small byte-level Llama from scratch) and
`smollm2` (continued pretraining of SmolLM2-135M-Instruct from its GGUF file, top layers only).
"""

from pathlib import Path

from rlhf_jax.config_lib import load_config, parse_arg

VARIANTS = ("tiny", "smollm2")


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny")
    if arg.variant not in VARIANTS:
        raise ValueError(f"configs/pretrain.py: unknown variant {arg.variant!r} ({', '.join(VARIANTS)})")
    c = load_config(Path(__file__).resolve().parent / "common.py")
    c.stage = "pretrain"
    c.tokenizer = "byte"
    c.model.tiny.update(dict(hidden_size=96, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=24, mlp_dim=256))
    c.data.path = "../shared/data/tinyshakespeare.txt"
    c.data.text_field = "text"  # the column of row-based files
    c.data.doc_separator = ""  # text files: '' = one document per file, e.g. '\n\n' splits paragraphs
    c.data.shuffle_buffer = 10_000  # blocks
    c.data.max_length = 128
    c.data.eval_fraction = 0.05
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.final_lr_fraction = 0.1
    c.optimizer.weight_decay = 0.01
    c.train.batch_size = 32
    c.train.num_steps = 300  # 0 = train.num_epochs over the training blocks
    c.train.eval_every = 100
    c.train.eval_batches = 0
    c.train.log_every = 20
    c.train.checkpoint_every = 100
    if arg.variant == "smollm2":
        c.model.init = "gguf"
        c.tokenizer = ""
        c.data.max_length = 128
        c.optimizer.lr = 2e-5
        c.optimizer.warmup_steps = 5
        c.optimizer.weight_decay = 0.0
        c.train.batch_size = 8
        c.train.num_steps = 40
        c.train.eval_every = 20
        c.train.eval_batches = 8
        c.train.log_every = 5
        c.train.checkpoint_every = 20
        c.train.trainable = r"layers\.(2[6-9])\."  # the top 4 of 30 layers: practical on 2 CPU cores
    return c
