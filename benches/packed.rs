//! The packed (lossless Q4_1 / Q8_0) products of one SmolLM2-135M decode step without the rest of the forward
//! pass: 30 layers of q, k, v, o, gate, up, down (Q4_1, qkv and gate/up as one parallel loop each, as the
//! forward pass runs them) and the tied Q8_0 output head, at batch 1 and 4. The weights (~100 MB) do not fit
//! in the core's caches, as in a real step. Synthetic values of the right form (q * d + m, f16 d and m).

use cage::model::packed::{Packed, matmul_t_many};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

const H: usize = 576;
const KV: usize = 192;
const FFN: usize = 1536;
const VOCAB: usize = 49_152;
const LAYERS: usize = 30;

fn f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// A `[rows, cols]` matrix of exact Q4_1 (or Q8_0) values, packed.
fn matrix(rows: usize, cols: usize, seed: usize, q8: bool) -> Packed {
    let mut w = Vec::with_capacity(rows * cols);
    for b in 0..rows * cols / 32 {
        let h = b.wrapping_mul(2_654_435_761).wrapping_add(seed);
        let d = f16(0.002 + (h % 97) as f32 * 1e-4);
        let m = f16(-((h % 13) as f32) * 0.01);
        for j in 0..32 {
            let q = (j * 7 + h) % 16;
            if q8 {
                // q = 127 once per block so the block's scale is d.
                let q = if j == 5 { 127 } else { ((j * 37 + h) % 255) as i32 - 127 };
                w.push(q as f32 * d);
            } else {
                w.push(q as f32 * d + m);
            }
        }
    }
    Packed::try_pack(&w, cols).expect("packable")
}

struct Layer {
    q: Packed,
    k: Packed,
    v: Packed,
    o: Packed,
    gate: Packed,
    up: Packed,
    down: Packed,
}

fn step(
    layers: &[Layer],
    head: &Packed,
    m: usize,
    x: &[f32],
    x2: &[f32],
    bufs: &mut [Vec<f32>; 6],
    logits: &mut [f32],
) {
    let [q, k, v, o, g, u] = bufs;
    for l in layers {
        matmul_t_many(x, m, H, [(&l.q, H, &mut q[..]), (&l.k, KV, &mut k[..]), (&l.v, KV, &mut v[..])]);
        l.o.matmul_t(x, m, H, H, o, false, 1.0);
        matmul_t_many(x, m, H, [(&l.gate, FFN, &mut g[..]), (&l.up, FFN, &mut u[..])]);
        l.down.matmul_t(x2, m, FFN, H, o, false, 1.0);
    }
    head.matmul_t(x, m, H, VOCAB, logits, false, 1.0);
}

fn bench_packed(c: &mut Criterion) {
    let layers: Vec<Layer> = (0..LAYERS)
        .map(|i| Layer {
            q: matrix(H, H, 7 * i, false),
            k: matrix(KV, H, 7 * i + 1, false),
            v: matrix(KV, H, 7 * i + 2, false),
            o: matrix(H, H, 7 * i + 3, false),
            gate: matrix(FFN, H, 7 * i + 4, false),
            up: matrix(FFN, H, 7 * i + 5, false),
            down: matrix(H, FFN, 7 * i + 6, false),
        })
        .collect();
    let head = matrix(VOCAB, H, 999, true);
    let mut g = c.benchmark_group("packed_decode_step");
    g.sample_size(20);
    for m in [1usize, 4] {
        let x: Vec<f32> = (0..m * H).map(|i| (i as f32 * 0.37).sin()).collect();
        let x2: Vec<f32> = (0..m * FFN).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut bufs = [H, KV, KV, H, FFN, FFN].map(|n| vec![0f32; m * n]);
        let mut logits = vec![0f32; m * VOCAB];
        g.bench_function(format!("smollm2_135m/batch{m}"), |b| {
            // On a pool thread, as the forward pass runs (see `forward`).
            b.iter(|| rayon::scope(|_| step(&layers, &head, m, black_box(&x), &x2, &mut bufs, &mut logits)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_packed);
criterion_main!(benches);
