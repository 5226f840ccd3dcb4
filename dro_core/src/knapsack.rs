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
    let mut lo = 0usize; // items[..lo] are known to be strictly above the range
    let mut hi = items.len();
    let mut above = 0.0f64; // their cost
    let mut rounds = 0u32;
    while hi > lo {
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
                if acc + eq > budget {
                    return Some(s);
                }
                acc += eq;
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
        if above + w_gt > budget {
            hi = gt;
        } else if above + w_gt + w_eq > budget {
            return Some(pivot);
        } else {
            above += w_gt + w_eq;
            if lt == hi {
                // rounding: the order of summation made the rest fit; the
                // smallest slope is then where the budget runs out.
                return Some(pivot);
            }
            lo = lt;
        }
    }
    None
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
}
