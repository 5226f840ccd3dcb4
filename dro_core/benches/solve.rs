//! Criterion benches of the follower: `cargo bench -p dro_core --bench solve`.
//! Inputs mimic self-annotated pairs: ξ = σ(0.1·|m|), m ~ N(0, 10²), ε = 0.01, K = 6.
//!
//! On a small machine run a filter or the quick mode, e.g.
//! `cargo bench -p dro_core --bench solve -- --quick` (about a minute on 2 cores) or
//! `cargo bench -p dro_core --bench solve -- 58K`.
//! The "threads: all" cases use rayon's global pool (one thread per core).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dro_core::{solve, Groups, Loss, Options};

/// Deterministic inputs (an LCG and Box–Muller), shared by every bench.
fn self_annotated(n: usize, seed: u64) -> Vec<f64> {
    let mut state = seed;
    let mut unif = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let z = (-2.0 * unif().ln()).sqrt() * (2.0 * std::f64::consts::PI * unif()).cos();
            1.0 / (1.0 + (-0.1 * (10.0 * z).abs()).exp())
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let loss = Loss::neg_log(6).unwrap();
    // (name, N, G (0: one global ball), threads, criterion sample size)
    let cases: [(&str, usize, usize, Option<usize>, usize); 8] = [
        ("58K/G100", 58_000, 100, None, 50),
        ("58K/G100/1thread", 58_000, 100, Some(1), 50),
        ("1M/G100/1thread", 1_000_000, 100, Some(1), 20),
        ("1M/G100/2threads", 1_000_000, 100, Some(2), 20),
        ("1M/global", 1_000_000, 0, None, 20),
        ("1M/global/1thread", 1_000_000, 0, Some(1), 20),
        ("10M/global", 10_000_000, 0, None, 10),
        ("10M/G100", 10_000_000, 100, None, 10),
    ];
    let mut group = c.benchmark_group("solve");
    for (name, n, g, threads, samples) in cases {
        let xi = self_annotated(n, 42);
        let groups = if g == 0 { Groups::Global } else { Groups::Chunks(g) };
        let opts = Options { support: None, threads };
        group.throughput(Throughput::Elements(n as u64));
        group.sample_size(samples);
        group.bench_with_input(BenchmarkId::from_parameter(name), &xi, |b, xi| {
            b.iter(|| black_box(solve(black_box(xi), 0.01, groups, &loss, &opts).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
