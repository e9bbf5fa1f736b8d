"""Demo sources made locally (no hub is reachable here): a tiny Llama base model and LoRA adapters."""
