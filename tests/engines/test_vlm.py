"""Vision-language policies on the tiny random Qwen2-VL (`build_tiny_vlm`): image prompts keep the
processor's exact ids and pixel inputs, the engine's log-probs match the model's own forward pass
(its M-RoPE positions) and the trainer's recomputation with the same pixels, LoRA lands on the
language model only, training on images changes the weights, and image mode with a text-only model
fails with a message naming the fix."""

from __future__ import annotations

import pytest
import torch

from t2po.config import ConfigError, load_config
from t2po.engines.base import InterventionConfig, SamplingParams
from t2po.engines.hf import HFEngine
from t2po.envs import make_env
from t2po.forward import forward_micro_batch, make_micro_batch
from t2po.models import load_model, lora_targets
from t2po.policies import EnginePolicy
from t2po.rollout import RolloutSettings, build_prompt, collect_rollouts
from t2po.vlm import build_image_prompt, collate_pixel_inputs, placeholder_token_ids

SOKOBAN_IMAGE = dict(dim_room=(5, 5), num_boxes=1, num_gen_steps=3, max_steps=2, observation_mode="image")


@pytest.fixture(scope="module")
def vlm(tiny_vlm_dir):
    """(model, tokenizer); module-wide, so tests must not modify its weights."""
    return load_model(tiny_vlm_dir)


def native_logprobs(model, prompt_ids, pixels, response):
    """Log-probs of `response` from one unpadded forward pass of the model itself (transformers
    computes the M-RoPE positions from mm_token_type_ids), placeholders masked as in the engine."""
    ids = torch.tensor([prompt_ids + response])
    with torch.inference_mode():
        logits = model(input_ids=ids, mm_token_type_ids=(ids == model.config.image_token_id).int(), **pixels).logits
        logits = logits[0, len(prompt_ids) - 1 : -1].float()
        logits[:, placeholder_token_ids(model)] = float("-inf")
        return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


def test_tiny_vlm_loads_with_its_processor(vlm, tiny_vlm_dir):
    model, tokenizer = vlm
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration" and not model.training
    assert type(tokenizer.processor).__name__ == "Qwen2VLProcessor" and tokenizer.processor.tokenizer is tokenizer
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    assert placeholder_token_ids(model) == [model.config.image_token_id, model.config.video_token_id]
    # a text prompt still renders with the tokenizer's chat template (text mode with a VLM)
    ids, pixels, _ = build_prompt(tokenizer, "hi")
    assert pixels is None and tokenizer.decode(ids).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_image_prompt_puts_the_image_where_the_placeholder_is(vlm):
    model, tokenizer = vlm
    env = make_env("points24", observation_mode="image")
    state = env.reset([3])[0]
    text = env.render_prompt(0, [], state)
    assert text.count("<image>") == 1
    ids, pixels = build_image_prompt(tokenizer, text, state.image)
    again, pixels_again = build_image_prompt(tokenizer, text, state.image)
    assert ids == again and torch.equal(pixels["pixel_values"], pixels_again["pixel_values"])  # deterministic
    grid = pixels["image_grid_thw"]
    assert grid.shape == (1, 3) and pixels["pixel_values"].shape[0] == int(grid.prod())
    image_positions = [k for k, t in enumerate(ids) if t == model.config.image_token_id]
    assert len(image_positions) == int(grid.prod()) // 4  # 2x2 patches merge into one token
    assert image_positions == list(range(image_positions[0], image_positions[-1] + 1))
    before, after = text.split("<image>")
    assert tokenizer.decode(ids[: image_positions[0] - 1]).endswith(before)  # <|vision_start|> sits between
    assert tokenizer.decode(ids[image_positions[-1] + 2 :]).startswith(after)
    # another picture gives other pixels; a text-only model cannot take images
    other = env.reset([4])[0]
    assert not torch.equal(build_image_prompt(tokenizer, text, other.image)[1]["pixel_values"], pixels["pixel_values"])
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        build_image_prompt(tokenizer, text, state.image, max_prompt_tokens=len(ids) - 1)


