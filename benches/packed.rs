//! The weight products of one SmolLM2-135M decode step without the rest of the forward pass, side by side in
//! the two forms a Q4_1 GGUF model can be decoded from: the packed copies (`packed`: lossless Q4_1 / Q8_0 copies
//! of the f32 import, f32 scales) and the GGUF blocks as the file holds them (`blocks`: `Weight::Quant`, f16
//! scales). 30 layers of q, k, v, o, gate, up, down (Q4_1, qkv and gate/up as one parallel loop each, as the
//! forward pass runs them) and the tied Q8_0 output head, at batch 1 and 4. The weights (~100 MB) do not fit
//! in the core's caches, as in a real step. Both forms hold the same synthetic blocks (f16 d and m).

use cage::model::gguf::{GgmlType, dequantize_into};
use cage::model::packed::{Packed, matmul_t_many};
use cage::model::weight::Weight;
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

const H: usize = 576;
const KV: usize = 192;
const FFN: usize = 1536;
const VOCAB: usize = 49_152;
const LAYERS: usize = 30;

/// A `[rows, cols]` matrix of pseudo-random Q4_1 (or Q8_0) blocks, as GGUF blocks and as their packed copy.
fn matrix(rows: usize, cols: usize, seed: usize, q8: bool) -> (Weight, Packed) {
    let mut raw = Vec::new();
    for b in 0..rows * cols / 32 {
        let h = b.wrapping_mul(2_654_435_761).wrapping_add(seed);
        let d = half::f16::from_f32(0.002 + (h % 97) as f32 * 1e-4);
        raw.extend_from_slice(&d.to_le_bytes());
        if q8 {
            // q = 127 once per block so that the block's scale is d (the packer derives it from the maximum).
            raw.extend((0..32).map(|j| if j == 5 { 127 } else { (((j * 37 + h) % 255) as i32 - 127) as i8 as u8 }));
        } else {
            raw.extend_from_slice(&half::f16::from_f32(-((h % 13) as f32) * 0.01).to_le_bytes());
            // Both 0 and 15 in every block, so that the packer finds the block's d and m.
            raw.extend(
                (0..16).map(|j| if j == 0 { 0xf0 } else { (((j * 7 + h) % 16) | ((j * 3 + h) % 16) << 4) as u8 }),
            );
        }
    }
    let ty = if q8 { GgmlType::Q8_0 } else { GgmlType::Q4_1 };
    let mut w = vec![0f32; rows * cols];
    dequantize_into(ty, &raw, &mut w);
    let p = Packed::try_pack(&w, cols).expect("packable");
    assert_eq!(matches!(p, Packed::Q8_0 { .. }), q8, "packed as the other format");
    (Weight::Quant { ty, raw }, p)
}

struct Layer<T> {
    q: T,
    k: T,
    v: T,
    o: T,
    gate: T,
    up: T,
    down: T,
}

type Bufs = [Vec<f32>; 6];

fn step_packed(layers: &[Layer<Packed>], head: &Packed, m: usize, x: &[f32], x2: &[f32], b: &mut Bufs, lg: &mut [f32]) {
    let [q, k, v, o, g, u] = b;
    for l in layers {
        matmul_t_many(x, m, H, [(&l.q, H, &mut q[..]), (&l.k, KV, &mut k[..]), (&l.v, KV, &mut v[..])]);
        l.o.matmul_t(x, m, H, H, o, false, 1.0);
        matmul_t_many(x, m, H, [(&l.gate, FFN, &mut g[..]), (&l.up, FFN, &mut u[..])]);
        l.down.matmul_t(x2, m, FFN, H, o, false, 1.0);
    }
    head.matmul_t(x, m, H, VOCAB, lg, false, 1.0);
}

fn step_blocks(layers: &[Layer<Weight>], head: &Weight, m: usize, x: &[f32], x2: &[f32], b: &mut Bufs, lg: &mut [f32]) {
    let [q, k, v, o, g, u] = b;
    for l in layers {
        Weight::matmul_t_many(x, m, H, [(&l.q, H, &mut q[..]), (&l.k, KV, &mut k[..]), (&l.v, KV, &mut v[..])]);
        l.o.matmul_t(x, m, H, H, o, false, 1.0);
        Weight::matmul_t_many(x, m, H, [(&l.gate, FFN, &mut g[..]), (&l.up, FFN, &mut u[..])]);
        l.down.matmul_t(x2, m, FFN, H, o, false, 1.0);
    }
    head.matmul_t(x, m, H, VOCAB, lg, false, 1.0);
}

fn bench_decode_step(c: &mut Criterion) {
    let (mut blocks, mut packed) = (vec![], vec![]);
    for i in 0..LAYERS {
        let [q, k, v, o, gate, up, down] = [(H, H), (KV, H), (KV, H), (H, H), (FFN, H), (FFN, H), (H, FFN)]
            .map(|(r, c)| matrix(r, c, 7 * i + r * 3 + c, false));
        blocks.push(Layer { q: q.0, k: k.0, v: v.0, o: o.0, gate: gate.0, up: up.0, down: down.0 });
        packed.push(Layer { q: q.1, k: k.1, v: v.1, o: o.1, gate: gate.1, up: up.1, down: down.1 });
    }
    let (head_blocks, head_packed) = matrix(VOCAB, H, 999, true);
    let mut g = c.benchmark_group("decode_step_smollm2_135m");
    g.sample_size(20);
    for m in [1usize, 4] {
        let x: Vec<f32> = (0..m * H).map(|i| (i as f32 * 0.37).sin()).collect();
        let x2: Vec<f32> = (0..m * FFN).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut bufs = [H, KV, KV, H, FFN, FFN].map(|n| vec![0f32; m * n]);
        let mut logits = vec![0f32; m * VOCAB];
        // On a pool thread, as the forward pass runs (see `forward`).
        g.bench_function(format!("packed/batch{m}"), |b| {
            b.iter(|| {
                rayon::scope(|_| step_packed(&packed, &head_packed, m, black_box(&x), &x2, &mut bufs, &mut logits))
            })
        });
        g.bench_function(format!("blocks/batch{m}"), |b| {
            b.iter(|| {
                rayon::scope(|_| step_blocks(&blocks, &head_blocks, m, black_box(&x), &x2, &mut bufs, &mut logits))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_decode_step);
criterion_main!(benches);
