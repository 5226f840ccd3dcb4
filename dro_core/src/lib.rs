//! # dro_core
//!
//! The exact follower of SSAPO (Stackelberg Self-Annotated Preference
//! Optimization): for each group of samples ξ_i, the worst-case distribution
//! of a piecewise-linear loss ℓ within a 1-Wasserstein ball of radius ε around
//! the group's empirical distribution, on a bounded support [lo, hi].
//!
//! The program is a linear program with one coupling constraint per group.
//! It is solved exactly, not iteratively:
//! 1. each sample's reachable (transport cost, gain) points — the support's
//!    ends and the concave kinks of ℓ — are reduced to their upper concave
//!    hull ([`hull`](crate::hull));
//! 2. the hull edges of a group are taken by decreasing slope while the budget
//!    n_g·ε lasts (a fractional knapsack); the slope where it runs out is the
//!    multiplier λ*, found by weighted selection in expected linear time;
//! 3. the dual objective λ*ε + (1/n) Σ_i max_c [ℓ(c) − λ*|c − ξ_i|] is
//!    evaluated independently and returned beside the primal value;
//!    [`Solution::certificate`] recomputes the whole proof (primal and dual
//!    feasibility, both objectives) from the atoms.
//!
//! ```
//! use dro_core::{solve, Groups, Loss, Options};
//! let xi = vec![0.6, 0.7, 0.9, 0.55];
//! let sol = solve(&xi, 0.01, Groups::Chunks(100), &Loss::neg_log(6).unwrap(), &Options::default()).unwrap();
//! assert!(sol.dual_gap() <= 1e-12 * sol.value.abs().max(1.0));
//! assert!(sol.value >= sol.empirical_value);
//! // the proof, recomputed from the atoms: feasible, dual feasible, equal objectives
//! assert!(sol.certificate(&xi, &Loss::neg_log(6).unwrap()).unwrap().is_optimal());
//! ```

// `!(a > b)` is written on purpose where NaN must take the rejecting branch
// (partial_cmp would hide that); the crate's floats are never compared otherwise.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

mod certificate;
mod error;
mod hull;
mod knapsack;
mod loss;
mod solve;

pub use certificate::{Certificate, DEFAULT_REL_TOL};
pub use error::{DroError, Result};
pub use loss::{softplus_neg, Loss};
pub use solve::{solve, Groups, Options, Solution, CHUNK};
