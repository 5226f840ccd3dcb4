//! Per-sample step: the upper concave hull of the (transport cost, gain)
//! points a sample can reach.
//!
//! Sample ξ with loss ℓ(ξ) may send its mass to a candidate c at cost |c − ξ|
//! for a gain ℓ(c) − ℓ(ξ). The best gain for a transport budget b is the
//! concave majorant of these points and (0, 0) ("stay"), evaluated at b. Its
//! increasing part is a chain of vertices whose edges have strictly decreasing
//! slopes (gain per unit transport).

/// A vertex of a sample's hull: the candidate location, its transport cost,
/// its gain, and the slope of the edge that ends here (∞ for the stay vertex).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Vertex {
    pub loc: f64,
    /// Index of the candidate (`usize::MAX` for the stay vertex).
    pub cand: usize,
    pub cost: f64,
    pub gain: f64,
    pub slope: f64,
}

/// Writes the hull of sample `xi` (with `lxi` = ℓ(xi)) into `out`: `out[0]` is
/// the stay vertex, then vertices of strictly increasing cost and gain whose
/// entering slopes strictly decrease, so each edge is worth taking before the
/// next. `cands` are the loss's candidate points (sorted by location, with ℓ).
///
/// Ties: of two points with the same cost the larger gain wins, and on equal
/// gain the one further left (it comes first), so the hull is deterministic.
/// The `cand` of the stay vertex.
pub(crate) const STAY: usize = usize::MAX;

pub(crate) fn hull(xi: f64, lxi: f64, cands: &[(f64, f64)], out: &mut Vec<Vertex>) {
    out.clear();
    out.push(Vertex { loc: xi, cand: STAY, cost: 0.0, gain: 0.0, slope: f64::INFINITY });
    // candidates left of xi, nearest first, and right of xi, nearest first:
    // both in increasing cost; merge them by cost.
    let split = cands.partition_point(|&(c, _)| c < xi);
    // left: indices split-1 down to 0; right: from the first c > xi up
    let mut l = split;
    let mut r = split;
    while r < cands.len() && cands[r].0 <= xi {
        r += 1;
    }
    loop {
        let take_left = match (l > 0, r < cands.len()) {
            (true, true) => xi - cands[l - 1].0 <= cands[r].0 - xi,
            (true, false) => true,
            (false, true) => false,
            (false, false) => break,
        };
        let j = if take_left {
            l -= 1;
            l
        } else {
            r += 1;
            r - 1
        };
        let (c, lc) = cands[j];
        push_point(out, c, j, (c - xi).abs(), lc - lxi);
    }
}

#[inline]
fn push_point(out: &mut Vec<Vertex>, loc: f64, cand: usize, cost: f64, gain: f64) {
    if !(gain > 0.0) || !(cost > 0.0) {
        return;
    }
    loop {
        let top = *out.last().expect("stay vertex is never removed");
        if gain <= top.gain {
            return; // not higher than the current top: below the hull
        }
        if cost == top.cost {
            out.pop(); // same cost, higher gain: replaces the top (never the stay vertex, cost 0)
            continue;
        }
        let slope = (gain - top.gain) / (cost - top.cost);
        if out.len() >= 2 && slope >= top.slope {
            out.pop(); // top lies on or under the segment to the new point
            continue;
        }
        out.push(Vertex { loc, cand, cost, gain, slope });
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convex_two_candidates() {
        // ℓ(z) = |z| on [-1, 2], ξ = 0.5: left point (1.5, 0.5), right (1.5, 1.5)
        let cands = vec![(-1.0, 1.0), (2.0, 2.0)];
        let mut h = Vec::new();
        hull(0.5, 0.5, &cands, &mut h);
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].loc, 2.0);
        assert_eq!(h[1].slope, 1.0);
    }

    #[test]
    fn slopes_strictly_decrease_and_dominated_points_dropped() {
        // points (1, 3), (2, 4.2), (3, 4.5), (4, 6): (3, 4.5) is under the hull
        let cands = vec![(-4.0, 6.0), (-2.0, 4.2), (1.0, 3.0), (3.0, 4.5)];
        let mut h = Vec::new();
        hull(0.0, 0.0, &cands, &mut h);
        let locs: Vec<f64> = h.iter().map(|v| v.loc).collect();
        assert_eq!(locs, vec![0.0, 1.0, -2.0, -4.0]);
        for w in h.windows(2) {
            assert!(w[1].slope < w[0].slope);
        }
    }

    #[test]
    fn nothing_to_gain_gives_stay_only() {
        let cands = vec![(0.0, 0.0), (1.0, 0.0)];
        let mut h = Vec::new();
        hull(0.5, 1.0, &cands, &mut h);
        assert_eq!(h.len(), 1);
    }
}
