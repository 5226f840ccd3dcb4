//! Group step: the fractional knapsack over the pooled hull edges of a group.
//!
//! Edges are taken in order of decreasing slope while the budget lasts; the
//! slope where the budget runs out is the multiplier λ*. Only λ* is needed
//! (everything above it is taken whole, the edges exactly at λ* share what is
//! left in sample order), so it is found by a weighted selection in expected
//! linear time instead of a sort.

/// Where the budget runs out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Threshold {
    /// The slope λ* of the edges that share the rest of the budget.
    pub slope: f64,
    /// The total cost of the edges strictly steeper than λ* (taken whole).
    pub above: f64,
    /// How many edges have slope exactly λ*.
    pub ties: usize,
}

/// The threshold slope t of the edges `(slope, cost)`: the sum of the costs of
/// edges with slope > t is at most `budget`, and adding the edges with slope
/// = t exceeds it. `None` when all edges together fit into the budget.
///
/// Reorders `items`. Deterministic: the result depends only on the order of
/// `items` as given, never on threads.
pub(crate) fn threshold(items: &mut [(f64, f64)], budget: f64) -> Option<Threshold> {
    let t = threshold_slope(items, budget)?;
    // one more pass in the given order: what is above, how many tie
    let (mut above, mut ties) = (0.0, 0usize);
    for &(s, c) in items.iter() {
        if s > t {
            above += c;
        } else if s == t {
            ties += 1;
        }
    }
    Some(Threshold { slope: t, above, ties })
}

fn threshold_slope(items: &mut [(f64, f64)], budget: f64) -> Option<f64> {
    let total: f64 = items.iter().map(|e| e.1).sum();
    if total <= budget {
        return None;
    }
    // From here on the answer is a slope: `total` decided that the edges do
    // not all fit, and nothing below may overrule it. Invariant: `above`, the
    // cost of items[..lo] (all steeper than the range), is a sum that was
    // itself compared with the budget and found to fit. The same floating
    // value is compared and then kept (`with_gt`, `with_eq` below): computing
    // it again in another association order could round it past the budget,
    // after which a range with nothing above its pivot would look "full" and
    // the search would end without an answer.
    let mut lo = 0usize; // items[..lo] are known to be strictly above the range
    let mut hi = items.len();
    let mut above = 0.0f64; // their cost, <= budget
    let mut rounds = 0u32;
    loop {
        debug_assert!(hi > lo && above <= budget);
        rounds += 1;
        if rounds > 64 {
            // pathological pivots: finish the remaining range by sorting it
            let rest = &mut items[lo..hi];
            rest.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
            let mut acc = above;
            let mut i = 0;
            while i < rest.len() {
                let s = rest[i].0;
                let mut j = i;
                let mut eq = 0.0;
                while j < rest.len() && rest[j].0 == s {
                    eq += rest[j].1;
                    j += 1;
                }
                let with_eq = acc + eq;
                if with_eq > budget {
                    return Some(s);
                }
                acc = with_eq;
                i = j;
            }
            return Some(rest[rest.len() - 1].0);
        }
        let pivot = median3(items[lo].0, items[lo + (hi - lo) / 2].0, items[hi - 1].0);
        // three-way partition of items[lo..hi] into > pivot, == pivot, < pivot
        let (mut gt, mut i, mut lt) = (lo, lo, hi);
        let (mut w_gt, mut w_eq) = (0.0f64, 0.0f64);
        while i < lt {
            let s = items[i].0;
            if s > pivot {
                w_gt += items[i].1;
                items.swap(gt, i);
                gt += 1;
                i += 1;
            } else if s < pivot {
                lt -= 1;
                items.swap(i, lt);
            } else {
                w_eq += items[i].1;
                i += 1;
            }
        }
        let with_gt = above + w_gt;
        let with_eq = with_gt + w_eq;
        if with_gt > budget {
            // gt > lo here: w_gt > 0 because `above` <= budget
            hi = gt;
        } else if with_eq > budget || lt == hi {
            // the budget runs out at the pivot; or nothing is left below it
            // (the partial sums fit where `total` did not: rounding), and the
            // smallest slope is where it runs out
            return Some(pivot);
        } else {
            above = with_eq;
            lo = lt;
        }
    }
}

