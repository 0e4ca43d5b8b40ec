"""Engine correctness on the CPU: greedy output equals transformers generate(), bad input is
rejected without losing other requests, sampling options behave as documented."""

from __future__ import annotations

import itertools

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from flashserve import LLM, LLMEngine, SamplingParams
from flashserve.model import loader

STORIES_REFERENCE_IDS = [
    432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292,
    411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352, 266, 268, 388, 426,
]
STORIES_REFERENCE_TEXT = ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball."

PROMPTS = [
    "Once upon a time",
    "The cat",
    "Tom and Lily went to the park and played on the swings until the sun went down",
    "A",
    "She had a big red ball that she loved very much. One day",
    "Hi there",
    "The little dog ran fast",
    "Max was a happy dog who liked to eat bones and play in the garden with his friends every day",
    "Once",
    "Birds sing",
]
MAX_TOKENS = 24
COMBINATIONS = list(itertools.product(["continuous", "static"], ["paged", "contiguous"]))


def hf_greedy(model, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Reference continuations from transformers generate(do_sample=False), one prompt at a time."""
    outputs = []
    for ids in prompt_ids:
        tensor = torch.tensor([ids])
        generated = model.generate(
            input_ids=tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
        outputs.append(generated[0, len(ids):].tolist())
    return outputs


def reference_model(model: str):
    """The transformers model (SDPA attention) and tokenizer that LLM(model, seed=0) builds."""
    source = loader.resolve_model(model)
    hf, _ = loader.build_model(source, "auto", torch.float32, torch.device("cpu"), 0, "sdpa")
    return hf, loader.build_tokenizer(source)


@pytest.fixture(scope="module", params=["micro", "stories260k"])
def reference(request):
    """(model path, tokenized prompts, reference greedy continuations)."""
    model = request.getfixturevalue("micro_llama" if request.param == "micro" else "stories260k")
    hf, tokenizer = reference_model(model)
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    return model, prompt_ids, hf_greedy(hf, prompt_ids, MAX_TOKENS)


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("batching,kv_allocation", COMBINATIONS)
def test_greedy_matches_transformers(reference, batching, kv_allocation):
    model, prompt_ids, expected = reference
    llm = LLM(model, batching=batching, kv_allocation=kv_allocation, block_size=8, num_kv_blocks=256,
              max_num_batched_tokens=512)
    outputs = llm.generate(prompt_ids, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)


@pytest.mark.parametrize("batching,kv_allocation", COMBINATIONS)
def test_greedy_with_chunked_prefill_and_small_cache(reference, batching, kv_allocation):
    model, prompt_ids, expected = reference
    longest = max(len(ids) for ids in prompt_ids) + MAX_TOKENS
    # paged: barely more than the longest request, so growing sequences preempt each other;
    # contiguous: room for about two reservations, so requests queue for blocks instead.
    num_blocks = -(-longest // 4) + 2 if kv_allocation == "paged" else 2 * -(-longest // 4) + 1
    llm = LLM(model, batching=batching, kv_allocation=kv_allocation, block_size=4, num_kv_blocks=num_blocks,
              max_num_batched_tokens=16, max_num_seqs=6)
    outputs = llm.generate(prompt_ids, GREEDY)
    scheduler = llm.engine.scheduler

    assert [o.outputs[0].token_ids for o in outputs] == expected
    chunked = [s for s in scheduler.step_records if s.num_prefill_tokens == 16]
    assert chunked, "no step was filled by a prefill chunk"
    if kv_allocation == "paged":
        assert scheduler.num_preemptions > 0
        assert sum(o.metrics.num_preemptions for o in outputs) == scheduler.num_preemptions
    assert scheduler.block_manager.num_free_blocks == num_blocks


def test_stories260k_reference_continuation(stories260k):
    llm = LLM(stories260k, num_kv_blocks=64)
    [output] = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40))
    assert output.prompt_token_ids == [1, 403, 407, 261, 378]
    assert output.outputs[0].token_ids == STORIES_REFERENCE_IDS
    assert output.outputs[0].text == STORIES_REFERENCE_TEXT
    assert output.outputs[0].finish_reason == "length"


def test_batch_composition_keeps_greedy_output(micro_llama):
    llm = LLM(micro_llama, num_kv_blocks=128, block_size=8)
    alone = llm.generate(PROMPTS[2], GREEDY)[0].outputs[0].token_ids
    together = llm.generate(PROMPTS, GREEDY)[2].outputs[0].token_ids
    reversed_batch = llm.generate(PROMPTS[::-1], GREEDY)[len(PROMPTS) - 3].outputs[0].token_ids
    assert together == alone
    assert reversed_batch == alone


def test_outputs_keep_input_order_and_records(micro_llama):
    llm = LLM(micro_llama, num_kv_blocks=128)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in range(1, len(PROMPTS) + 1)]
    outputs = llm.generate(PROMPTS, params)
    for i, output in enumerate(outputs):
        record = output.metrics
        assert output.prompt == PROMPTS[i]
        assert len(output.outputs[0].token_ids) == i + 1
        assert record.num_output_tokens == i + 1
        assert record.arrival_time <= record.first_scheduled_time <= record.first_token_time <= record.finish_time
        assert len(record.token_times) == i + 1
    steps = llm.engine.step_records()
    assert sum(s.num_sampled for s in steps) == sum(range(1, len(PROMPTS) + 1))
    assert all(s.kv_tokens_used <= s.kv_slots_allocated for s in steps)


def test_token_id_prompts(micro_llama):
    llm = LLM(micro_llama, num_kv_blocks=64)
    by_text = llm.generate("Birds sing", GREEDY)[0]
    by_ids = llm.generate([by_text.prompt_token_ids], GREEDY)[0]
    assert by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids


# bad input

@pytest.fixture
def busy_engine(micro_llama):
    """An engine with three requests already running, and a helper that finishes them."""
    engine = LLMEngine(model=micro_llama, num_kv_blocks=40, block_size=4, max_model_len=64)
    for i in range(3):
        engine.add_request(f"good-{i}", PROMPTS[i % 2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()
    return engine


BAD_REQUESTS = [
    ("x" * 80, SamplingParams(max_tokens=1), "max_model_len"),
    ("x" * 40, SamplingParams(max_tokens=30), "max_model_len"),
    ("", SamplingParams(max_tokens=4), "empty"),
    ([], SamplingParams(max_tokens=4), "empty"),
]


@pytest.mark.parametrize("prompt,params,message", BAD_REQUESTS)
def test_bad_request_rejected_and_others_served(busy_engine, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        busy_engine.add_request("bad", prompt, params)
    while busy_engine.has_unfinished_requests():
        busy_engine.step()
    records = {r.request_id: r for r in busy_engine.request_records()}
    assert "bad" not in records
    assert all(records[f"good-{i}"].num_output_tokens == 8 for i in range(3))
    assert busy_engine.scheduler.block_manager.num_free_blocks == 40


def test_request_larger_than_whole_cache_rejected(micro_llama):
    engine = LLMEngine(model=micro_llama, num_kv_blocks=4, block_size=4, max_model_len=64)
    engine.add_request("fits", "abc", SamplingParams(max_tokens=8, ignore_eos=True))
    with pytest.raises(ValueError, match="whole cache has 4"):
        engine.add_request("too-big", "x" * 10, SamplingParams(max_tokens=10))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.request_records()[0].num_output_tokens == 8
    assert engine.scheduler.block_manager.num_free_blocks == 4


@pytest.mark.parametrize("options,message", [
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"top_k": -3}, "top_k"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"temperature": float("nan")}, "finite"),
    ({"top_p": float("nan")}, "top_p"),
    ({"seed": 2**70}, "seed"),
    ({"seed": -1}, "seed"),
    ({"max_tokens": True}, "max_tokens"),
])
def test_invalid_sampling_values_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)


def test_generate_checks_every_prompt_before_queueing(micro_llama):
    llm = LLM(micro_llama, num_kv_blocks=64, max_model_len=32)
    with pytest.raises(ValueError, match="prompt 1: .*max_model_len"):
        llm.generate(["ok", "y" * 100, "ok too"], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate(["ok"], SamplingParams(max_tokens=4, ignore_eos=True))[0].outputs[0].token_ids


def test_abort_frees_blocks(micro_llama):
    engine = LLMEngine(model=micro_llama, num_kv_blocks=64, block_size=4)
    engine.add_request("a", PROMPTS[2], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    assert engine.abort_request("a")
    while engine.has_unfinished_requests():
        engine.step()
    records = {r.request_id: r for r in engine.request_records()}
    assert records["a"].finish_reason == "abort"
    assert records["b"].num_output_tokens == 5
    assert engine.scheduler.block_manager.num_free_blocks == 64


# sampling

def test_seeded_sampling_independent_of_batch(micro_llama):
    llm = LLM(micro_llama, num_kv_blocks=128)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], params)[0].outputs[0].token_ids
    batch = llm.generate(PROMPTS[:4], [GREEDY, params, GREEDY, SamplingParams(temperature=1.0, seed=7)])
    assert batch[1].outputs[0].token_ids == alone
    other_seed = llm.generate(PROMPTS[1], SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=99,
                                                         max_tokens=16, ignore_eos=True))[0]
    assert other_seed.outputs[0].token_ids != alone


def test_top_k_one_is_greedy(micro_llama):
    llm = LLM(micro_llama, num_kv_blocks=64)
    greedy = llm.generate(PROMPTS[0], GREEDY)[0].outputs[0].token_ids
    top1 = llm.generate(PROMPTS[0], SamplingParams(temperature=1.5, top_k=1, seed=3, max_tokens=MAX_TOKENS,
                                                   ignore_eos=True))[0].outputs[0].token_ids
    assert top1 == greedy


def test_tiny_top_p_is_greedy(micro_llama):
    llm = LLM(micro_llama, num_kv_blocks=64)
    greedy = llm.generate(PROMPTS[3], GREEDY)[0].outputs[0].token_ids
    nucleus = llm.generate(PROMPTS[3], SamplingParams(temperature=1.0, top_p=1e-6, seed=5, max_tokens=MAX_TOKENS,
                                                      ignore_eos=True))[0].outputs[0].token_ids
    assert nucleus == greedy


def test_stop_string_truncates_text(stories260k):
    llm = LLM(stories260k, num_kv_blocks=64)
    [output] = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40, stop=["Lily"]))
    completion = output.outputs[0]
    assert completion.text == ", there was a little girl named "
    assert completion.finish_reason == "stop"
    assert completion.stop_reason == "Lily"
    assert llm.engine.scheduler.block_manager.num_free_blocks == 64


def test_stop_token_ids_and_min_tokens(stories260k):
    llm = LLM(stories260k, num_kv_blocks=64)
    stop_id = STORIES_REFERENCE_IDS[10]  # appears again later in the reference
    first = STORIES_REFERENCE_IDS.index(stop_id)
    [stopped] = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_id]))
    assert stopped.outputs[0].token_ids == STORIES_REFERENCE_IDS[:first + 1]
    assert stopped.outputs[0].finish_reason == "stop"
    assert stopped.outputs[0].stop_reason == stop_id

    # min_tokens keeps the stop id from being sampled until that many tokens exist
    [later] = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40, min_tokens=first + 1,
                                                             stop_token_ids=[stop_id]))
    ids = later.outputs[0].token_ids
    assert ids[:first] == STORIES_REFERENCE_IDS[:first]
    assert stop_id not in ids[:first + 1]
    assert len(ids) == 40 or ids[-1] == stop_id


def test_eos_ends_request_unless_ignored(micro_llama, tmp_path):
    ignored = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    free = LLM(micro_llama, num_kv_blocks=64).generate(PROMPTS[0], ignored)[0].outputs[0].token_ids
    eos = free[4]
    first_eos = free.index(eos)

    # the same weights with that token declared as EOS in the model config
    config = yaml.safe_load(open(micro_llama))
    config["hf_config"]["eos_token_id"] = eos
    eos_model = tmp_path / "eos-llama.yaml"
    eos_model.write_text(yaml.safe_dump(config))
    llm = LLM(str(eos_model), num_kv_blocks=64)

    stopped = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert stopped.token_ids == free[:first_eos + 1]
    assert stopped.finish_reason == "stop"
    assert llm.generate(PROMPTS[0], ignored)[0].outputs[0].token_ids == free
    delayed = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, min_tokens=first_eos + 1))
    delayed_ids = delayed[0].outputs[0].token_ids
    assert delayed_ids[:first_eos] == free[:first_eos]
    assert eos not in delayed_ids[:first_eos + 1]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs(micro_llama, dtype):
    llm = LLM(micro_llama, dtype=dtype, num_kv_blocks=64)
    outputs = llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 8 for o in outputs)
    assert llm.engine.runner.kv_caches[0][0].dtype == getattr(torch, dtype)


def test_dummy_model_uses_byte_tokenizer(micro_llama):
    llm = LLM(micro_llama, num_kv_blocks=16)
    tokenizer = llm.get_tokenizer()
    text = "héllo, wörld ✓"
    ids = tokenizer.encode(text)
    assert ids[0] == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_kv_cache_sized_from_memory_setting(micro_llama):
    engine = LLMEngine(model=micro_llama, kv_cache_memory_gb=0.001, block_size=16)
    per_block = 2 * 2 * 2 * 16 * 4 * 16  # K and V, layers, kv heads, head dim, fp32 bytes, block size
    assert engine.num_kv_blocks == int(0.001 * 2**30 // per_block)


def test_unknown_model_name_lists_choices():
    with pytest.raises(ValueError, match="tiny-llama"):
        LLM("no-such-model")


def test_hf_tokenizer_and_text_prompt(stories260k):
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    llm = LLM(stories260k, num_kv_blocks=32)
    assert llm.get_tokenizer().encode("Once upon a time") == tokenizer.encode("Once upon a time")


def test_model_loads_weights_from_checkpoint(stories260k):
    llm = LLM(stories260k, num_kv_blocks=32)
    reference = AutoModelForCausalLM.from_pretrained(stories260k)
    ours = llm.engine.model.state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours[name], tensor), name


def test_vllm_dict_prompts(micro_llama):
    llm = LLM(micro_llama, num_kv_blocks=64)
    by_text = llm.generate({"prompt": "Birds sing"}, GREEDY)[0]
    by_ids = llm.generate([{"prompt_token_ids": by_text.prompt_token_ids}], GREEDY)[0]
    assert by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids


@pytest.mark.parametrize("prompts", [[None], 7, [[1, True, 3]], [{"text": "x"}]])
def test_malformed_prompts_rejected(micro_llama, prompts):
    llm = LLM(micro_llama, num_kv_blocks=16)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate(prompts, GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_stop_token_outside_vocabulary_rejected(micro_llama):
    llm = LLM(micro_llama, num_kv_blocks=16)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate("hi", SamplingParams(stop_token_ids=[10_000]))


def test_failed_step_leaves_engine_usable(micro_llama, monkeypatch):
    llm = LLM(micro_llama, num_kv_blocks=64)
    runner = llm.engine.runner
    original = runner.execute

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(runner, "execute", broken)
    with pytest.raises(RuntimeError, match="injected failure"):
        llm.generate(PROMPTS[:3], SamplingParams(temperature=0.7, seed=1, max_tokens=4))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.block_manager.num_free_blocks == 64

    monkeypatch.setattr(runner, "execute", original)
    outputs = llm.generate(PROMPTS[:3], GREEDY)
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outputs)


def test_unsupported_device_rejected(micro_llama):
    with pytest.raises(ValueError, match="device"):
        LLM(micro_llama, device="tpu")
