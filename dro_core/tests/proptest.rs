//! Property tests of the public API (`dro_core::{solve, Groups, Loss, Options}`),
//! complementing `properties.rs` with adversarial generators (ties, samples on
//! the bounds, non-contiguous labels, non-convex losses with arbitrary knots,
//! support overrides, ε from 0 to huge) and an optimality proof that does not
//! use the solver's own dual: the atoms are checked feasible and their value
//! recomputed, and the dual objective at the reported λ* is evaluated here by
//! brute force over {lo, hi, every knot, every sample}.
//!
//! Run with `cargo test -p dro_core --release`.

use dro_core::{solve, DroError, Groups, Loss, Options};
use proptest::prelude::*;

/// A loss together with every point where it may kink (for the brute-force dual).
#[derive(Clone, Debug)]
struct L {
    loss: Loss,
    knots: Vec<f64>,
}

fn losses() -> impl Strategy<Value = L> {
    prop_oneof![
        (1usize..11).prop_map(|k| L { loss: Loss::neg_log(k).unwrap(), knots: vec![] }),
        (1usize..11, 0.1f64..20.0).prop_map(|(k, m)| L { loss: Loss::softplus(k, -m, m).unwrap(), knots: vec![] }),
        // convex, with dominated and duplicated pieces now and then
        (prop::collection::vec((-6.0f64..6.0, -3.0f64..3.0), 1..11), any::<bool>()).prop_map(|(mut p, dup)| {
            if dup && p.len() > 1 {
                p[0] = (p[1].0, p[1].1 - 4.0); // dominated
                let last = p[p.len() - 2];
                *p.last_mut().unwrap() = last; // duplicate
            }
            L {
                loss: Loss::max_affine(p.iter().map(|x| x.0).collect(), p.iter().map(|x| x.1).collect()).unwrap(),
                knots: vec![],
            }
        }),
        // any continuous piecewise-linear function (mostly non-convex)
        (prop::collection::btree_set(-60i32..60, 2..10), prop::collection::vec(-3.0f64..3.0, 10)).prop_map(
            |(xs, ys)| {
                let x: Vec<f64> = xs.into_iter().map(|v| v as f64 / 20.0).collect();
                let y = ys[..x.len()].to_vec();
                L { loss: Loss::interpolate(x.clone(), y).unwrap(), knots: x }
            }
        ),
    ]
}

#[derive(Clone, Debug)]
enum G {
    Global,
    Chunks(usize),
    Labels(Vec<i64>),
}

impl G {
    fn groups(&self) -> Groups<'_> {
        match self {
            G::Global => Groups::Global,
            G::Chunks(g) => Groups::Chunks(*g),
            G::Labels(l) => Groups::Labels(l),
        }
    }
}

#[derive(Clone, Debug)]
struct Problem {
    l: L,
    xi: Vec<f64>,
    eps: f64,
    g: G,
    support: Option<(f64, f64)>,
}

/// Samples inside the support with ties and samples on the bounds; ε relative
/// to the width of the support, from 0 to huge; every group layout.
fn problems() -> impl Strategy<Value = Problem> {
    (
        losses(),
        prop::collection::vec((0.0f64..1.0, 0u8..8), 1..50),
        prop_oneof![Just(0.0), 1e-6f64..1e-3, 0.0f64..0.3, 0.3f64..2.0, Just(1e6)],
        0u8..3,
        1usize..20,
        prop::collection::vec(prop::sample::select(vec![0i64, 2, 3, 9, 1000]), 50),
        (any::<bool>(), -2.0f64..0.0, 0.0f64..2.0),
        any::<bool>(),
    )
        .prop_map(|(l, u, eps, gk, gsize, labels, (override_support, a, b), all_equal)| {
            let natural = l.loss.natural_support();
            let (lo, hi) = match natural {
                // a narrower support inside the natural one
                Some((nlo, nhi)) if override_support => {
                    (nlo + (nhi - nlo) * (a + 2.0) / 4.0, nhi - (nhi - nlo) * (2.0 - b) / 4.0)
                }
                Some(s) => s,
                None => (a * 2.0, b * 2.0),
            };
            let mut xi: Vec<f64> = u
                .iter()
                .map(|&(t, tag)| match tag {
                    0 => lo,
                    1 => hi,
                    2 => lo + 0.5 * (hi - lo), // ties
                    _ => (lo + t * (hi - lo)).clamp(lo, hi),
                })
                .collect();
            if all_equal {
                let v = xi[0];
                xi.iter_mut().for_each(|x| *x = v);
            }
            let n = xi.len();
            let g = match gk {
                0 => G::Global,
                1 => G::Chunks(gsize),
                _ => G::Labels(labels[..n].to_vec()),
            };
            // default support without a natural one is [-max|xi|, max|xi|]: pass ours
            let support = if override_support || natural.is_none() { Some((lo, hi)) } else { None };
            Problem { l, xi, eps: eps * (hi - lo).max(1e-3), g, support }
        })
}

