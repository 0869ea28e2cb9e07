//! Transformer runtime: Llama-family models from safetensors on CPU and GPU (see the runtime issue).
