//! Transformer runtime: Llama-family models (Llama 1/2/3, TinyLlama, SmolLM2, Mistral, Qwen2) from
//! safetensors, on the CPU in f32 or on a GPU (bf16 weights), with PEFT LoRA adapters merged or unmerged, and GGUF import.
//!
//! Layout: [`config`] reads `config.json`, [`weights`] memory-maps safetensors, [`llama`] holds the weights ([`weight`]: f32 or their stored
//! format, multiplied by [`weight_kernels`]),
//! [`lora`] loads adapters, [`memory`] checks that a model fits before it loads, [`forward`] runs batches with a KV cache behind the [`forward::Decoder`] trait
//! (the seam for other backends), [`gptq`] loads GPTQ / AWQ int4 folders as stored, [`gpu`] runs the same batches on a CUDA device ([`GpuDecoder`]), [`score`] reads reward models' score heads, [`tokenizer`] tokenizes and renders chat templates, [`gguf`] and [`import`]
//! turn llama.cpp files into model folders ([`kquant`] multiplies their K-quant blocks directly), [`synthetic`] draws random models of real shapes in memory (benchmarks), [`fetch`] gets the default model, [`cli`] implements the
//! `cage` subcommands.

pub mod bench;
pub mod cli;
pub mod config;
pub mod devquant;
pub mod fetch;
pub mod forward;
pub mod gguf;
pub mod gptq;
pub mod gpu;
pub mod import;
pub mod kquant;
pub mod linalg;
pub mod llama;
pub mod lora;
pub mod memory;
pub mod packed;
pub mod pblora;
pub mod score;
pub mod synthetic;
pub mod tokenizer;
pub mod weight;
pub mod weight_kernels;
pub mod weights;

pub use config::ModelConfig;
pub use forward::{CpuDecoder, Decoder, LogitsAt, Seq, greedy};
pub use gpu::GpuDecoder;
pub use llama::Model;
pub use lora::Adapter;
pub use pblora::Pblora;
pub use score::RewardModel;
pub use tokenizer::{PromptFormat, Tokenizer};
