"""The TRL baseline of benchmarks/train_throughput.py trains padding-free: TRL's collator flattens a
batch into one row with position ids restarting per example. That is a fair baseline only if
transformers then keeps each example's attention inside the example (a block-diagonal mask, built
from the position ids when there is no attention mask and no cache, which TRL's `use_cache=False`
ensures). Checked on a tiny random Llama: the packed row gives each example's own logits."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

trl = pytest.importorskip("trl")


def test_a_padding_free_batch_gives_each_example_its_own_logits():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    examples = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": e} for e in examples])
    assert batch["input_ids"].shape == (1, 13)  # one row, no padding
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([e])).logits[0] for e in examples])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
