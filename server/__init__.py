"""server: the OpenAI-compatible front end and the `vllm-lk` command line."""
