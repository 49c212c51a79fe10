"""Co-serving sampling and LoRA finetuning over HTTP (``dpmjax serve``; FlexLLM's co-serving for diffusion).

``programs``: the compiled fixed-shape iteration (rows, per-row solver steps, per-row adapters, masked LoRA loss);
``engine``: the host scheduler (continuous batching, training rows under a latency target, jobs);
``store``: atomic job and adapter files; ``app``: the Starlette application and ``serve``.
"""
from dpmjax.serve.engine import Engine, EngineConfig, RequestError

__all__ = ["Engine", "EngineConfig", "RequestError"]
