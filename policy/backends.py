"""Pick the policy backend named in `[agent] backend`: in-process transformers or an OpenAI-compatible server."""

from __future__ import annotations

from policy.config import PolicyConfig
from policy.protocol import Policy


def build_policy(agent_cfg: PolicyConfig, serving: tuple[str, int] | None) -> Policy:
    """A policy serving `serving` = (adapter path, version) from the registry, or the base model."""
    adapter_path, adapter_version = serving if serving is not None else (None, None)
    if agent_cfg.backend == "local":
        from policy.local import LocalPolicy

        return LocalPolicy(
            agent_cfg.model,
            adapter_path=adapter_path,
            adapter_version=adapter_version,
            device=agent_cfg.device,
            max_batch_size=agent_cfg.max_batch_size,
            batch_wait_ms=agent_cfg.batch_wait_ms,
            cache_dir=agent_cfg.model_cache_dir,
        )
    # Imported lazily: the server backend needs neither torch nor the model files here.
    from policy.openai_client import OpenAIPolicy

    policy = OpenAIPolicy(agent_cfg.base_url, agent_cfg.model, api_key=agent_cfg.api_key)
    if serving is not None:
        policy.load_adapter(adapter_path, adapter_version)
    return policy