def test_rollout_records_exact_ids_and_pixel_inputs(vlm):
    model, tokenizer = vlm
    env = make_env("sokoban", **SOKOBAN_IMAGE)
    engine = HFEngine(model, tokenizer)
    result = collect_rollouts(EnginePolicy(engine, SamplingParams(temperature=1.0, max_new_tokens=10),
                                           InterventionConfig()), env, [0, 1],
                              RolloutSettings(group_size=2, max_prompt_tokens=4096))
    first_turn = {s.traj_id: s for s in result.samples if s.step == 0}
    states = make_env("sokoban", **SOKOBAN_IMAGE).reset([0, 0, 1, 1])
    for i, sample in first_turn.items():
        ids, pixels = build_image_prompt(tokenizer, env.render_prompt(i, [], states[i]), states[i].image)
        assert sample.prompt_ids == ids
        assert sample.pixel_inputs.keys() == pixels.keys()
        assert all(torch.equal(sample.pixel_inputs[k], pixels[k]) for k in pixels)
    for sample, trace in zip(result.samples, result.traces, strict=True):
        assert trace.image is not None and sample.pixel_inputs is not None
        assert not set(sample.response_ids) & set(placeholder_token_ids(model))
        assert len(sample.rollout_logprobs) == len(sample.response_ids) > 0
        # the engine (left-padded batch, its own positions, KV cache) agrees with the model's own forward
        native = native_logprobs(model, sample.prompt_ids, sample.pixel_inputs, sample.response_ids)
        assert torch.allclose(torch.tensor(sample.rollout_logprobs), native, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_trainer_logprobs_with_the_same_pixels_equal_the_engine(vlm, temperature):
    model, tokenizer = vlm
    engine = HFEngine(model, tokenizer)
    env = make_env("blackjack", observation_mode="both", max_steps=2)  # image and text in one prompt
    result = collect_rollouts(EnginePolicy(engine, SamplingParams(temperature=temperature, max_new_tokens=12),
                                           InterventionConfig()), env,
                              [0, 1, 2], RolloutSettings(max_prompt_tokens=4096))
    samples = result.samples
    assert len({len(s.prompt_ids) for s in samples}) > 1  # padding matters
    prompts, responses = [s.prompt_ids for s in samples], [s.response_ids for s in samples]
    pixels = [s.pixel_inputs for s in samples]
    mb = make_micro_batch(list(range(len(samples))), prompts, responses, tokenizer.pad_token_id, pixels)
    with torch.no_grad():
        logp = forward_micro_batch(model, mb)["logp"]
    for b, i in enumerate(mb.indices):
        assert torch.allclose(logp[b, : len(responses[i])], torch.tensor(samples[i].rollout_logprobs), atol=1e-4)
    # the pixels matter: the same ids with another sample's image give other log-probs
    swapped = pixels[1:] + pixels[:1]
    assert any(not torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(pixels, swapped))
    mb = make_micro_batch(list(range(len(samples))), prompts, responses, tokenizer.pad_token_id, swapped)
    with torch.no_grad():
        other = forward_micro_batch(model, mb)["logp"]
    assert (other - logp).abs().max() > 1e-3


def test_collate_pads_per_row_image_stacks():
    # Idefics3-style inputs: a stack of images per row; a row without an image gets all-zero images
    a = {"pixel_values": torch.ones(1, 2, 3, 4, 4), "pixel_attention_mask": torch.ones(1, 2, 4, 4, dtype=torch.bool)}
    b = {"pixel_values": torch.full((1, 1, 3, 4, 4), 2.0),
         "pixel_attention_mask": torch.ones(1, 1, 4, 4, dtype=torch.bool)}
    out = collate_pixel_inputs([a, None, b])
    assert out["pixel_values"].shape == (3, 2, 3, 4, 4) and out["pixel_attention_mask"].shape == (3, 2, 4, 4)
    assert out["pixel_values"][1].abs().sum() == 0 and out["pixel_values"][2, 1].abs().sum() == 0
    assert torch.equal(out["pixel_values"][2, 0], b["pixel_values"][0, 0])
    assert collate_pixel_inputs([None, None]) is None
    with pytest.raises(ValueError, match="same keys"):
        collate_pixel_inputs([a, {"pixel_values": b["pixel_values"]}])


def test_lora_goes_to_the_language_model_only(tiny_vlm_dir):
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(tiny_vlm_dir)
    # qkv, fc1: vision names
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "fc1"]
    peft_model = get_peft_model(model,
                                LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM", **lora_targets(model, names, 1)))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert adapted and all(".language_model.layers.1." in n for n in adapted)  # the last layer only, no vision module
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"}


def test_engine_and_rollout_refuse_images_for_a_text_model(tiny_model):
    model, tokenizer = tiny_model
    env = make_env("numberline", observation_mode="image")
    with pytest.raises(ValueError, match="need a vision-language model.*observation_mode=text"):
        collect_rollouts(EnginePolicy(HFEngine(model, tokenizer), SamplingParams(max_new_tokens=4)), env, [0],
                         RolloutSettings())
    with pytest.raises(ValueError, match="need a vision-language model"):
        HFEngine(model, tokenizer).generate([[1, 2]], SamplingParams(max_new_tokens=2),
                                            pixel_inputs=[{"pixel_values": torch.zeros(4, 8)}])


def test_image_mode_with_a_text_model_is_a_config_error(tiny_model_dir):
    with pytest.raises(ConfigError, match="model.path is required|need a vision-language model"):
        load_config("sokoban-image")  # the paper-like preset without model.path
    with pytest.raises(ConfigError, match="observation_mode=text"):
        load_config("points24-cpu", [f"model.path={tiny_model_dir}", "env.options.observation_mode=image"])
    load_config("points24-cpu", [f"model.path={tiny_model_dir}"])  # text mode: fine


def test_training_iteration_on_images_changes_the_weights(tiny_vlm_dir, tmp_path):
    from t2po.trainer.trainer import Trainer

    cfg = load_config("sokoban-image-cpu", [
        f"model.path={tiny_vlm_dir}", f"trainer.output_dir={tmp_path}", "trainer.run_name=run",
                                            "trainer.trackers=[console]",
        "rollout.num_tasks=2", "rollout.group_size=2", "rollout.sampling.max_new_tokens=8", "env.options.max_steps=2",
        "warmup.episodes=0", "optim.recompute_logprobs=true", "optim.lr=1e-2", "model.lora_rank=4",
    ])
    trainer = Trainer(cfg, quiet=True).setup()
    try:
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert before and all("language_model" in n for n in before)
        metrics = trainer.iteration(0)
    finally:
        trainer.cleanup()
    assert metrics["train/samples"] > 0 and metrics["rollout/episodes"] == 4
    assert torch.isfinite(torch.tensor(metrics["actor/grad_norm"])) and metrics["actor/grad_norm"] > 0
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)
    assert all(torch.isfinite(after[n]).all() for n in before)


