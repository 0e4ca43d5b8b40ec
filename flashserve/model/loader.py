"""Resolve a model name or path, build the transformers model and its tokenizer, offline."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
LOAD_FORMATS = ("auto", "dummy")


@dataclass
class ModelSource:
    """Source of a model's config, and optionally of its weights and tokenizer."""

    name: str
    hf_config: dict  # the contents of a Hugging Face config.json
    checkpoint_dir: Path | None  # directory with safetensors weights and tokenizer files, if any


def model_config_dir() -> Path:
    """Folder of the shipped model configs (`conf/model`), overridable with FLASHSERVE_CONF_DIR."""
    return Path(os.environ.get("FLASHSERVE_CONF_DIR", CONF_DIR)) / "model"


def available_models() -> list[str]:
    return sorted(p.stem for p in model_config_dir().glob("*.yaml"))


def resolve_model(model: str | os.PathLike) -> ModelSource:
    """Turn `model` into a ModelSource.

    `model` is a Hugging Face checkpoint directory (with config.json), a YAML or JSON config
    file, or the name of a config in conf/model (for example "tiny-llama").
    """
    path = Path(model).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"model directory {path} has no config.json; pass a Hugging Face checkpoint directory")
        return ModelSource(path.name, json.loads(config_file.read_text()), path)

    if path.is_file():
        return _source_from_file(path)

    named = model_config_dir() / f"{model}.yaml"
    if named.is_file():
        return _source_from_file(named)

    raise ValueError(
        f"model {str(model)!r} is neither a checkpoint directory, a config file, nor a model config "
        f"name; the shipped names are {available_models()}"
    )


def _source_from_file(path: Path) -> ModelSource:
    if path.suffix == ".json":
        return ModelSource(path.stem, json.loads(path.read_text()), None)
    data = _load_yaml(path)
    if "hf_config" not in data:
        raise ValueError(f"model config {path} has no 'hf_config' section")
    checkpoint = data.get("path")
    checkpoint_dir = Path(os.path.expandvars(str(checkpoint))).expanduser() if checkpoint else None
    if checkpoint_dir is not None and not (checkpoint_dir / "config.json").is_file():
        raise ValueError(
            f"model config {path} points at checkpoint {checkpoint_dir}, which has no config.json; "
            f"fix its 'path' (or the environment variable it names)"
        )
    return ModelSource(data.get("name", path.stem), dict(data["hf_config"]), checkpoint_dir)


def _load_yaml(path: Path) -> dict:
    """Read a model config with OmegaConf, so `${oc.env:VAR}` resolves as it does under Hydra."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    except OmegaConfBaseException as error:
        raise ValueError(f"model config {path} could not be resolved: {error}") from None


def has_weights(source: ModelSource) -> bool:
    return source.checkpoint_dir is not None and any(source.checkpoint_dir.glob("*.safetensors"))


def build_model(source: ModelSource, load_format: str, dtype, device, seed: int, attn_implementation: str):
    """Build the causal LM: real weights from the checkpoint, or seeded random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if load_format == "auto" and not has_weights(source):
        logger.info("model %s has no weights on disk; building seeded random weights (load_format='dummy')", source.name)
        load_format = "dummy"

    if load_format == "auto":
        model = AutoModelForCausalLM.from_pretrained(
            source.checkpoint_dir, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        )
    else:
        config_dict = dict(source.hf_config)
        model_type = config_dict.pop("model_type", "llama")
        config = AutoConfig.for_model(model_type, **config_dict)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device)
    model.eval()
    return model, load_format


def build_tokenizer(source: ModelSource):
    """Load the checkpoint's own tokenizer, or build a byte-level one for a model without one."""
    from transformers import AutoTokenizer

    if source.checkpoint_dir is not None and (
        (source.checkpoint_dir / "tokenizer.json").is_file()
        or (source.checkpoint_dir / "tokenizer_config.json").is_file()
    ):
        return AutoTokenizer.from_pretrained(source.checkpoint_dir, local_files_only=True)
    return byte_level_tokenizer(source.hf_config.get("vocab_size", 320))


BYTE_TOKENIZER_SPECIALS = ("<unk>", "<s>", "</s>")


def byte_level_tokenizer(vocab_size: int):
    """Build a tokenizer with one token per byte, after the specials <unk>=0, <s>=1, </s>=2.

    Any text round-trips exactly, so models with random weights need no vocabulary file.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    needed = len(BYTE_TOKENIZER_SPECIALS) + len(alphabet)
    if vocab_size < needed:
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {needed}, the model config has {vocab_size}")
    vocab = {token: i for i, token in enumerate(BYTE_TOKENIZER_SPECIALS)}
    for i, char in enumerate(sorted(alphabet)):
        vocab[char] = len(BYTE_TOKENIZER_SPECIALS) + i

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
