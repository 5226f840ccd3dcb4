//! Times one solve: `cargo run --release -p dro_core --example timing -- N [G] [threads]`
//! (G = 0 for one global ball). Inputs mimic self-annotated pairs:
//! ξ = σ(0.1·|m|), m ~ N(0, 10) (a fixed LCG + Box–Muller, so runs repeat).
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let g: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
    let threads: Option<usize> = args.get(3).and_then(|s| s.parse().ok());
    let mut state = 42u64;
    let mut unif = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let xi: Vec<f64> = (0..n)
        .map(|_| {
            let z = (-2.0 * unif().ln()).sqrt() * (2.0 * std::f64::consts::PI * unif()).cos();
            1.0 / (1.0 + (-0.1 * (10.0 * z).abs()).exp())
        })
        .collect();
    let loss = dro_core::Loss::neg_log(6).unwrap();
    let groups = if g == 0 { dro_core::Groups::Global } else { dro_core::Groups::Chunks(g) };
    let opts = dro_core::Options { support: None, threads };
    for _ in 0..5 {
        let t = Instant::now();
        let s = dro_core::solve(&xi, 0.01, groups, &loss, &opts).unwrap();
        println!("n={n} g={g} threads={threads:?}: {:.2} ms (value {:.12}, gap {:.1e})", t.elapsed().as_secs_f64() * 1e3, s.value, s.dual_gap());
    }
}