fn opts(p: &Problem, threads: Option<usize>) -> Options {
    Options { support: p.support, threads }
}

fn members(group_index: &[usize], g: usize) -> Vec<usize> {
    (0..group_index.len()).filter(|&i| group_index[i] == g).collect()
}

/// max over {lo, hi, knots in range, every sample} of ℓ(c) − λ|c − ξ|: the dual
/// objective's inner maximum, by brute force.
fn inner_max(loss: &Loss, points: &[f64], xi: f64, lam: f64) -> f64 {
    points.iter().map(|&c| loss.eval(c) - lam * (c - xi).abs()).fold(f64::NEG_INFINITY, f64::max)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn optimal_by_an_independent_certificate(p in problems()) {
        let s = solve(&p.xi, p.eps, p.g.groups(), &p.l.loss, &opts(&p, None)).unwrap();
        let (lo, hi) = s.support;
        let scale = s.value.abs().max(1.0);
        prop_assert!(s.dual_gap() <= 1e-9 * scale, "gap {}", s.dual_gap());
        let mut points = vec![lo, hi];
        points.extend(p.l.knots.iter().copied().filter(|&k| k >= lo && k <= hi));
        points.extend(p.xi.iter().copied());
        let mut total = 0.0;
        for g in 0..s.group_sizes.len() {
            let m = members(&s.group_index, g);
            prop_assert_eq!(m.len(), s.group_sizes[g]);
            let nf = m.len() as f64;
            let (mut value, mut transport, mut emp, mut dual, mut split) = (0.0, 0.0, 0.0, 0.0, 0);
            for &i in &m {
                let (m0, m1) = (s.mass[2 * i], s.mass[2 * i + 1]);
                prop_assert!(m0 >= 0.0 && m1 >= 0.0, "negative mass at {}", i);
                prop_assert!((m0 + m1 - 1.0).abs() <= 1e-12, "row {} sums to {}", i, m0 + m1);
                if m0 > 0.0 && m1 > 0.0 {
                    split += 1;
                }
                for j in 0..2 {
                    let l = s.loc[2 * i + j];
                    prop_assert!(l >= lo && l <= hi, "atom {} outside [{}, {}]", l, lo, hi);
                    prop_assert_eq!(s.shift[2 * i + j], p.xi[i] - l);
                    value += s.mass[2 * i + j] * p.l.loss.eval(l);
                    transport += s.mass[2 * i + j] * (l - p.xi[i]).abs();
                }
                emp += p.l.loss.eval(p.xi[i]);
                dual += inner_max(&p.l.loss, &points, p.xi[i], s.lam[g]);
            }
            let (value, transport, emp) = (value / nf, transport / nf, emp / nf);
            let dual = s.lam[g] * p.eps + dual / nf;
            let gs = s.group_values[g].abs().max(1.0);
            prop_assert!(split <= 1, "group {} splits {} samples", g, split);
            prop_assert!(transport <= p.eps * (1.0 + 1e-9) + 1e-12, "transport {} > eps {}", transport, p.eps);
            prop_assert!((transport - s.budget_used[g]).abs() <= 1e-9 * p.eps.max(1e-3));
            prop_assert!((value - s.group_values[g]).abs() <= 1e-9 * gs, "atoms {} vs {}", value, s.group_values[g]);
            prop_assert!((emp - s.group_empirical_values[g]).abs() <= 1e-12 * gs);
            // primal feasible with value V and dual feasible with the same value: optimal
            prop_assert!((dual - s.group_values[g]).abs() <= 1e-9 * gs, "dual at lam {} vs {}", dual, s.group_values[g]);
            prop_assert!(s.lam[g] >= 0.0);
            // complementary slackness: a positive multiplier means the budget is spent
            if s.lam[g] > 0.0 {
                prop_assert!((s.budget_used[g] - p.eps).abs() <= 1e-9 * p.eps.max(1e-12), "lam {} but budget {} of {}", s.lam[g], s.budget_used[g], p.eps);
            }
            total += s.group_values[g] * nf;
        }
        prop_assert!((total / p.xi.len() as f64 - s.value).abs() <= 1e-12 * scale);
    }

    #[test]
    fn eps_zero_is_the_empirical_distribution(p in problems()) {
        let s = solve(&p.xi, 0.0, p.g.groups(), &p.l.loss, &opts(&p, None)).unwrap();
        prop_assert_eq!(s.value, s.empirical_value);
        prop_assert_eq!(&s.group_values, &s.group_empirical_values);
        for i in 0..p.xi.len() {
            prop_assert_eq!(s.mass[2 * i], 1.0);
            prop_assert_eq!(s.loc[2 * i], p.xi[i]);
        }
        prop_assert!(s.budget_used.iter().all(|&b| b == 0.0));
    }

    #[test]
    fn value_is_monotone_and_concave_in_eps(p in problems(), t in 0.0f64..1.0) {
        let e1 = p.eps;
        let e3 = p.eps * 2.0 + 0.05;
        let e2 = e1 + t * (e3 - e1);
        let v = |e: f64| solve(&p.xi, e, p.g.groups(), &p.l.loss, &opts(&p, None)).unwrap();
        let (a, b, c) = (v(e1), v(e2), v(e3));
        for g in 0..a.group_values.len() {
            let tol = 1e-10 * a.group_values[g].abs().max(1.0);
            prop_assert!(a.group_values[g] <= b.group_values[g] + tol);
            prop_assert!(b.group_values[g] <= c.group_values[g] + tol);
            // the value of an LP in its right-hand side is concave
            let chord = a.group_values[g] + t * (c.group_values[g] - a.group_values[g]);
            prop_assert!(b.group_values[g] >= chord - tol, "not concave: {} < {}", b.group_values[g], chord);
        }
    }

    #[test]
    fn huge_eps_moves_every_sample_to_its_best_point(p in problems()) {
        let s = solve(&p.xi, 1e12, p.g.groups(), &p.l.loss, &opts(&p, None)).unwrap();
        let (lo, hi) = s.support;
        let mut points = vec![lo, hi];
        points.extend(p.l.knots.iter().copied().filter(|&k| k >= lo && k <= hi));
        let best = points.iter().map(|&c| p.l.loss.eval(c)).fold(f64::NEG_INFINITY, f64::max);
        for i in 0..p.xi.len() {
            let want = best.max(p.l.loss.eval(p.xi[i]));
            let got = s.mass[2 * i] * p.l.loss.eval(s.loc[2 * i]) + s.mass[2 * i + 1] * p.l.loss.eval(s.loc[2 * i + 1]);
            prop_assert!((got - want).abs() <= 1e-12 * want.abs().max(1.0), "sample {}: {} vs {}", i, got, want);
        }
        prop_assert!(s.lam.iter().all(|&l| l == 0.0));
    }

    #[test]
    fn thread_count_changes_no_bit(p in problems(), threads in 2usize..5) {
        let one = solve(&p.xi, p.eps, p.g.groups(), &p.l.loss, &opts(&p, Some(1))).unwrap();
        let many = solve(&p.xi, p.eps, p.g.groups(), &p.l.loss, &opts(&p, Some(threads))).unwrap();
        let default = solve(&p.xi, p.eps, p.g.groups(), &p.l.loss, &opts(&p, None)).unwrap();
        prop_assert_eq!(&one, &many);
        prop_assert_eq!(&one, &default);
    }

    #[test]
    fn a_label_group_is_its_samples_solved_alone(p in problems()) {
        let labels: Vec<i64> = (0..p.xi.len()).map(|i| [7i64, 3, 7, 0][i % 4]).collect();
        let s = solve(&p.xi, p.eps, Groups::Labels(&labels), &p.l.loss, &opts(&p, None)).unwrap();
        let mut sorted = labels.clone();
        sorted.sort();
        sorted.dedup();
        prop_assert_eq!(&s.group_labels, &sorted);
        for (g, &lab) in sorted.iter().enumerate() {
            let idx: Vec<usize> = (0..p.xi.len()).filter(|&i| labels[i] == lab).collect();
            let xg: Vec<f64> = idx.iter().map(|&i| p.xi[i]).collect();
            let alone = solve(&xg, p.eps, Groups::Global, &p.l.loss, &Options { support: Some(s.support), threads: None }).unwrap();
            prop_assert_eq!(alone.value, s.group_values[g]);
            prop_assert_eq!(alone.lam[0], s.lam[g]);
            for (k, &i) in idx.iter().enumerate() {
                prop_assert_eq!(s.group_index[i], g);
                prop_assert_eq!(&s.loc[2 * i..2 * i + 2], &alone.loc[2 * k..2 * k + 2]);
                prop_assert_eq!(&s.mass[2 * i..2 * i + 2], &alone.mass[2 * k..2 * k + 2]);
            }
        }
    }

    /// Any finite input, however extreme (huge, subnormal, zero, negative zero),
    /// gives `Ok` or `Err`, never a panic; an `Ok` keeps every invariant that
    /// does not depend on the arithmetic staying finite.
    #[test]
    fn never_panics_on_finite_input(
        xi in prop::collection::vec(finite(), 0..12),
        eps in finite(),
        lo in finite(),
        hi in finite(),
        slopes in prop::collection::vec(finite(), 0..5),
        intercepts in prop::collection::vec(finite(), 0..5),
        gk in 0u8..4,
        g in 0usize..6,
        labels in prop::collection::vec(-1i64..4, 0..12),
        threads in 0usize..3,
    ) {
        let mut ls: Vec<Loss> = vec![Loss::neg_log(3).unwrap()];
        ls.extend(Loss::max_affine(slopes.clone(), intercepts.clone()).ok());
        let mut kx = slopes.clone();
        kx.sort_by(f64::total_cmp);
        kx.dedup();
        ls.extend(Loss::interpolate(kx.clone(), intercepts.iter().copied().cycle().take(kx.len()).collect()).ok());
        ls.extend(Loss::softplus(slopes.len(), lo, hi).ok());
        for loss in &ls {
            for support in [None, Some((lo, hi)), Some((lo.min(hi), lo.max(hi)))] {
                let groups = match gk {
                    0 => Groups::Global,
                    1 => Groups::Chunks(g),
                    _ => Groups::Labels(&labels),
                };
                let threads = if threads == 2 { None } else { Some(threads) };
                match solve(&xi, eps, groups, loss, &Options { support, threads }) {
                    Ok(s) => {
                        prop_assert!(!xi.is_empty() && eps >= 0.0 && threads != Some(0));
                        prop_assert_eq!(s.loc.len(), 2 * xi.len());
                        prop_assert_eq!(s.group_sizes.iter().sum::<usize>(), xi.len());
                        let (slo, shi) = s.support;
                        prop_assert!(s.loc.iter().all(|&l| l >= slo && l <= shi));
                        prop_assert!(s.mass.iter().all(|&m| m >= 0.0));
                    }
                    Err(e) => {
                        let arg = e.argument();
                        prop_assert!(["xi", "eps", "groups", "support", "threads"].contains(&arg), "{}", e);
                        prop_assert!(e.to_string().starts_with(arg));
                    }
                }
            }
        }
    }

    /// A non-finite sample is refused with its index; a non-finite ε too.
    #[test]
    fn non_finite_input_is_an_error_naming_the_index(
        mut xi in prop::collection::vec(0.0f64..1.0, 1..30),
        at in any::<prop::sample::Index>(),
        bad in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)],
    ) {
        let i = at.index(xi.len());
        xi[i] = bad;
        let loss = Loss::neg_log(6).unwrap();
        let e = solve(&xi, 0.01, Groups::Chunks(7), &loss, &Options::default()).unwrap_err();
        let is_xi = matches!(e, DroError::InvalidArgument { arg: "xi", .. });
        prop_assert!(is_xi, "{}", e);
        let msg = e.to_string();
        let needle = format!("xi[{i}]");
        prop_assert!(msg.contains(&needle), "{}", msg);
        xi[i] = 0.5;
        let e = solve(&xi, bad, Groups::Global, &loss, &Options::default()).unwrap_err();
        prop_assert_eq!(e.argument(), "eps");
    }
}

