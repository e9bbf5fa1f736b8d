"""Benchmarks: serving against the engine and PyTorch, runtime LoRA, reload, build cost (python -m bench)."""
