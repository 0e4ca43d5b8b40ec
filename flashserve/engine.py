"""LLMEngine.step(): schedule -> execute -> update, and the offline `LLM` API."""

from __future__ import annotations

import itertools
import logging
import time
import zlib
from dataclasses import dataclass, field, replace

import torch

from flashserve.config import EngineConfig
from flashserve.core import Request, RequestRecord, Scheduler, SchedulerConfig, StepRecord, StopCriteria, to_record
from flashserve.detokenizer import Detokenizer
from flashserve.model import loader
from flashserve.model.attention import ATTN_IMPLEMENTATION
from flashserve.model.runner import ModelRunner, kv_bytes_per_token, resolve_device, resolve_dtype
from flashserve.outputs import CompletionOutput, RequestOutput
from flashserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# a text, a list of token ids, or vLLM's dict form {"prompt": text} / {"prompt_token_ids": ids}
PromptType = str | list[int] | dict


@dataclass
class _RequestState:
    """Engine-side state of a request that the scheduler does not need."""

    request: Request
    params: SamplingParams
    prompt: str | None
    detokenizer: Detokenizer
    stream_text: bool  # detokenize every step (stop strings or streaming) rather than once at the end
    logprobs: list[dict[int, float]] | None = None
    num_sent_tokens: int = 0
    stop_reason: str | int | None = None
    extra: dict = field(default_factory=dict)