/// Finite f64 from the whole range: normal, subnormal, ±0.
fn finite() -> impl Strategy<Value = f64> {
    prop_oneof![
        prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL | prop::num::f64::ZERO,
        -3.0f64..3.0,
        prop::sample::select(vec![0.0, -0.0, 1.0, -1.0, f64::MAX, f64::MIN, f64::MIN_POSITIVE, 1e300, -1e300]),
    ]
}

/// Above `CHUNK` samples the groups run in parallel inside: the bits must not move.
#[test]
fn large_inputs_are_identical_at_any_thread_count() {
    let n = 3 * dro_core::CHUNK + 1234;
    let xi: Vec<f64> = (0..n).map(|i| 0.5 + ((i * 7919) % 997) as f64 / 2000.0).collect();
    let labels: Vec<i64> = (0..n).map(|i| ((i * 31) % 5) as i64 * 3).collect();
    let loss_pl = Loss::interpolate(vec![0.0, 0.3, 0.5, 0.8, 1.0], vec![2.0, 0.5, 1.5, 0.2, 0.1]).unwrap();
    for loss in [Loss::neg_log(6).unwrap(), loss_pl] {
        for groups in [Groups::Global, Groups::Chunks(100), Groups::Chunks(5000), Groups::Labels(&labels)] {
            for eps in [0.0, 1e-4, 0.01, 0.3] {
                let run = |t| {
                    solve(&xi, eps, groups, &loss, &Options { support: Some((0.0, 1.0)), threads: Some(t) }).unwrap()
                };
                let one = run(1);
                assert_eq!(one, run(2), "{groups:?} eps={eps}");
                assert_eq!(one, run(5), "{groups:?} eps={eps}");
                assert!(one.dual_gap() <= 1e-12 * one.value.abs().max(1.0));
            }
        }
    }
}

