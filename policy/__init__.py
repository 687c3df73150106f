"""Model serving behind one small protocol: agent/ and trainer/ both sit on this package.

`protocol` (Policy, Completion, PolicyError), `local` (transformers + PEFT in-process, micro-batched,
llguidance JSON-schema decoding in `structured`), `openai_client` (vLLM or any OpenAI-compatible
server), `openai_server` (a small OpenAI-compatible server over a local policy, for tests and CPU
serving), `scripted` (deterministic answers for tests), `model_files` (the default model's files),
`backends.build_policy`. Nothing here knows about episodes, SQL or rewards.
"""
