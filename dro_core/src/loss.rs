//! Continuous piecewise-linear losses ℓ̂ and the candidate points they induce.
//!
//! Two shapes cover every case: a maximum of affine pieces (convex; the paper's
//! tangent approximations) and linear interpolation between knots (any
//! continuous piecewise-linear function, extended linearly beyond its end
//! knots).

use crate::error::{check_finite, DroError, Result};

#[derive(Clone, Debug, PartialEq)]
enum Shape {
    /// ℓ(z) = max_k a_k z + b_k.
    MaxAffine { slopes: Vec<f64>, intercepts: Vec<f64> },
    /// ℓ interpolates (x_j, y_j), x strictly increasing, linear beyond the ends.
    Interpolate { x: Vec<f64>, y: Vec<f64> },
}

/// A continuous piecewise-linear loss, with an optional natural support.
#[derive(Clone, Debug, PartialEq)]
pub struct Loss {
    shape: Shape,
    support: Option<(f64, f64)>,
    name: String,
}

/// softplus(−z) = log(1 + e^{−z}), the DPO loss of a margin z, computed stably.
pub fn softplus_neg(z: f64) -> f64 {
    (-z).max(0.0) + (-z.abs()).exp().ln_1p()
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

impl Loss {
    /// The paper's default: ξ is a preference probability in [0, 1] and
    /// ℓ(ξ) = −log ξ is replaced by its `k` tangents at ξ = j/k, j = 1..k:
    /// ℓ_j(ξ) = −(k/j)(ξ − j/k) − log(j/k). Natural support [0, 1].
    pub fn neg_log(k: usize) -> Result<Self> {
        if k == 0 {
            return Err(DroError::arg("k", "the number of pieces must be at least 1, got 0"));
        }
        let kf = k as f64;
        let slopes = (1..=k).map(|j| -kf / j as f64).collect();
        let intercepts = (1..=k).map(|j| 1.0 - (j as f64 / kf).ln()).collect();
        Ok(Loss {
            shape: Shape::MaxAffine { slopes, intercepts },
            support: Some((0.0, 1.0)),
            name: format!("neg_log(k={k})"),
        })
    }

    /// The DPO loss in margin space, ℓ(z) = softplus(−z), replaced by its `k`
    /// tangents at points spread evenly over [lo, hi] (both ends included when
    /// k ≥ 2, the midpoint when k = 1). Natural support [lo, hi].
    pub fn softplus(k: usize, lo: f64, hi: f64) -> Result<Self> {
        if k == 0 {
            return Err(DroError::arg("k", "the number of pieces must be at least 1, got 0"));
        }
        if !lo.is_finite() {
            return Err(DroError::arg("lo", format!("must be finite, got {lo}")));
        }
        if !hi.is_finite() {
            return Err(DroError::arg("hi", format!("must be finite, got {hi}")));
        }
        if !(lo < hi) {
            return Err(DroError::arg("hi", format!("must be greater than lo, got lo = {lo}, hi = {hi}")));
        }
        let points: Vec<f64> = if k == 1 {
            vec![0.5 * (lo + hi)]
        } else {
            (0..k).map(|j| lo + (hi - lo) * j as f64 / (k - 1) as f64).collect()
        };
        let slopes: Vec<f64> = points.iter().map(|&z| -sigmoid(-z)).collect();
        let intercepts = points.iter().zip(&slopes).map(|(&z, &a)| softplus_neg(z) - a * z).collect();
        Ok(Loss {
            shape: Shape::MaxAffine { slopes, intercepts },
            support: Some((lo, hi)),
            name: format!("softplus(k={k}, lo={lo}, hi={hi})"),
        })
    }

    /// A convex loss ℓ(z) = max_k slopes[k]·z + intercepts[k]. No natural
    /// support.
    pub fn max_affine(slopes: Vec<f64>, intercepts: Vec<f64>) -> Result<Self> {
        if slopes.is_empty() {
            return Err(DroError::arg("slopes", "must hold at least one piece (K = 0)"));
        }
        if slopes.len() != intercepts.len() {
            return Err(DroError::arg(
                "intercepts",
                format!("must have the length of slopes ({}), got {}", slopes.len(), intercepts.len()),
            ));
        }
        check_finite("slopes", &slopes)?;
        check_finite("intercepts", &intercepts)?;
        let k = slopes.len();
        Ok(Loss { shape: Shape::MaxAffine { slopes, intercepts }, support: None, name: format!("max_affine(k={k})") })
    }

    /// Any continuous piecewise-linear loss: linear interpolation through the
    /// knots (x[j], y[j]), x strictly increasing, extended linearly beyond the
    /// first and last knot. Convex or not. No natural support.
    pub fn interpolate(x: Vec<f64>, y: Vec<f64>) -> Result<Self> {
        if x.len() < 2 {
            return Err(DroError::arg("x", format!("needs at least 2 knots, got {}", x.len())));
        }
        if x.len() != y.len() {
            return Err(DroError::arg("y", format!("must have the length of x ({}), got {}", x.len(), y.len())));
        }
        check_finite("x", &x)?;
        check_finite("y", &y)?;
        if let Some(j) = (1..x.len()).find(|&j| !(x[j] > x[j - 1])) {
            return Err(DroError::arg(
                "x",
                format!("knots must be strictly increasing, but x[{j}] = {} <= x[{}] = {}", x[j], j - 1, x[j - 1]),
            ));
        }
        let m = x.len();
        Ok(Loss { shape: Shape::Interpolate { x, y }, support: None, name: format!("interpolate(knots={m})") })
    }

    /// The support the loss was built for, if any ([0, 1] for `neg_log`,
    /// [lo, hi] for `softplus`).
    pub fn natural_support(&self) -> Option<(f64, f64)> {
        self.support
    }

    /// A short description, e.g. `neg_log(k=6)`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the loss is convex (a maximum of affine pieces, or knots whose
    /// segment slopes never decrease).
    pub fn is_convex(&self) -> bool {
        match &self.shape {
            Shape::MaxAffine { .. } => true,
            Shape::Interpolate { x, y } => {
                let s = segment_slopes(x, y);
                s.windows(2).all(|w| w[1] >= w[0])
            }
        }
    }

    /// ℓ(z).
    #[inline]
    pub fn eval(&self, z: f64) -> f64 {
        match &self.shape {
            Shape::MaxAffine { slopes, intercepts } => {
                slopes.iter().zip(intercepts).map(|(a, b)| a * z + b).fold(f64::NEG_INFINITY, f64::max)
            }
            Shape::Interpolate { x, y } => {
                let j = segment(x, z);
                y[j] + (y[j + 1] - y[j]) / (x[j + 1] - x[j]) * (z - x[j])
            }
        }
    }

    /// The right derivative ℓ'(z+): the slope of the piece in force just to the
    /// right of z.
    #[inline]
    pub fn slope(&self, z: f64) -> f64 {
        match &self.shape {
            Shape::MaxAffine { slopes, intercepts } => {
                let mut best = f64::NEG_INFINITY;
                let mut best_slope = f64::NEG_INFINITY;
                for (&a, &b) in slopes.iter().zip(intercepts) {
                    let v = a * z + b;
                    if v > best || (v == best && a > best_slope) {
                        best = v;
                        best_slope = a;
                    }
                }
                best_slope
            }
            Shape::Interpolate { x, y } => {
                // right derivative: at a knot, the segment that starts there
                let j = match x.partition_point(|&k| k <= z) {
                    0 => 0,
                    p => (p - 1).min(x.len() - 2),
                };
                (y[j + 1] - y[j]) / (x[j + 1] - x[j])
            }
        }
    }

    /// Upper bounds (max |ℓ(z)|, max |ℓ'(z)|) over z in [lo, hi].
    pub fn bounds(&self, lo: f64, hi: f64) -> (f64, f64) {
        match &self.shape {
            Shape::MaxAffine { slopes, intercepts } => {
                // |max_k a_k z + b_k| <= max_k |a_k z + b_k| <= max_k |a_k| M + |b_k|
                let m = lo.abs().max(hi.abs());
                let v = slopes.iter().zip(intercepts).map(|(a, b)| a.abs() * m + b.abs()).fold(0.0, f64::max);
                (v, slopes.iter().fold(0.0f64, |s, a| s.max(a.abs())))
            }
            Shape::Interpolate { x, y } => {
                // a piecewise-linear function peaks in |.| at an end or a knot
                let mut v = self.eval(lo).abs().max(self.eval(hi).abs());
                for (&k, &yk) in x.iter().zip(y) {
                    if k > lo && k < hi {
                        v = v.max(yk.abs());
                    }
                }
                (v, segment_slopes(x, y).iter().fold(0.0f64, |s, a| s.max(a.abs())))
            }
        }
    }

    /// The points where the worst case may put mass, sorted, with ℓ there: the
    /// ends of the support and the concave kinks of ℓ strictly inside it. For
    /// every ξ and λ ≥ 0, max over c in [lo, hi] of ℓ(c) − λ|c − ξ| is attained
    /// at one of these or at ξ itself (a piecewise-linear function minus a
    /// linear one peaks at an end or at a kink where the slope falls).
    pub fn candidates(&self, lo: f64, hi: f64) -> Vec<(f64, f64)> {
        let mut c = vec![(lo, self.eval(lo))];
        if let Shape::Interpolate { x, y } = &self.shape {
            let s = segment_slopes(x, y);
            for j in 1..x.len() - 1 {
                if s[j] < s[j - 1] && x[j] > lo && x[j] < hi {
                    c.push((x[j], y[j]));
                }
            }
        }
        if hi > lo {
            c.push((hi, self.eval(hi)));
        }
        c
    }
}

fn segment_slopes(x: &[f64], y: &[f64]) -> Vec<f64> {
    (1..x.len()).map(|j| (y[j] - y[j - 1]) / (x[j] - x[j - 1])).collect()
}

/// The index j of the segment [x_j, x_{j+1}] used to evaluate at z
/// (the first or last one beyond the ends).
#[inline]
fn segment(x: &[f64], z: f64) -> usize {
    let p = x.partition_point(|&k| k < z);
    p.saturating_sub(1).min(x.len() - 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neg_log_tangents_touch_at_grid() {
        let l = Loss::neg_log(6).unwrap();
        for j in 1..=6 {
            let v = j as f64 / 6.0;
            assert!((l.eval(v) + v.ln()).abs() < 1e-12, "j={j}");
        }
        // below −log everywhere else (tangents of a convex function)
        for i in 1..100 {
            let v = i as f64 / 100.0;
            assert!(l.eval(v) <= -v.ln() + 1e-12);
        }
        assert_eq!(l.eval(0.0), 1.0 + 6f64.ln());
        assert_eq!(l.slope(0.0), -6.0);
    }

    #[test]
    fn interpolate_evaluates_and_extends() {
        let l = Loss::interpolate(vec![0.0, 1.0, 2.0], vec![0.0, 2.0, 1.0]).unwrap();
        assert_eq!(l.eval(0.5), 1.0);
        assert_eq!(l.eval(1.5), 1.5);
        assert_eq!(l.eval(-1.0), -2.0);
        assert_eq!(l.eval(3.0), 0.0);
        assert_eq!(l.slope(1.0), -1.0);
        assert_eq!(l.slope(0.999), 2.0);
        assert!(!l.is_convex());
        let c = l.candidates(-1.0, 3.0);
        assert_eq!(c, vec![(-1.0, -2.0), (1.0, 2.0), (3.0, 0.0)]);
    }

    #[test]
    fn constructors_reject_bad_input() {
        assert_eq!(Loss::neg_log(0).unwrap_err().argument(), "k");
        assert_eq!(Loss::max_affine(vec![], vec![]).unwrap_err().argument(), "slopes");
        assert_eq!(Loss::max_affine(vec![1.0], vec![]).unwrap_err().argument(), "intercepts");
        assert_eq!(Loss::max_affine(vec![f64::NAN], vec![0.0]).unwrap_err().argument(), "slopes");
        assert_eq!(Loss::interpolate(vec![0.0, 0.0], vec![1.0, 1.0]).unwrap_err().argument(), "x");
        assert_eq!(Loss::interpolate(vec![0.0, 1.0], vec![1.0]).unwrap_err().argument(), "y");
        assert_eq!(Loss::softplus(3, 1.0, 1.0).unwrap_err().argument(), "hi");
        assert_eq!(Loss::softplus(3, f64::NEG_INFINITY, 1.0).unwrap_err().argument(), "lo");
    }

    #[test]
    fn softplus_tangents_below_loss() {
        let l = Loss::softplus(5, -4.0, 4.0).unwrap();
        for i in 0..=80 {
            let z = -4.0 + i as f64 * 0.1;
            assert!(l.eval(z) <= softplus_neg(z) + 1e-12);
        }
        assert!((l.eval(-4.0) - softplus_neg(-4.0)).abs() < 1e-12);
        assert!((l.eval(0.0) - softplus_neg(0.0)).abs() < 1e-12);
    }
}
