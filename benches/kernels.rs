//! Criterion benches of the CUDA kernels, reporting bytes per second (criterion's Throughput::Bytes over the
//! bytes each launch must move) with the L2 cache warm and flushed. Times are device-event times on a GPU.
//! Without a GPU they run under the host emulation on reduced shapes, labelled `emu`: those numbers only track
//! the emulation itself, not the GPU (whose figures stay "not yet measured" until this runs on one).
//! `cage bench solver` prints the same kernels with the fraction of the copy bandwidth.

use cage::gpu::bench::{Cache, L2Flush, random_batch};
use cage::gpu::{EqOptions, Gpu, Logits, ValueType};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::time::Duration;

fn device() -> (Gpu, &'static str) {
    match Gpu::cuda(0) {
        Ok(g) => (g, "gpu"),
        Err(e) => {
            eprintln!("benches/kernels: {e}; running the host emulation on reduced shapes (not GPU figures)");
            (Gpu::emulated(), "emu")
        }
    }
}

/// Times `iters` launches of `run`, flushing L2 before each with `flush` for `Cache::Flushed`; device time only.
fn timed(gpu: &mut Gpu, flush: &L2Flush, cache: Cache, iters: u64, run: &mut dyn FnMut(&mut Gpu)) -> Duration {
    let mut total = 0.0;
    for _ in 0..iters {
        if cache == Cache::Flushed {
            flush.run(gpu).unwrap();
        }
        gpu.device().timer_start().unwrap();
        run(gpu);
        total += gpu.device().timer_stop().unwrap();
    }
    Duration::from_secs_f64(total * 1e-3)
}

fn kernels(c: &mut Criterion) {
    let (mut gpu, tag) = device();
    let flush = L2Flush::new(&mut gpu).unwrap();
    let emu = gpu.is_emulated();
    let eq_shapes: &[(usize, usize, usize, ValueType)] = if emu {
        &[(1, 50, 4, ValueType::F32), (2, 2048, 2, ValueType::Bf16)]
    } else {
        &[(1, 50, 4, ValueType::F32), (64, 50, 4, ValueType::F32), (64, 128_256, 4, ValueType::Bf16)]
    };
    let mut g = c.benchmark_group(format!("equilibrium/{tag}"));
    if emu {
        g.sample_size(10).warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_secs(1));
    }
    for &(rows, n, j, values) in eq_shapes {
        let batch = random_batch(rows, n, j, 1).unwrap();
        let job =
            gpu.prepare_equilibrium(&batch, &EqOptions { values, incentives: false, ..EqOptions::default() }).unwrap();
        g.throughput(Throughput::Bytes(job.bytes_moved() as u64));
        for cache in [Cache::Warm, Cache::Flushed] {
            let id = BenchmarkId::new(format!("{cache:?}"), format!("B{rows}_N{n}_J{j}_{values:?}"));
            g.bench_function(id, |b| {
                b.iter_custom(|iters| timed(&mut gpu, &flush, cache, iters, &mut |g| g.run_equilibrium(&job).unwrap()))
            });
        }
    }
    g.finish();

    let cand_shapes: &[(usize, usize, Option<usize>)] = if emu {
        &[(2, 8192, Some(50)), (2, 8192, None)]
    } else {
        &[(1, 152_064, Some(50)), (64, 128_256, Some(50)), (64, 128_256, None)]
    };
    let mut g = c.benchmark_group(format!("candidates/{tag}"));
    if emu {
        g.sample_size(10).warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_secs(1));
    }
    for &(rows, vocab, k) in cand_shapes {
        let x: Vec<half::bf16> =
            (0..rows * vocab).map(|i| half::bf16::from_f32(((i * 7919) % 1000) as f32 * 0.01)).collect();
        let job = gpu.prepare_candidates(Logits::Bf16(&x), rows, vocab, k).unwrap();
        g.throughput(Throughput::Bytes(job.bytes_moved() as u64));
        for cache in [Cache::Warm, Cache::Flushed] {
            let id = BenchmarkId::new(format!("{cache:?}"), format!("B{rows}_V{vocab}_k{k:?}"));
            g.bench_function(id, |b| {
                b.iter_custom(|iters| timed(&mut gpu, &flush, cache, iters, &mut |g| g.run_candidates(&job).unwrap()))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