def test_sft_on_image_prompts_keeps_the_images(vlm, tiny_vlm_dir, tmp_path):
    from t2po.sft import load_conversations, play_expert_episodes, save_conversations, sft_train, tokenize_conversations

    _, tokenizer = vlm
    env = make_env("numberline", observation_mode="image", max_steps=3)
    convs = play_expert_episodes(env, [0, 1])
    assert all(step["image"] is not None for c in convs for step in c.steps)
    save_conversations(convs, tmp_path / "demos.jsonl")
    loaded = load_conversations(tmp_path / "demos.jsonl")
    assert [s["image"].tobytes() for c in loaded for s in c.steps] == [s["image"].tobytes() for c in convs
                                                                       for s in c.steps]
    examples = tokenize_conversations(loaded, tokenizer)
    assert examples and all(len(e) == 3 and e[2]["pixel_values"].shape[1] == 1176 for e in examples)
    assert examples[0][0] == build_image_prompt(tokenizer, convs[0].steps[0]["prompt"], convs[0].steps[0]["image"])[0]
    model, _ = load_model(tiny_vlm_dir)  # a private copy: this test trains it
    losses = sft_train(model, tokenizer, examples, epochs=3, lr=3e-3, batch_size=4)
    assert losses[-1] < losses[0]


def test_tiny_vlm_name_builds_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("T2PO_CACHE", str(tmp_path / "cache"))
    model, tokenizer = load_model("tiny-vlm")
    built = next((tmp_path / "cache" / "models").glob("tiny-vlm-*"))
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    again, _ = load_model("TINY-VLM")
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert tokenizer.processor is not None and type(again).__name__ == type(model).__name__
    assert not list((tmp_path / "cache" / "models").glob(".tiny-vlm-*"))  # no staging left behind


def build_tiny_idefics3(out_dir, tokenizer_dir):
    """A tiny random Idefics3 (the SmolVLM architecture: SigLIP-style tower, pixel shuffle, Llama
    text model, 1-D positions, per-row image stacks) with its processor, from the tiny tokenizer."""
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] "
                "is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] "
                "== 'image' %}{{ '<image>' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ "
                "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif "
                "%}")
    tokenizer.chat_template = template
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 64},
                                                max_image_size={"longest_edge": 64})
    # adds <image>
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=template)
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16, initializer_range=0.2),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, initializer_range=0.2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
                            tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def test_idefics3_family_engine_and_trainer_agree(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(build_tiny_idefics3(tmp_path / "idefics3", tiny_model_dir))
    assert type(tokenizer.processor).__name__ == "Idefics3Processor"
    env = make_env("blackjack", observation_mode="image", max_steps=2)
    result = collect_rollouts(EnginePolicy(HFEngine(model, tokenizer),
                                           SamplingParams(temperature=1.0, max_new_tokens=10), InterventionConfig()),
                              env, [0, 1, 2], RolloutSettings(max_prompt_tokens=4096))
    samples = result.samples
    assert samples[0].pixel_inputs["pixel_values"].shape == (1, 1, 3, 64, 64)
    assert len({len(s.prompt_ids) for s in samples}) > 1
    args = (list(range(len(samples))), [s.prompt_ids for s in samples], [s.response_ids for s in samples],
            tokenizer.pad_token_id)
    pixels = [s.pixel_inputs for s in samples]
    with torch.no_grad():
        logp = forward_micro_batch(model, make_micro_batch(*args, pixels))["logp"]
        swapped = forward_micro_batch(model, make_micro_batch(*args, pixels[1:] + pixels[:1]))["logp"]
    for b, s in enumerate(samples):
        assert torch.allclose(logp[b, : len(s.response_ids)], torch.tensor(s.rollout_logprobs), atol=1e-4)
    assert (swapped - logp).abs().max() > 1e-3
