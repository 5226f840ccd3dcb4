//! The proof that a [`Solution`] is optimal, recomputed from its atoms.
//!
//! A zero dual gap alone proves nothing: the dual objective at some λ equals
//! the value of an *infeasible* primal just as easily (issue 8: every sample
//! sent to the support's end, λ = 0, gap 2e-16). Optimality needs three
//! things, each checked here from the per-sample arrays and the data, without
//! the solver's own sums:
//!
//! 1. **primal feasibility**: in every group the mean transport
//!    (1/n_g) Σ_i Σ_j mass_ij |loc_ij − ξ_i| is at most ε; every atom lies in
//!    the support; masses are ≥ 0 and each sample's sum to 1;
//! 2. **dual feasibility**: λ_g ≥ 0;
//! 3. **equal objectives**: the primal value (1/n_g) Σ_ij mass_ij ℓ(loc_ij)
//!    equals the dual value λ_g ε + (1/n_g) Σ_i max_c [ℓ(c) − λ_g |c − ξ_i|].
//!
//! By weak duality the dual value at any λ ≥ 0 bounds every feasible primal
//! from above, so a feasible primal that attains it is optimal. Complementary
//! slackness (λ_g > 0 only where the budget is spent) follows and is reported
//! too. Every check is up to a tolerance scaled to the data's magnitude.

use crate::error::{DroError, Result};
use crate::loss::Loss;
use crate::solve::Solution;

/// The optimality proof of a [`Solution`], each part measured (0 is perfect).
#[derive(Clone, Debug, PartialEq)]
pub struct Certificate {
    /// max_g (transport_g − ε)⁺, transport recomputed from the atoms.
    pub budget_excess: f64,
    /// The largest distance of an atom outside the support.
    pub support_violation: f64,
    /// The most negative mass, as a positive number (0 if none is negative).
    pub negative_mass: f64,
    /// max_i |Σ_j mass_ij − 1|.
    pub mass_sum_error: f64,
    /// max_g (−λ_g)⁺.
    pub negative_lam: f64,
    /// max_g |primal_g − dual_g|, both recomputed here.
    pub gap: f64,
    /// max_g λ_g · (ε − transport_g)⁺: complementary slackness.
    pub slackness: f64,
    /// max_g |reported group value − recomputed primal value|.
    pub value_mismatch: f64,
    /// max_g |reported budget used − recomputed transport|.
    pub budget_mismatch: f64,
    /// Tolerance of the value checks ([`Certificate::is_optimal`]): `rel`
    /// times the largest |ℓ| met (at least 1).
    pub tol_value: f64,
    /// Tolerance of the transport and support checks: `rel` times
    /// max(1, |lo|, |hi|).
    pub tol_transport: f64,
    /// Tolerance of the mass checks: `rel`.
    pub tol_mass: f64,
}

impl Certificate {
    /// Whether every check holds within its tolerance: the solution is
    /// feasible, its multipliers are, and the two objectives agree.
    pub fn is_optimal(&self) -> bool {
        self.failures().is_empty()
    }

    /// The names of the checks that fail (empty when optimal).
    pub fn failures(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        let checks = [
            ("budget_excess", self.budget_excess, self.tol_transport),
            ("support_violation", self.support_violation, self.tol_transport),
            ("negative_mass", self.negative_mass, self.tol_mass),
            ("mass_sum_error", self.mass_sum_error, self.tol_mass),
            ("negative_lam", self.negative_lam, 0.0),
            ("gap", self.gap, self.tol_value),
            ("value_mismatch", self.value_mismatch, self.tol_value),
            ("budget_mismatch", self.budget_mismatch, self.tol_transport),
        ];
        for (name, v, tol) in checks {
            if !(v <= tol) {
                f.push(name);
            }
        }
        // slackness is implied by the others (up to rounding); it is reported, not held
        f
    }
}

/// Default relative tolerance of [`Solution::certificate`].
pub const DEFAULT_REL_TOL: f64 = 1e-9;

impl Solution {
    /// Recomputes the optimality proof from the atoms, the data `xi` (the
    /// samples this solution was solved for) and the `loss` it was solved
    /// with, at relative tolerance `rel` ([`DEFAULT_REL_TOL`] is a good one).
    pub fn certificate_with(&self, xi: &[f64], loss: &Loss, rel: f64) -> Result<Certificate> {
        let n = self.group_index.len();
        if xi.len() != n {
            return Err(DroError::arg("xi", format!("has {} samples, the solution {n}", xi.len())));
        }
        if !(rel >= 0.0) {
            return Err(DroError::arg("rel", format!("must be >= 0, got {rel}")));
        }
        let (lo, hi) = self.support;
        let eps = self.eps;
        let g = self.group_sizes.len();
        let cands = loss.candidates(lo, hi);
        let mut primal = vec![0.0f64; g];
        let mut dual = vec![0.0f64; g];
        let mut transport = vec![0.0f64; g];
        let mut c = Certificate {
            budget_excess: 0.0,
            support_violation: 0.0,
            negative_mass: 0.0,
            mass_sum_error: 0.0,
            negative_lam: 0.0,
            gap: 0.0,
            slackness: 0.0,
            value_mismatch: 0.0,
            budget_mismatch: 0.0,
            tol_value: 0.0,
            tol_transport: 0.0,
            tol_mass: 0.0,
        };
        let mut loss_scale = 1.0f64;
        for (i, &x) in xi.iter().enumerate() {
            let k = self.group_index[i];
            let lam = self.lam[k];
            for j in 0..2 {
                let (l, m) = (self.loc[2 * i + j], self.mass[2 * i + j]);
                c.support_violation = c.support_violation.max(lo - l).max(l - hi);
                c.negative_mass = c.negative_mass.max(-m);
                let lv = loss.eval(l);
                loss_scale = loss_scale.max(lv.abs());
                primal[k] += m * lv;
                transport[k] += m * (l - x).abs();
            }
            c.mass_sum_error = c.mass_sum_error.max((self.mass[2 * i] + self.mass[2 * i + 1] - 1.0).abs());
            let lx = loss.eval(x);
            loss_scale = loss_scale.max(lx.abs());
            dual[k] += cands.iter().fold(lx, |b, &(cc, lc)| b.max(lc - lam * (cc - x).abs()));
        }
        for k in 0..g {
            let nf = self.group_sizes[k] as f64;
            let lam = self.lam[k];
            let (p, t) = (primal[k] / nf, transport[k] / nf);
            let d = lam * eps + dual[k] / nf;
            c.budget_excess = c.budget_excess.max(t - eps);
            c.negative_lam = c.negative_lam.max(-lam);
            c.gap = c.gap.max((p - d).abs());
            c.slackness = c.slackness.max(lam * (eps - t).max(0.0));
            c.value_mismatch = c.value_mismatch.max((self.group_values[k] - p).abs());
            c.budget_mismatch = c.budget_mismatch.max((self.budget_used[k] - t).abs());
        }
        for &(_, lc) in &cands {
            loss_scale = loss_scale.max(lc.abs());
        }
        c.tol_value = rel * loss_scale;
        c.tol_transport = rel * lo.abs().max(hi.abs()).max(1.0);
        c.tol_mass = rel;
        Ok(c)
    }

    /// [`Solution::certificate_with`] at [`DEFAULT_REL_TOL`].
    pub fn certificate(&self, xi: &[f64], loss: &Loss) -> Result<Certificate> {
        self.certificate_with(xi, loss, DEFAULT_REL_TOL)
    }
}