// --- issue 8: samples on a decimal grid, the support's bounds among them, heavy ties ---

/// The issue-8 instance: one group of 100 samples on the grid {0, 0.1, …, 1}
/// (two of them exactly at the support's lower bound 0), ε = 0.1. The old
/// selection answered "everything fits": every sample sent to 0, transport
/// 0.544 per sample against a budget of 0.1, λ* = 0 and a zero dual gap.
const ISSUE_8: &str =
    "74554476382172X7242X09572482915672749779X1649385X79473169844548276X982X87818187571392073345981196932";

fn grid_sample(c: char) -> f64 {
    if c == 'X' {
        1.0
    } else {
        c.to_digit(10).unwrap() as f64 / 10.0
    }
}

#[test]
fn issue_8_instance_is_feasible_and_proven() {
    let xi: Vec<f64> = ISSUE_8.chars().map(grid_sample).collect();
    let loss = Loss::neg_log(6).unwrap();
    let s = solve(&xi, 0.1, Groups::Global, &loss, &Options::default()).unwrap();
    let cert = s.certificate(&xi, &loss).unwrap();
    assert!(cert.is_optimal(), "{:?}: {cert:?}", cert.failures());
    assert!(s.budget_used[0] <= 0.1 + 1e-12, "transport {}", s.budget_used[0]);
    assert!(s.lam[0] > 0.0, "the budget binds: λ* must be positive");
    // the same values in the 1,000-sample layout of the report (G = 100)
    let mut big: Vec<f64> = (0..900).map(|i| ((i * 7) % 11) as f64 / 10.0).collect();
    big.splice(300..300, xi.iter().copied());
    let s = solve(&big, 0.1, Groups::Chunks(100), &loss, &Options::default()).unwrap();
    assert!(s.certificate(&big, &loss).unwrap().is_optimal());
}

