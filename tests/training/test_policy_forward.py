"""`t2po.policy`: the micro-batch forward pass that runs the rows' shared beginning once gives the same
log-probs, entropies, critic values and gradients as the plain forward pass over whole rows."""

import dataclasses

import torch

from t2po.models import load_model
from t2po.policy import forward_micro_batch, make_micro_batch


def chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"]


def test_shared_beginning_once_equals_the_full_forward_pass(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)  # its own copy: the test computes gradients
    torch.manual_seed(0)
    value_head = torch.nn.Linear(model.config.hidden_size, 1)
    prompts = [chat(tokenizer, t) for t in ("Push the box up.", "hi", "Grid:\n#####\n#_@$#\n#####", "hi")]
    responses = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15]]
    mb = make_micro_batch([0, 1, 2, 3], prompts, responses, tokenizer.pad_token_id)
    assert mb.shared >= 16 and all(p[: mb.shared] == prompts[0][: mb.shared] for p in prompts)
    full = dataclasses.replace(mb, shared=0)
    assert mb.processed_tokens == full.processed_tokens - 3 * mb.shared
    assert mb.processed_tokens - mb.real_tokens == full.processed_tokens - full.real_tokens  # the same padding

    results = {}
    for name, batch in (("shared", mb), ("full", full)):
        model.zero_grad(set_to_none=True)
        value_head.zero_grad(set_to_none=True)
        out = forward_micro_batch(model, batch, with_entropy=True, value_head=value_head)
        (out["logp"].sum() + out["entropy"].sum() + out["values"].sum()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[name] = ({k: v.detach() for k, v in out.items()}, grads)
    (shared_out, shared_grads), (full_out, full_grads) = results["shared"], results["full"]
    for key in ("logp", "entropy", "values"):
        assert torch.allclose(shared_out[key], full_out[key], atol=1e-5), key
    assert (shared_out["logp"] != 0).sum() == sum(map(len, responses))  # every response token scored
    assert len(shared_grads) == len(full_grads) > 0
    for a, b in zip(shared_grads, full_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_rows_without_a_common_beginning_run_whole(tiny_model):
    _, tokenizer = tiny_model
    mb = make_micro_batch([0, 1], [[1, 2, 3] * 10, [4, 5, 6] * 10], [[7], [8]], tokenizer.pad_token_id)
    assert mb.shared == 0 and mb.processed_tokens == mb.input_ids.numel()
