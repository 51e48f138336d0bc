"""The `vllm-lk bench` harnesses: ``speed`` (speculation vs none, every drafter x K x T, and
``speed_profile``, where a step's time goes) and ``reproduce`` (the paper's KL vs TV vs LK
comparison end to end, with ``reproduce_report``). They drive the trainer and vLLM; nothing in
training or serving imports them. Standalone micro-benchmarks live in benchmarks/."""
