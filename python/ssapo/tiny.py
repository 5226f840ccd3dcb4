"""Tiny models and tokenizers built locally, for the `tiny` preset, the offline
benchmark and the tests. Nothing here touches a model hub.

    tok = build_tokenizer(["a", "b", "c"])
    model = tiny_llama(tok, seed=0)            # 2 layers, hidden 64
    save_pretrained(model, tok, "runs/sft")    # safetensors + tokenizer files
    args = tiny_args(SSAPOConfig, "out", max_steps=4)   # a tiny CPU run's trainer arguments

The tokenizer is word-level over a fixed vocabulary (whitespace split) with
special tokens <pad>, <unk>, <s>, </s> and a one-line chat template, so that
trl's prompt/chosen/rejected handling works on both plain strings and chat
message lists.
"""

from __future__ import annotations

import os
from typing import Iterable

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<user>", "<assistant>"]

# One turn: "<user> words <assistant> words </s>"; the generation prompt ends at
# "<assistant>". Plain enough for a word-level vocabulary.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<user> {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}<assistant> {{ m['content'] }} </s> "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def build_tokenizer(words: Iterable[str], model_max_length: int = 256):
    """A word-level `PreTrainedTokenizerFast` over `words` plus the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for w in words:
        if w not in vocab:
            vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=model_max_length,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_llama(
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    seed: int = 0,
):
    """A randomly initialised LlamaForCausalLM sized for CPU tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_pretrained(model, tokenizer, path: str | os.PathLike) -> str:
    """Writes model (safetensors) and tokenizer to `path` atomically: into a
    sibling temp directory first, then renamed into place."""
    import shutil
    import tempfile

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def tiny_args(cls, output_dir, **overrides):
    """The trainer arguments of a tiny run on CPU, as the tests and benches build them: `cls` (ssapo's
    SSAPOConfig or trl's DPOConfig) with a micro-batch of 2, fp32 on the CPU, no reports, a log line per
    step, no saving, beta 0.1, seeded (seed and data_seed 0), no progress bars; `overrides` win."""
    base = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        beta=0.1,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    return cls(**{**base, **overrides})
