//! Property tests of the public API: the certificate closes, atoms are
//! feasible, ε = 0 is the empirical value, the value grows with ε, the thread
//! count changes nothing, and arbitrary finite input never panics.

use dro_core::{solve, Groups, Loss, Options};
use proptest::prelude::*;

fn losses() -> impl Strategy<Value = Loss> {
    prop_oneof![
        (1usize..10).prop_map(|k| Loss::neg_log(k).unwrap()),
        (1usize..8, 0.5f64..8.0).prop_map(|(k, m)| Loss::softplus(k, -m, m).unwrap()),
        prop::collection::vec((-5.0f64..5.0, -2.0f64..2.0), 1..8).prop_map(|p| Loss::max_affine(
            p.iter().map(|x| x.0).collect(),
            p.iter().map(|x| x.1).collect()
        )
        .unwrap()),
        prop::collection::vec(-2.0f64..2.0, 2..8).prop_map(|y| {
            let x: Vec<f64> = (0..y.len()).map(|j| j as f64 - 3.0).collect();
            Loss::interpolate(x, y).unwrap()
        }),
    ]
}

/// Samples inside the loss's natural support, or in [-4, 4] when it has none.
fn problem() -> impl Strategy<Value = (Loss, Vec<f64>, f64, usize)> {
    (losses(), prop::collection::vec(0.0f64..1.0, 1..60), 0.0f64..0.5, 0usize..20).prop_map(|(loss, u, eps, g)| {
        let (lo, hi) = loss.natural_support().unwrap_or((-4.0, 4.0));
        let xi = u.iter().map(|t| lo + t * (hi - lo)).collect();
        (loss, xi, eps, g)
    })
}

fn groups(g: usize) -> Groups<'static> {
    if g == 0 {
        Groups::Global
    } else {
        Groups::Chunks(g)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn certificate_and_feasibility((loss, xi, eps, g) in problem()) {
        let s = solve(&xi, eps, groups(g), &loss, &Options::default()).unwrap();
        let scale = s.value.abs().max(1.0);
        prop_assert!(s.dual_gap() <= 1e-10 * scale, "gap {}", s.dual_gap());
        prop_assert!(s.value >= s.empirical_value - 1e-12 * scale);
        let (lo, hi) = s.support;
        let mut transport = vec![0.0; s.group_sizes.len()];
        for i in 0..xi.len() {
            let (m0, m1) = (s.mass[2 * i], s.mass[2 * i + 1]);
            prop_assert!(m0 >= 0.0 && m1 >= 0.0 && (m0 + m1 - 1.0).abs() <= 1e-12);
            for j in 0..2 {
                let l = s.loc[2 * i + j];
                prop_assert!(l >= lo && l <= hi);
                transport[s.group_index[i]] += s.mass[2 * i + j] * (l - xi[i]).abs();
            }
        }
        for (gi, t) in transport.iter().enumerate() {
            prop_assert!(t / s.group_sizes[gi] as f64 <= eps * (1.0 + 1e-9) + 1e-12);
        }
    }

    #[test]
    fn eps_zero_is_empirical((loss, xi, _eps, g) in problem()) {
        let s = solve(&xi, 0.0, groups(g), &loss, &Options::default()).unwrap();
        prop_assert_eq!(s.value, s.empirical_value);
        prop_assert!(s.mass.chunks(2).all(|m| m[0] == 1.0));
    }

    #[test]
    fn value_grows_with_eps((loss, xi, eps, g) in problem()) {
        let a = solve(&xi, eps, groups(g), &loss, &Options::default()).unwrap();
        let b = solve(&xi, eps * 2.0 + 1e-3, groups(g), &loss, &Options::default()).unwrap();
        prop_assert!(b.value >= a.value - 1e-12 * a.value.abs().max(1.0));
    }

    #[test]
    fn threads_change_nothing((loss, xi, eps, g) in problem()) {
        let one = solve(&xi, eps, groups(g), &loss, &Options { threads: Some(1), ..Default::default() }).unwrap();
        let two = solve(&xi, eps, groups(g), &loss, &Options { threads: Some(2), ..Default::default() }).unwrap();
        prop_assert_eq!(one, two);
    }

    #[test]
    fn never_panics(xi in prop::collection::vec(prop::num::f64::ANY, 0..20), eps in prop::num::f64::ANY,
                    g in 0usize..5, lo in prop::num::f64::ANY, hi in prop::num::f64::ANY,
                    labels in prop::collection::vec(-2i64..3, 0..20)) {
        let loss = Loss::neg_log(3).unwrap();
        for groups in [Groups::Global, Groups::Chunks(g), Groups::Labels(&labels)] {
            for support in [None, Some((lo, hi))] {
                let _ = solve(&xi, eps, groups, &loss, &Options { support, threads: None });
            }
        }
        let _ = Loss::softplus(3, lo, hi);
        let _ = Loss::interpolate(xi.clone(), xi.clone());
        let _ = Loss::max_affine(xi.clone(), xi);
    }
}

#[test]
fn large_global_ball_is_deterministic_across_threads() {
    // > CHUNK samples, many ties: the parallel path inside one group
    let xi: Vec<f64> = (0..50_000).map(|i| 0.5 + ((i * 7919) % 1000) as f64 / 2000.0).collect();
    let loss = Loss::neg_log(6).unwrap();
    let one = solve(&xi, 0.01, Groups::Global, &loss, &Options { threads: Some(1), ..Default::default() }).unwrap();
    let two = solve(&xi, 0.01, Groups::Global, &loss, &Options { threads: Some(2), ..Default::default() }).unwrap();
    assert_eq!(one, two);
    assert!(one.dual_gap() <= 1e-12);
}
