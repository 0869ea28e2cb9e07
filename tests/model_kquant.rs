//! The K-quant blocks (Q4_K, Q5_K, Q6_K) against gguf-py: tests/fixtures/golden-kquant.json holds random valid
//! blocks and the values gguf-py 0.19.0 dequantizes them to (`scripts/make_fixtures.py kquant`). cage must
//! dequantize them bit for bit, and its block kernels must multiply like an f64 product over those values.

use cage::model::gguf::{GgmlType, dequantize_into};
use cage::model::kquant;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct Golden {
    types: BTreeMap<String, Case>,
}

#[derive(Deserialize)]
struct Case {
    id: u32,
    blocks: String,
    bits: Vec<u32>,
}

/// (type, raw blocks, gguf-py's values) per K-quant type.
fn golden() -> Vec<(GgmlType, Vec<u8>, Vec<f32>)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/golden-kquant.json");
    let g: Golden = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(g.types.len(), 3);
    g.types
        .into_iter()
        .map(|(name, c)| {
            let ty = GgmlType::from_id(c.id).unwrap_or_else(|| panic!("{name}: ggml type {} not supported", c.id));
            let raw =
                (0..c.blocks.len() / 2).map(|i| u8::from_str_radix(&c.blocks[2 * i..2 * i + 2], 16).unwrap()).collect();
            (ty, raw, c.bits.into_iter().map(f32::from_bits).collect())
        })
        .collect()
}

#[test]
fn dequantize_matches_gguf_py_bit_for_bit() {
    let g = golden();
    let names: Vec<GgmlType> = g.iter().map(|c| c.0).collect();
    assert_eq!(names, [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K]);
    for (ty, raw, want) in g {
        assert_eq!(raw.len() / ty.block().1 * ty.block().0, want.len(), "{ty:?}: golden sizes");
        let mut got = vec![f32::NAN; want.len()];
        dequantize_into(ty, &raw, &mut got);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{ty:?} weight {i}: {a} vs gguf-py {b}");
        }
    }
}

/// A `[n, k]` matrix assembled from the golden blocks (row `o`, block `b` is golden block `(3 o + 5 b) mod 8`)
/// and its values from gguf-py.
fn matrix(raw: &[u8], vals: &[f32], bytes: usize, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let nb = k / kquant::QK_K;
    let count = raw.len() / bytes;
    let (mut w, mut v) = (Vec::new(), Vec::new());
    for o in 0..n {
        for b in 0..nb {
            let g = (3 * o + 5 * b) % count;
            w.extend_from_slice(&raw[g * bytes..(g + 1) * bytes]);
            v.extend_from_slice(&vals[g * kquant::QK_K..(g + 1) * kquant::QK_K]);
        }
    }
    (w, v)
}

/// Every tile split of the rows of x (1 to 8, then a second tile), an output count that leaves a partial
/// parallel chunk, accumulation with a scale: against `out0 + alpha * sum w x` in f64 over gguf-py's values.
/// The only difference the kernel may make is f32 summation order, bounded relative to `sum |w x|`.
#[test]
fn matmul_matches_an_f64_product_of_the_gguf_py_values() {
    let (n, k, alpha) = (37, 3 * kquant::QK_K, 0.5f32);
    for (ty, raw, vals) in golden() {
        let (w, wv) = matrix(&raw, &vals, ty.block().1, n, k);
        let mut worst = 0f64;
        for m in 1..=9 {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1000) as f32 * 0.0137).sin()).collect();
            let out0: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.31).cos()).collect();
            let mut got = out0.clone();
            kquant::matmul_t(ty, &w, &x, m, k, n, &mut got, true, alpha).unwrap();
            for r in 0..m {
                for o in 0..n {
                    let terms = (0..k).map(|i| wv[o * k + i] as f64 * x[r * k + i] as f64);
                    let (dot, mag) = terms.fold((0f64, 0f64), |(s, a), t| (s + t, a + t.abs()));
                    let want = out0[r * n + o] as f64 + alpha as f64 * dot;
                    let err = (got[r * n + o] as f64 - want).abs() / (alpha as f64 * mag + 1.0);
                    assert!(err < 1e-6, "{ty:?} m = {m} row {r} out {o}: {} vs {want}", got[r * n + o]);
                    worst = worst.max(err);
                }
            }
        }
        println!("{ty:?}: largest error {worst:.1e} of sum |w x|");
    }
    // Without accumulation the output is overwritten, whatever it held.
    let (ty, raw, vals) = &golden()[0];
    let (w, wv) = matrix(raw, vals, ty.block().1, 3, kquant::QK_K);
    let x = vec![1f32; kquant::QK_K];
    let mut got = vec![f32::NAN; 3];
    kquant::matmul_t(*ty, &w, &x, 1, kquant::QK_K, 3, &mut got, false, 1.0).unwrap();
    for (o, g) in got.iter().enumerate() {
        let want: f64 = wv[o * kquant::QK_K..(o + 1) * kquant::QK_K].iter().map(|&v| v as f64).sum();
        assert!((*g as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "row {o}: {g} vs {want}");
    }
}

