//! The K-quant products of one layer of a 7B Llama at batch 1 and 4 (q, k, v, o 4096 x 4096; gate, up 11008 x
//! 4096; down 4096 x 11008), straight from random valid blocks: milliseconds per layer, the weight bytes read per
//! second, and the batch-1 decode rate of 32 such layers plus a 49152 x 4096 output head that this implies
//! (the rest of a step is small beside them). The layer's ~110 MB (Q4_K) does not fit in the caches, as in a
//! real step. Q4_K twice: with f32 activations ([`matmul_t`]) and with 8-bit ones ([`matmul_t_q8k`]).
//! `cargo bench --bench kquant`; RAYON_NUM_THREADS sets the threads.

use cage::model::gguf::GgmlType;
use cage::model::kquant::{QK_K, matmul_t, matmul_t_q8k};
use std::hint::black_box;
use std::time::Instant;

/// `[n, k]` random blocks of `ty` with small finite scales.
fn matrix(ty: GgmlType, n: usize, k: usize, seed: u64) -> Vec<u8> {
    let bytes = ty.block().1;
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut raw: Vec<u8> = (0..n * k / QK_K * bytes)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 32) as u8
        })
        .collect();
    let scale_at: &[usize] = if ty == GgmlType::Q6K { &[208] } else { &[0, 2] };
    for b in raw.chunks_exact_mut(bytes) {
        for &a in scale_at {
            b[a..a + 2].copy_from_slice(&half::f16::from_f32(1e-3).to_le_bytes());
        }
    }
    raw
}

fn main() {
    const H: usize = 4096;
    const FFN: usize = 11008;
    const LAYERS: f64 = 32.0;
    const VOCAB: usize = 49152;
    println!("{} threads", rayon::current_num_threads());
    type Product = fn(GgmlType, &[u8], &[f32], usize, usize, usize, &mut [f32], bool, f32) -> cage::Result<()>;
    let kernels: [(GgmlType, &str, Product); 4] = [
        (GgmlType::Q4K, "f32 x", matmul_t),
        (GgmlType::Q4K, "8-bit x", matmul_t_q8k),
        (GgmlType::Q5K, "f32 x", matmul_t),
        (GgmlType::Q6K, "f32 x", matmul_t),
    ];
    for (ty, act, matmul_t) in kernels {
        let shapes = [(H, H), (H, H), (H, H), (H, H), (FFN, H), (FFN, H), (H, FFN)];
        let mats: Vec<(Vec<u8>, usize, usize)> =
            shapes.iter().enumerate().map(|(i, &(n, k))| (matrix(ty, n, k, i as u64 + 1), n, k)).collect();
        let head = matrix(ty, VOCAB, H, 99);
        let bytes: usize = mats.iter().map(|m| m.0.len()).sum();
        for m in [1usize, 4] {
            let x: Vec<f32> = (0..m * FFN).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut out = vec![0f32; m * FFN.max(VOCAB)];
            let mut layer = f64::INFINITY;
            let mut head_s = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                for (raw, n, k) in &mats {
                    matmul_t(ty, raw, &x[..m * k], m, *k, *n, &mut out, false, 1.0).unwrap();
                }
                layer = layer.min(t.elapsed().as_secs_f64());
                let t = Instant::now();
                matmul_t(ty, &head, &x[..m * H], m, H, VOCAB, &mut out, false, 1.0).unwrap();
                head_s = head_s.min(t.elapsed().as_secs_f64());
                black_box(&out);
            }
            println!(
                "{ty:?} ({act}) batch {m}: {:.2} ms per 7B layer ({:.1} GB/s of blocks), head {:.1} ms; 32 layers + head: {:.2} decode steps/s",
                layer * 1e3,
                bytes as f64 / layer / 1e9,
                head_s * 1e3,
                1.0 / (LAYERS * layer + head_s)
            );
        }
    }
}
