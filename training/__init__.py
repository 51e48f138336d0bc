"""training: produces draft heads (and the embedded toy target) for a served vLLM target."""