/// The 8-bit-activation kernel (llama.cpp's Q8_K choice) against the same f64 product: x is rounded to
/// `dx * q` with `dx = max |x| / 127` per 256 values, so each output may be off by at most
/// `sum over blocks of dx / 2 * sum |w|` (plus f32 rounding); the error is also printed relative to `sum |w x|`.
#[test]
fn q8k_matmul_error_is_bounded_by_the_rounding_of_x() {
    let (n, k, alpha) = (37, 3 * kquant::QK_K, 0.5f32);
    let (ty, raw, vals) = &golden()[0];
    assert_eq!(*ty, GgmlType::Q4K);
    let (w, wv) = matrix(raw, vals, ty.block().1, n, k);
    let (mut worst, mut sq, mut count) = (0f64, 0f64, 0usize);
    for m in 1..=9 {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1000) as f32 * 0.0137).sin()).collect();
        let out0: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.31).cos()).collect();
        let mut got = out0.clone();
        kquant::matmul_t_q8k(*ty, &w, &x, m, k, n, &mut got, true, alpha).unwrap();
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            for o in 0..n {
                let wr = &wv[o * k..(o + 1) * k];
                let (mut dot, mut mag, mut bound) = (0f64, 0f64, 0f64);
                for (wb, xb) in wr.chunks_exact(kquant::QK_K).zip(xr.chunks_exact(kquant::QK_K)) {
                    let dx = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
                    bound += dx / 2.0 * wb.iter().map(|&v| (v as f64).abs()).sum::<f64>();
                    for (&a, &b) in wb.iter().zip(xb) {
                        dot += a as f64 * b as f64;
                        mag += (a as f64 * b as f64).abs();
                    }
                }
                let want = out0[r * n + o] as f64 + alpha as f64 * dot;
                let err = (got[r * n + o] as f64 - want).abs();
                let limit = alpha as f64 * (bound * (1.0 + 1e-6) + 1e-6 * mag) + 1e-6;
                assert!(err <= limit, "m = {m} row {r} out {o}: {} vs {want} (bound {limit})", got[r * n + o]);
                let rel = err / (alpha as f64 * mag);
                worst = worst.max(rel);
                sq += rel * rel;
                count += 1;
            }
        }
    }
    println!("Q4_K with 8-bit x: error of sum |w x|: largest {worst:.1e}, RMS {:.1e}", (sq / count as f64).sqrt());
}

/// The runtime reaches these kernels through `Weight` (a matrix kept as its GGUF blocks): at decode row counts
/// (the block kernel) and at prefill row counts (tiles expanded to f32, then the GEMM) the product must be the
/// f64 product of gguf-py's values, and a row read back (the embedding lookup, the GPU upload) must be its values.
#[test]
fn weights_kept_as_k_blocks_multiply_and_read_like_their_values() {
    use cage::model::weight::Weight;
    let (n, k) = (70, 2 * kquant::QK_K);
    for (ty, raw, vals) in golden() {
        let (w, wv) = matrix(&raw, &vals, ty.block().1, n, k);
        let weight = Weight::from_ggml(ty, &w);
        assert_eq!((weight.format(), weight.bytes(), weight.numel()), (Some(ty), w.len(), n * k));
        let mut row = vec![0f32; k];
        weight.row_into(5, k, &mut row);
        assert_eq!(row, wv[5 * k..6 * k], "{ty:?}: row 5");
        for m in [1, 4, 8, 9, 20] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 613 % 997) as f32 * 0.021).cos()).collect();
            let mut got = vec![f32::NAN; m * n];
            weight.matmul_t(&x, m, k, n, &mut got, false, 1.0);
            for r in 0..m {
                for o in 0..n {
                    let terms = (0..k).map(|i| wv[o * k + i] as f64 * x[r * k + i] as f64);
                    let (dot, mag) = terms.fold((0f64, 0f64), |(s, a), t| (s + t, a + t.abs()));
                    let err = (got[r * n + o] as f64 - dot).abs() / (mag + 1.0);
                    assert!(err < 1e-6, "{ty:?} m = {m} row {r} out {o}: {} vs {dot}", got[r * n + o]);
                }
            }
        }
    }
}