class LLMEngine:
    """A paged-KV serving engine. Add requests, then call `step()` until none are unfinished."""

    def __init__(self, config: EngineConfig | None = None, **options):
        config = replace(config or EngineConfig(), **options)
        config.validate()
        self.config = config

        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.source = loader.resolve_model(config.model)
        self.tokenizer = loader.build_tokenizer(self.source)
        self.model, self.load_format = loader.build_model(
            self.source, config.load_format, self.dtype, self.device, config.seed, ATTN_IMPLEMENTATION
        )
        hf_config = self.model.config
        self.eos_token_id = self._eos_token_id()

        model_max = getattr(hf_config, "max_position_embeddings", None) or 2048
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the model's max_position_embeddings={model_max}; "
                f"use at most {model_max}"
            )
        self.max_model_len = config.max_model_len or model_max
        self.num_kv_blocks = config.num_kv_blocks or self._size_kv_cache(hf_config)

        self.scheduler = Scheduler(SchedulerConfig(
            num_kv_blocks=self.num_kv_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            batching=config.batching,
            kv_allocation=config.kv_allocation,
        ))
        self.runner = ModelRunner(self.model, self.num_kv_blocks, config.block_size, self.device, self.dtype)
        self._states: dict[str, _RequestState] = {}
        self._ids = itertools.count()
        self._t0 = time.perf_counter()
        num_params = sum(p.numel() for p in self.model.parameters())
        logger.info(
            "engine ready: model=%s (%.2fM parameters, %s weights) device=%s dtype=%s kv_blocks=%d x %d tokens "
            "batching=%s kv_allocation=%s max_model_len=%d",
            self.source.name, num_params / 1e6, self.load_format, self.device, str(self.dtype).removeprefix("torch."),
            self.num_kv_blocks, config.block_size, config.batching, config.kv_allocation, self.max_model_len,
        )

    def _eos_token_id(self) -> int | None:
        eos = getattr(self.model.config, "eos_token_id", None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return eos if eos is not None else self.tokenizer.eos_token_id

    def _size_kv_cache(self, hf_config) -> int:
        """Blocks that fit in the configured memory: a fraction of the GPU, or a fixed size on the CPU."""
        per_block = kv_bytes_per_token(hf_config, self.dtype) * self.config.block_size
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * self.config.gpu_memory_utilization - (total - free)
            source = f"gpu_memory_utilization={self.config.gpu_memory_utilization}"
        else:
            budget = self.config.kv_cache_memory_gb * 2**30
            source = f"kv_cache_memory_gb={self.config.kv_cache_memory_gb}"
        num_blocks = int(budget // per_block)
        if num_blocks < 1:
            raise ValueError(f"no memory left for the KV cache under {source}; raise it or set num_kv_blocks")
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB) from %s; set num_kv_blocks to override",
                    num_blocks, self.config.block_size, num_blocks * per_block / 2**20, source)
        return num_blocks

    # clock

    def now(self) -> float:
        """Seconds since the engine started: the clock of every record."""
        return time.perf_counter() - self._t0

    # requests

    def tokenize(self, prompt: PromptType) -> list[int]:
        """Token ids of a prompt; ValueError for an empty or malformed prompt or ids outside the vocabulary."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError(f"a dict prompt needs a 'prompt' or 'prompt_token_ids' key, got keys {sorted(prompt)}")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty; send at least one character or token id")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise ValueError(
                f"a prompt must be a string, a list of integer token ids or a dict with 'prompt' or "
                f"'prompt_token_ids', got {type(prompt).__name__}"
            )
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return list(prompt)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request can never be served."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        vocab = self.model.config.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab})")
        self.scheduler.validate(len(prompt_token_ids), params.max_tokens)

    def add_request(
        self,
        request_id: str | None,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        stream: bool = False,
    ) -> str:
        """Validate and queue a request; on ValueError nothing is queued. Returns the request id."""
        params = params or SamplingParams()
        prompt_token_ids = self.tokenize(prompt)
        self.check_request(prompt_token_ids, params)
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._states:
            raise ValueError(f"request id {request_id!r} is already in use")

        stop = StopCriteria(
            max_tokens=params.max_tokens,
            min_tokens=params.min_tokens,
            eos_token_id=self.eos_token_id,
            stop_token_ids=tuple(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
        )
        request = Request(request_id, prompt_token_ids, stop, self.now() if arrival_time is None else arrival_time)
        state = _RequestState(
            request=request,
            params=params,
            prompt=prompt if isinstance(prompt, str) else None,
            detokenizer=Detokenizer(self.tokenizer, prompt_token_ids, params.stop, params.skip_special_tokens),
            stream_text=stream or bool(params.stop),
            logprobs=[] if params.logprobs is not None else None,
        )

        # NOTE: the scheduler takes the request last, so that an error above leaves nothing queued.
        if not params.is_greedy:
            seed = params.seed if params.seed is not None else zlib.crc32(f"{self.config.seed}:{request_id}".encode())
            self.runner.add_generator(request_id, seed)
        try:
            self.scheduler.add_request(request)
        except ValueError:
            self.runner.remove_generator(request_id)
            raise
        self._states[request_id] = state
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Finish a request now (client gone) and free its KV blocks. False if it was not running or waiting."""
        request = self.scheduler.abort_request(request_id, self.now())
        self.runner.remove_generator(request_id)
        return request is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # one iteration

    def step(self) -> list[RequestOutput]:
        """Run one iteration and return an output for each request that got tokens or finished."""
        output = self.scheduler.schedule(self.now())
        if output.is_empty:
            return []

        params = {s.request.request_id: self._states[s.request.request_id].params for s in output.scheduled}
        sampled = self.runner.execute(output, params, self._suppressed_tokens(output))
        for request_id, token in sampled.items():
            state = self._states[request_id]
            if state.logprobs is not None:
                state.logprobs.append(token.logprobs)

        finished = self.scheduler.update(output, {rid: t.token_id for rid, t in sampled.items()}, self.now())
        for request in finished:
            last = request.output_token_ids[-1] if request.output_token_ids else None
            if request.finish_reason == "stop" and last in request.stop.stop_token_ids:
                self._states[request.request_id].stop_reason = last

        results = []
        for request_id in sampled:
            state = self._states[request_id]
            request = state.request
            if state.stream_text and not request.is_finished:
                stop = state.detokenizer.update(request.output_token_ids)
                if stop is not None:
                    state.stop_reason = stop
                    self.scheduler.finish_request(request_id, "stop", self.now())
            results.append(self._make_output(state))
        return results

    def _suppressed_tokens(self, output) -> dict[str, list[int]]:
        """EOS and stop token ids of requests that have fewer than min_tokens output tokens (as in vLLM)."""
        suppressed = {}
        for item in output.scheduled:
            request = item.request
            stop = request.stop
            if item.samples and request.num_output_tokens < stop.min_tokens:
                ids = list(stop.stop_token_ids)
                if not stop.ignore_eos and stop.eos_token_id is not None:
                    ids.append(stop.eos_token_id)
                if ids:
                    suppressed[request.request_id] = ids
        return suppressed

    def _make_output(self, state: _RequestState) -> RequestOutput:
        request = state.request
        finished = request.is_finished
        detokenizer = state.detokenizer
        if finished:
            self.runner.remove_generator(request.request_id)
            if detokenizer.stop_reason is None:
                detokenizer.text = detokenizer.decode_all(request.output_token_ids)
        new_text = detokenizer.take_new_text(finished) if (state.stream_text or finished) else ""
        new_ids = request.output_token_ids[state.num_sent_tokens:]
        state.num_sent_tokens = len(request.output_token_ids)
        completion = CompletionOutput(
            index=0,
            text=detokenizer.visible_text(finished) if (state.stream_text or finished) else "",
            token_ids=list(request.output_token_ids),
            finish_reason=request.finish_reason,
            stop_reason=state.stop_reason,
            logprobs=None if state.logprobs is None else list(state.logprobs),
        )
        return RequestOutput(
            request_id=request.request_id,
            prompt=state.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=finished,
            metrics=to_record(request) if finished else None,
            new_token_ids=new_ids,
            new_text=new_text,
        )

    def release(self, request_id: str) -> None:
        """Forget a finished request's engine-side state (its record stays with the scheduler)."""
        self._states.pop(request_id, None)

    # records

    def request_records(self) -> list[RequestRecord]:
        return self.scheduler.request_records()

    def step_records(self) -> list[StepRecord]:
        return list(self.scheduler.step_records)

    def reset_records(self) -> None:
        """Drop the records of finished requests and past steps (for example after a warm-up)."""
        if self.has_unfinished_requests():
            raise RuntimeError("reset_records() needs an idle engine; finish or abort the running requests first")
        self.scheduler.requests.clear()
        self.scheduler.finished.clear()
        self.scheduler.step_records.clear()
        self._states.clear()