#[inline]
fn median3(a: f64, b: f64, c: f64) -> f64 {
    if (a <= b) == (b <= c) {
        b
    } else if (b <= a) == (a <= c) {
        a
    } else {
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(items: &[(f64, f64)], budget: f64) -> Option<f64> {
        let mut v = items.to_vec();
        v.sort_by(|a, b| b.0.total_cmp(&a.0));
        let total: f64 = v.iter().map(|e| e.1).sum();
        if total <= budget {
            return None;
        }
        let mut slopes: Vec<f64> = v.iter().map(|e| e.0).collect();
        slopes.dedup();
        for s in slopes {
            let above: f64 = v.iter().filter(|e| e.0 > s).map(|e| e.1).sum();
            let eq: f64 = v.iter().filter(|e| e.0 == s).map(|e| e.1).sum();
            if above <= budget && above + eq > budget {
                return Some(s);
            }
        }
        unreachable!()
    }

    #[test]
    fn matches_sorting_on_small_integer_instances() {
        // integer slopes and costs: sums are exact, so the answer is unique
        let mut state = 12345u64;
        let mut rnd = |m: u64| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) % m
        };
        for _ in 0..2000 {
            let n = 1 + rnd(40) as usize;
            let items: Vec<(f64, f64)> = (0..n).map(|_| (rnd(8) as f64 + 1.0, rnd(5) as f64 + 1.0)).collect();
            let budget = rnd(60) as f64;
            let mut work = items.clone();
            assert_eq!(threshold(&mut work, budget).map(|t| t.slope), brute(&items, budget), "{items:?} {budget}");
        }
    }

    /// The costs of the edges above t and at t, summed in a fixed order.
    fn sums_at(items: &[(f64, f64)], t: f64) -> (f64, f64) {
        let above = items.iter().filter(|e| e.0 > t).map(|e| e.1).sum();
        let eq = items.iter().filter(|e| e.0 == t).map(|e| e.1).sum();
        (above, eq)
    }

    #[test]
    fn decimal_costs_and_heavy_ties_in_any_order() {
        // Costs that are not exact in binary (multiples of 0.1), few distinct
        // slopes, budgets hit exactly by a sum of costs, and many orders of
        // the same items: the selection's partial sums round differently in
        // each order. Whatever the order, the answer must be a slope where
        // the budget runs out, up to rounding, and never `None` (everything
        // fits) when the costs exceed the budget. This is the shape of the
        // issue-8 instance (ξ on a 0.1 grid, the budget used up exactly by
        // the edges above the threshold).
        let mut state = 777u64;
        let mut rnd = |m: u64| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) % m
        };
        for case in 0..3000 {
            let n = 2 + rnd(120) as usize;
            let distinct = 1 + rnd(8);
            let mut items: Vec<(f64, f64)> =
                (0..n).map(|_| (1.0 + rnd(distinct) as f64 * 0.37, (1 + rnd(10)) as f64 / 10.0)).collect();
            let total: f64 = items.iter().map(|e| e.1).sum();
            // budgets: a prefix sum of the slope-sorted costs (hit exactly), or a decimal one
            let budget = if case % 2 == 0 {
                let mut v = items.clone();
                v.sort_by(|a, b| b.0.total_cmp(&a.0));
                let k = rnd(n as u64) as usize;
                v[..k].iter().map(|e| e.1).sum::<f64>()
            } else {
                rnd((total * 10.0) as u64 + 1) as f64 / 10.0
            };
            for _ in 0..8 {
                // shuffle
                for i in (1..items.len()).rev() {
                    let j = rnd(i as u64 + 1) as usize;
                    items.swap(i, j);
                }
                let mut work = items.clone();
                let got = threshold(&mut work, budget);
                let tol = 1e-12 * total.max(1.0);
                match got {
                    None => assert!(total <= budget + tol, "None with total {total} > budget {budget}: {items:?}"),
                    Some(t) => {
                        let (above, eq) = sums_at(&items, t.slope);
                        assert!(above <= budget + tol, "above {above} > budget {budget}");
                        assert!(above + eq >= budget - tol, "above+eq {} < budget {budget}", above + eq);
                        assert!((t.above - above).abs() <= tol);
                    }
                }
            }
        }
    }
}