/// A certificate catches what a zero dual gap does not: the issue-8 answer
/// (every sample at 0, λ = 0) has a zero gap and fails primal feasibility.
#[test]
fn certificate_rejects_the_issue_8_answer() {
    let xi: Vec<f64> = ISSUE_8.chars().map(grid_sample).collect();
    let loss = Loss::neg_log(6).unwrap();
    let mut s = solve(&xi, 0.1, Groups::Global, &loss, &Options::default()).unwrap();
    let n = xi.len();
    for (i, &x) in xi.iter().enumerate() {
        s.loc[2 * i] = 0.0;
        s.loc[2 * i + 1] = 0.0;
        s.mass[2 * i] = 1.0;
        s.mass[2 * i + 1] = 0.0;
        s.shift[2 * i] = x;
        s.shift[2 * i + 1] = x;
    }
    let v = loss.eval(0.0);
    s.lam[0] = 0.0;
    s.group_values[0] = v;
    s.value = v;
    s.group_dual_values[0] = v;
    s.dual_value = v;
    s.budget_used[0] = xi.iter().sum::<f64>() / n as f64;
    assert!(s.dual_gap() < 1e-12, "the bad answer's own gap is zero");
    let cert = s.certificate(&xi, &loss).unwrap();
    assert!(!cert.is_optimal());
    assert!(cert.failures().contains(&"budget_excess"), "{:?}", cert.failures());
}

fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed.wrapping_mul(2862933555777941757).wrapping_add(3037000493);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        p.swap(i, ((state >> 33) % (i as u64 + 1)) as usize);
    }
    p
}

/// Samples on a decimal grid of the support (ends included), few distinct
/// values, ε on a decimal grid: the family of issue 8, with the paper's loss
/// and margin-space losses.
fn grid_problems() -> impl Strategy<Value = (Loss, Vec<f64>, f64, Option<usize>, u64)> {
    (
        prop_oneof![
            (1usize..9).prop_map(|k| Loss::neg_log(k).unwrap()),
            (2usize..7, 1u8..6).prop_map(|(k, m)| Loss::softplus(k, -(m as f64), m as f64).unwrap()),
        ],
        prop::collection::vec(0u32..=10, 1..160),
        1u32..12,
        prop_oneof![Just(None), (5usize..60).prop_map(Some)],
        any::<u64>(),
        (any::<bool>(), 0.0f64..1.0),
    )
        .prop_map(|(loss, grid, e, g, seed, (exact, frac))| {
            let (lo, hi) = loss.natural_support().unwrap();
            let xi: Vec<f64> =
                grid.iter().map(|&k| if k == 10 { hi } else { lo + (hi - lo) * k as f64 / 10.0 }).collect();
            let eps = if exact {
                // a budget that the j nearest-to-lo samples' full moves spend exactly,
                // written as a user would type it (a decimal): the selection's partial
                // sums then land on the budget itself, up to one rounding
                let mut k: Vec<u32> = grid.clone();
                k.sort();
                let j = ((k.len() as f64) * frac) as usize;
                let tenths: u32 = k[..j].iter().sum();
                (hi - lo) * tenths as f64 / 10.0 / k.len() as f64
            } else {
                (hi - lo) * e as f64 / 40.0
            };
            (loss, xi, eps, g, seed)
        })
}

