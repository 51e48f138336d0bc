"""Draft-model classes vLLM 0.32 cannot load itself (registered by the plugin)."""
