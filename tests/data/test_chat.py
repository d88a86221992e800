"""Label masking: loss only on the answer, and the end-of-turn token is learned."""

import torch

from loralab.data.chat import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    collate,
    encode_chat,
    ensure_chat_template,
    left_pad,
    prompt_ids,
)

QA = [{"role": "user", "content": "What does BID mean?"}, {"role": "assistant", "content": "twice a day"}]


def _labelled_text(tokenizer, example):
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_only_the_answer_and_its_end_token_are_labelled(smol_tokenizer):
    example = encode_chat(smol_tokenizer, QA, max_length=256)
    assert _labelled_text(smol_tokenizer, example) == "twice a day<|im_end|>\n"
    end_id = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_id == smol_tokenizer.pad_token_id  # the pitfall: SmolLM2 pads with its end token
    assert end_id in [t for t in example.labels if t != IGNORE_INDEX]
    # The prompt is exactly what a user sends through the tokenizer's own chat template.
    n_prompt = example.labels.index(next(t for t in example.labels if t != IGNORE_INDEX))
    assert example.input_ids[:n_prompt] == prompt_ids(smol_tokenizer, QA)
    assert "You are a helpful AI assistant named SmolLM" in smol_tokenizer.decode(example.input_ids[:n_prompt])


def test_padding_is_masked_by_position_not_by_token_id(smol_tokenizer):
    short = encode_chat(smol_tokenizer, QA, 256)
    long = encode_chat(smol_tokenizer, [QA[0], {"role": "assistant", "content": "twice a day, also written b.i.d."}], 256)
    batch = collate([short, long], smol_tokenizer.pad_token_id)
    row = batch["labels"][0]
    n = len(short.input_ids)
    assert row[n:].eq(IGNORE_INDEX).all() and batch["attention_mask"][0, n:].eq(0).all()
    # The end-of-turn token inside the answer keeps its label even though it equals the pad id.
    assert (row[:n] == smol_tokenizer.pad_token_id).sum() == 1


def test_multi_turn_labels_every_assistant_turn(smol_tokenizer):
    chat = [
        {"role": "system", "content": "Be brief."},
        QA[0],
        QA[1],
        {"role": "user", "content": "And TID?"},
        {"role": "assistant", "content": "three times a day"},
    ]
    example = encode_chat(smol_tokenizer, chat, 512)
    text = _labelled_text(smol_tokenizer, example)
    assert text == "twice a day<|im_end|>\nthree times a day<|im_end|>\n"
    assert "Be brief." not in text and "And TID?" not in text


def test_too_long_examples_are_left_out_rather_than_cut_before_their_end_token(smol_tokenizer):
    full = encode_chat(smol_tokenizer, QA, 256)
    assert encode_chat(smol_tokenizer, QA, len(full.input_ids)) == full
    assert encode_chat(smol_tokenizer, QA, len(full.input_ids) - 1) is None


def test_fallback_template_for_tokenizers_without_one(smol_tokenizer):
    import copy

    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = None
    ensure_chat_template(tokenizer)
    assert tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE
    example = encode_chat(tokenizer, QA, 256)
    assert _labelled_text(tokenizer, example) == "twice a day" + tokenizer.eos_token + "\n\n"


def test_left_pad_aligns_prompts_right():
    batch = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["input_ids"].dtype == torch.long