class LLM:
    """Offline batch generation in vLLM's shape: `LLM(model).generate(prompts, sampling_params)`."""

    def __init__(self, model: str = "tiny-llama", **options):
        self.engine = LLMEngine(EngineConfig(model=model, **options))
        self.tokenizer = self.engine.tokenizer

    def get_tokenizer(self):
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | list[PromptType],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns one RequestOutput per prompt, in input order.

        All prompts are checked before any is queued, so a ValueError leaves the engine as it was.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompts)} prompts; pass one, or one per prompt"
                )

        engine = self.engine
        for index, (prompt, params) in enumerate(zip(prompts, params_list)):
            try:
                engine.check_request(engine.tokenize(prompt), params)
            except ValueError as error:
                raise ValueError(f"prompt {index}: {error}") from None

        request_ids: list[str] = []
        final: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(prompts), desc="generate", unit="req")
        try:
            for prompt, params in zip(prompts, params_list):
                request_ids.append(engine.add_request(None, prompt, params))
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        final[output.request_id] = output
                        engine.release(output.request_id)
                        if progress is not None:
                            progress.update(1)
        except BaseException:
            # abort this call's requests so that the engine is usable again and every block is free
            for request_id in request_ids:
                engine.abort_request(request_id)
                engine.release(request_id)
            raise
        finally:
            if progress is not None:
                progress.close()
        return [final[request_id] for request_id in request_ids]
