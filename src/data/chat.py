"""Turning chats into training tensors: token ids plus labels on the assistant's words only.

Labels come from the chat template itself: for each assistant turn we render the conversation up
to that turn with and without the reply, and label exactly the tokens in between. That span ends
with the template's end-of-turn token (`<|im_end|>` for SmolLM2), so the model learns to stop.
A collator that masks every pad token would also mask `<|im_end|>` (SmolLM2 pads with it) and
teach the model never to end its answer; here padding is masked by position, never by token id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loralab.util.errors import LoralabError

IGNORE_INDEX = -100

# For tokenizers without a chat template (GPT-2 and other base models): a plain, readable format
# whose assistant turn ends with the EOS token, so generation stops.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Question:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Answer:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Answer:\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt a user would send: every turn before the final answer, plus the generation cue."""
    history = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    return _ids(tokenizer, history, add_generation_prompt=True)


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def encode_chat(tokenizer, messages: list[dict], max_length: int) -> EncodedExample | None:
    """Token ids and labels (assistant spans only, each ending with the template's end-of-turn).

    None when the conversation does not fit in max_length: cutting it would cut the final answer
    before its end-of-turn token and teach the model not to stop."""
    input_ids: list[int] = []
    labels: list[int] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _ids(tokenizer, messages[:index], add_generation_prompt=True)
        through = _ids(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if through[: len(before)] != before or before[: len(input_ids)] != input_ids:
            raise LoralabError(
                "the tokenizer's chat template does not render a conversation as a prefix of its continuation; "
                "cannot locate the answer tokens"
            )
        labels += [IGNORE_INDEX] * (len(before) - len(input_ids)) + through[len(before):]
        input_ids = through
    if len(input_ids) > max_length:
        return None
    example = EncodedExample(input_ids, labels)
    return example if example.n_label_tokens > 0 else None


def collate(examples: list[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked by position (attention 0, label -100), never by id."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def left_pad(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for batched generation (new tokens then line up on the right)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence):] = torch.tensor(sequence)
        attention[row, width - len(sequence):] = 1
    return {"input_ids": input_ids, "attention_mask": attention}
