"""The model: its config (HF field names, families' defaults and flags), the layers, the masks, the KV cache
and CausalLM, a plain PyTorch reference that every fast path is tested against. Imports nothing above it
but core.errors and core.kernels (the native matvec the layers may call for k-major fp32 weights)."""