fn groups_of(g: Option<usize>) -> Groups<'static> {
    g.map_or(Groups::Global, Groups::Chunks)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Every answer on the grid family is proven, in any order of the samples
    /// inside their groups, and the values do not depend on that order.
    #[test]
    fn grid_instances_are_proven_in_any_order((loss, xi, eps, g, seed) in grid_problems()) {
        let s = solve(&xi, eps, groups_of(g), &loss, &Options::default()).unwrap();
        let cert = s.certificate(&xi, &loss).unwrap();
        prop_assert!(cert.is_optimal(), "{:?}: {:?}", cert.failures(), cert);
        // permute inside each group (chunks keep their members)
        let size = g.unwrap_or(xi.len());
        let mut perm: Vec<usize> = Vec::with_capacity(xi.len());
        for (c, start) in (0..xi.len()).step_by(size).enumerate() {
            let m = size.min(xi.len() - start);
            perm.extend(shuffled(m, seed ^ c as u64).into_iter().map(|k| start + k));
        }
        let xp: Vec<f64> = perm.iter().map(|&i| xi[i]).collect();
        let sp = solve(&xp, eps, groups_of(g), &loss, &Options::default()).unwrap();
        let cert = sp.certificate(&xp, &loss).unwrap();
        prop_assert!(cert.is_optimal(), "permuted: {:?}: {:?}", cert.failures(), cert);
        let tol = 1e-12 * s.value.abs().max(1.0);
        prop_assert!((s.value - sp.value).abs() <= tol, "{} vs {}", s.value, sp.value);
        for k in 0..s.group_values.len() {
            prop_assert!((s.group_values[k] - sp.group_values[k]).abs() <= tol);
            prop_assert!((s.budget_used[k] - sp.budget_used[k]).abs() <= 1e-12 * eps.max(1.0));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Permuting the samples inside their groups permutes the answer: the
    /// values and λ* stay, and every sample keeps its atoms — except samples
    /// whose edge lies exactly at the threshold slope λ*, which share what
    /// is left of the budget in sample order (so the order decides which of
    /// them moves; the totals do not change). With the paper's loss each
    /// sample has one edge, to the support's lower end, of slope
    /// (ℓ(0) − ℓ(ξ))/ξ, and every sample of the first tangent piece has the
    /// same slope k: such ties are the rule, not the exception.
    #[test]
    fn permuting_a_group_permutes_its_atoms(
        xs in prop::collection::vec(prop_oneof![0.0f64..1.0, (0u32..=10).prop_map(|k| k as f64 / 10.0)], 1..60),
        k in 1usize..9,
        eps in 0.0f64..0.6,
        seed in any::<u64>(),
    ) {
        let loss = Loss::neg_log(k).unwrap();
        let s = solve(&xs, eps, Groups::Global, &loss, &Options::default()).unwrap();
        let perm = shuffled(xs.len(), seed);
        let xp: Vec<f64> = perm.iter().map(|&i| xs[i]).collect();
        let sp = solve(&xp, eps, Groups::Global, &loss, &Options::default()).unwrap();
        prop_assert!(sp.certificate(&xp, &loss).unwrap().is_optimal());
        prop_assert!((s.value - sp.value).abs() <= 1e-12 * s.value.abs().max(1.0));
        prop_assert!((s.lam[0] - sp.lam[0]).abs() <= 1e-12 * s.lam[0].max(1.0));
        let lam = s.lam[0];
        for (p, &i) in perm.iter().enumerate() {
            let a = [s.loc[2 * i], s.loc[2 * i + 1], s.mass[2 * i], s.mass[2 * i + 1]];
            let b = [sp.loc[2 * p], sp.loc[2 * p + 1], sp.mass[2 * p], sp.mass[2 * p + 1]];
            if (0..4).all(|j| (a[j] - b[j]).abs() <= 1e-9) {
                continue;
            }
            let x = xs[i];
            let edge = (loss.eval(0.0) - loss.eval(x)) / x;
            prop_assert!(x > 0.0 && (edge - lam).abs() <= 1e-9 * lam.max(1.0),
                "sample {} (xi {}) moved differently ({:?} vs {:?}) with its edge {} off lambda* {}", i, x, a, b, edge, lam);
        }
    }
}
