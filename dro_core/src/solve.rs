//! The follower: groups, parallelism, the result and its certificate.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::error::{DroError, Result};
use crate::hull::{hull, Vertex, STAY};
use crate::knapsack::threshold;
use crate::loss::Loss;

/// Samples per unit of work. Every sum over samples is taken within chunks of
/// this size and then over chunks in order, whether the chunks run on one
/// thread or many: that is what makes results bit-identical at any thread count.
pub const CHUNK: usize = 4096;

/// How the samples are partitioned into Wasserstein balls.
#[derive(Clone, Copy, Debug)]
pub enum Groups<'a> {
    /// One ball around all samples.
    Global,
    /// Consecutive chunks of this many samples, the last one smaller (the
    /// paper's layout, G = 100).
    Chunks(usize),
    /// One label per sample (non-negative); one ball per distinct label,
    /// ordered by label. Within a group the samples keep their index order.
    Labels(&'a [i64]),
}

/// Options of a solve beyond the data.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// The support [lo, hi] of the worst-case distributions. Default: the
    /// loss's natural support, else [−max|ξ|, max|ξ|].
    pub support: Option<(f64, f64)>,
    /// Rayon threads for this call; `None` uses the global pool.
    pub threads: Option<usize>,
}

/// The exact worst case and its proof.
///
/// Per-sample arrays are row-major `(N, 2)`: each sample's mass sits on at
/// most two atoms (an optimal vertex splits at most one sample per group).
/// A sample with one atom has `loc[i, 1] = loc[i, 0]` and `mass[i, 1] = 0`.
#[derive(Clone, Debug, PartialEq)]
pub struct Solution {
    /// Worst-case expected loss averaged over all N samples: Σ_g n_g/N · V_g.
    pub value: f64,
    /// Mean loss at the data, (1/N) Σ ℓ(ξ_i).
    pub empirical_value: f64,
    /// The dual objective Σ_g n_g/N · [λ_g ε + (1/n_g) Σ_i max_c ℓ(c) − λ_g |c − ξ_i|];
    /// equal to `value` up to rounding, which proves optimality.
    pub dual_value: f64,
    /// Worst-case value V_g of each group.
    pub group_values: Vec<f64>,
    /// Empirical value of each group.
    pub group_empirical_values: Vec<f64>,
    /// Dual value of each group.
    pub group_dual_values: Vec<f64>,
    /// The optimal multiplier λ*_g of each group's transport budget (0 when the
    /// budget is not used up).
    pub lam: Vec<f64>,
    /// Mean transport of each group, (1/n_g) Σ_i Σ_j mass_ij |loc_ij − ξ_i| ≤ ε.
    pub budget_used: Vec<f64>,
    /// Number of samples in each group.
    pub group_sizes: Vec<usize>,
    /// The label of each group (0, 1, … for `Global` and `Chunks`).
    pub group_labels: Vec<i64>,
    /// Group index of each sample.
    pub group_index: Vec<usize>,
    /// Atom locations, (N, 2) row-major.
    pub loc: Vec<f64>,
    /// Atom masses, (N, 2) row-major; each row sums to 1.
    pub mass: Vec<f64>,
    /// ξ_i − loc_ij, (N, 2) row-major: what the leader subtracts.
    pub shift: Vec<f64>,
    /// Gradient-matching scalar weights: w_i = Σ_j mass_ij ℓ'(loc_ij) / ℓ'(ξ_i)
    /// with ℓ' the right derivative of the loss (1 where ℓ'(ξ_i) = 0). Scaling
    /// the loss of sample i by w_i gives, at ξ_i, the gradient of its atoms.
    pub weights: Vec<f64>,
    /// The support used.
    pub support: (f64, f64),
    /// The radius used.
    pub eps: f64,
}

impl Solution {
    /// |value − dual_value|.
    pub fn dual_gap(&self) -> f64 {
        (self.value - self.dual_value).abs()
    }
}

/// Solves the worst-case problem of every group.
///
/// For each group g with samples ξ_i (i ∈ g, n_g of them), maximises E_Q[ℓ(ζ)]
/// over distributions Q on [lo, hi] with W1(Q, P̂_g) ≤ `eps`.
pub fn solve(xi: &[f64], eps: f64, groups: Groups<'_>, loss: &Loss, opts: &Options) -> Result<Solution> {
    let support = validate(xi, eps, &groups, loss, opts)?;
    let sol = match opts.threads {
        None => solve_valid(xi, eps, groups, loss, support),
        Some(t) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .map_err(|e| DroError::ThreadPool(e.to_string()))?;
            pool.install(|| solve_valid(xi, eps, groups, loss, support))
        }
    };
    #[cfg(debug_assertions)]
    {
        // every debug build proves every answer it gives
        let cert = sol.certificate(xi, loss).expect("xi is the solved data");
        debug_assert!(cert.is_optimal(), "dro_core: not proven optimal ({:?}): {cert:?}", cert.failures());
    }
    Ok(sol)
}

fn validate(xi: &[f64], eps: f64, groups: &Groups<'_>, loss: &Loss, opts: &Options) -> Result<(f64, f64)> {
    if xi.is_empty() {
        return Err(DroError::arg("xi", "is empty; need at least one sample"));
    }
    if let Some(i) = crate::error::first_non_finite(xi) {
        return Err(DroError::arg("xi", format!("must be finite, but xi[{i}] = {}", xi[i])));
    }
    if !eps.is_finite() || eps < 0.0 {
        return Err(DroError::arg("eps", format!("must be finite and >= 0, got {eps}")));
    }
    match groups {
        Groups::Global => {}
        Groups::Chunks(0) => return Err(DroError::arg("groups", "a group size must be >= 1, got 0")),
        Groups::Chunks(_) => {}
        Groups::Labels(l) => {
            if l.len() != xi.len() {
                return Err(DroError::arg(
                    "groups",
                    format!("needs one label per sample: {} labels for {} samples", l.len(), xi.len()),
                ));
            }
            if let Some(i) = l.iter().position(|&g| g < 0) {
                return Err(DroError::arg("groups", format!("labels must be >= 0, but groups[{i}] = {}", l[i])));
            }
        }
    }
    if opts.threads == Some(0) {
        return Err(DroError::arg("threads", "must be >= 1 (or None for all cores), got 0"));
    }
    let (lo, hi) = match opts.support.or(loss.natural_support()) {
        Some(s) => s,
        None => {
            let m = xi.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            (-m, m)
        }
    };
    if !lo.is_finite() || !hi.is_finite() {
        return Err(DroError::arg(
            "support",
            format!("must be finite (an unbounded support has no attained worst case), got ({lo}, {hi})"),
        ));
    }
    if lo > hi {
        return Err(DroError::arg("support", format!("lo must be <= hi, got ({lo}, {hi})")));
    }
    if let Some(i) = xi.iter().position(|&x| x < lo || x > hi) {
        return Err(DroError::arg("xi", format!("xi[{i}] = {} lies outside the support [{lo}, {hi}]", xi[i])));
    }
    // Refuse, rather than return inf or NaN, data whose sums overflow f64:
    // the solver adds n losses, n transports and n terms ℓ(c) − λ|c − ξ|, each
    // bounded by `bound` (a factor 4 leaves room for the partial sums).
    let (abs_loss, abs_slope) = loss.bounds(lo, hi);
    let width = hi - lo;
    let bound = 4.0 * xi.len() as f64 * (abs_loss + abs_slope * width + width);
    if !bound.is_finite() {
        let arg = if opts.support.is_some() || loss.natural_support().is_some() { "support" } else { "xi" };
        return Err(DroError::arg(
            arg,
            format!(
                "values this large overflow float64 sums (support [{lo}, {hi}], |loss| up to {abs_loss:e}, \
                 |slope| up to {abs_slope:e}, {} samples): divide xi, the support and the loss by a common scale",
                xi.len()
            ),
        ));
    }
    Ok((lo, hi))
}

/// What one group contributes.
#[derive(Clone, Copy, Debug, Default)]
struct GroupStats {
    value_sum: f64,
    emp_sum: f64,
    dual_sum: f64,
    transport_sum: f64,
    lam: f64,
}

type U = MaybeUninit<f64>;

/// One chunk's samples, its outputs and its slot of the pooled edge buffer.
type ChunkWork<'a, 'b> = ((&'a [f64], &'a mut Out<'b>), &'a mut [(f64, f64)]);

/// An output buffer that every sample's chunk writes exactly once, so it is
/// never zero-filled first (that fill was a third of a grouped solve).
fn uninit_vec(len: usize) -> Vec<U> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { v.set_len(len) };
    v
}

/// SAFETY: every element of `v` must have been written.
unsafe fn assume_init(v: Vec<U>) -> Vec<f64> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: MaybeUninit<f64> has the layout of f64; the caller vouches that
    // every element is initialised; the allocation is handed over whole.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f64>(), v.len(), v.capacity()) }
}

/// Mutable per-sample outputs of one group (or chunk). The weights slot holds
/// ℓ(ξ_i) between steps 1 and 4 of `solve_group`.
struct Out<'a> {
    loc: &'a mut [U],
    mass: &'a mut [U],
    shift: &'a mut [U],
    weights: &'a mut [U],
}

impl<'a> Out<'a> {
    fn split_at(self, n: usize) -> (Out<'a>, Out<'a>) {
        let (l0, l1) = self.loc.split_at_mut(2 * n);
        let (m0, m1) = self.mass.split_at_mut(2 * n);
        let (s0, s1) = self.shift.split_at_mut(2 * n);
        let (w0, w1) = self.weights.split_at_mut(n);
        (Out { loc: l0, mass: m0, shift: s0, weights: w0 }, Out { loc: l1, mass: m1, shift: s1, weights: w1 })
    }

    /// Splits `v` into consecutive pieces of the given sizes.
    fn split_index<'b>(v: &'b mut [usize], sizes: &[usize]) -> Vec<&'b mut [usize]> {
        let mut rest = v;
        let mut parts = Vec::with_capacity(sizes.len());
        for &n in sizes {
            let (a, b) = rest.split_at_mut(n);
            parts.push(a);
            rest = b;
        }
        parts
    }

    /// Splits into consecutive pieces of the given sizes.
    fn split_sizes(self, sizes: impl Iterator<Item = usize>) -> Vec<Out<'a>> {
        let mut rest = self;
        let mut parts = Vec::new();
        for n in sizes {
            let (a, b) = rest.split_at(n);
            parts.push(a);
            rest = b;
        }
        parts
    }
}

struct Ctx<'a> {
    loss: &'a Loss,
    /// Candidate points (location, ℓ) and ℓ' there.
    cands: Vec<(f64, f64)>,
    cand_slopes: Vec<f64>,
    eps: f64,
}

fn solve_valid(xi: &[f64], eps: f64, groups: Groups<'_>, loss: &Loss, support: (f64, f64)) -> Solution {
    let n = xi.len();
    let cands = loss.candidates(support.0, support.1);
    let cand_slopes = cands.iter().map(|&(c, _)| loss.slope(c)).collect();
    let ctx = Ctx { loss, cands, cand_slopes, eps };

    // Lay the groups out as consecutive ranges of a (possibly permuted) copy.
    let (perm, sizes, labels): (Option<Vec<usize>>, Vec<usize>, Vec<i64>) = match groups {
        Groups::Global => (None, vec![n], vec![0]),
        Groups::Chunks(g) => {
            let sizes: Vec<usize> = (0..n).step_by(g).map(|s| g.min(n - s)).collect();
            let labels = (0..sizes.len() as i64).collect();
            (None, sizes, labels)
        }
        Groups::Labels(l) => {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&i| l[i]); // stable: index order inside a group
            let mut sizes = Vec::new();
            let mut labels = Vec::new();
            for &i in &order {
                if labels.last() != Some(&l[i]) {
                    labels.push(l[i]);
                    sizes.push(0);
                }
                *sizes.last_mut().expect("pushed") += 1;
            }
            (Some(order), sizes, labels)
        }
    };
    let permuted: Option<Vec<f64>> = perm.as_ref().map(|p| p.iter().map(|&i| xi[i]).collect());
    let x: &[f64] = permuted.as_deref().unwrap_or(xi);

    let mut loc = uninit_vec(2 * n);
    let mut mass = uninit_vec(2 * n);
    let mut shift = uninit_vec(2 * n);
    let mut weights = uninit_vec(n);
    let out = Out { loc: &mut loc, mass: &mut mass, shift: &mut shift, weights: &mut weights };
    let outs = out.split_sizes(sizes.iter().copied());
    let mut xs = Vec::with_capacity(sizes.len());
    let mut start = 0;
    for &s in &sizes {
        xs.push(&x[start..start + s]);
        start += s;
    }

    // Many groups: one task per group. Few groups: parallel inside each.
    let many = sizes.len() >= 4 * rayon::current_num_threads();
    let stats: Vec<GroupStats> = if many {
        xs.into_par_iter().zip(outs).map(|(xg, og)| solve_group(xg, og, &ctx, false)).collect()
    } else {
        xs.into_iter().zip(outs).map(|(xg, og)| solve_group(xg, og, &ctx, true)).collect()
    };

    // SAFETY: the groups partition 0..n, every group's chunks partition the
    // group, and `place_chunk` writes all four outputs of every sample of its chunk.
    let (mut loc, mut mass, mut shift, mut weights) =
        unsafe { (assume_init(loc), assume_init(mass), assume_init(shift), assume_init(weights)) };
    if let Some(p) = &perm {
        scatter(p, &mut loc, 2);
        scatter(p, &mut mass, 2);
        scatter(p, &mut shift, 2);
        scatter(p, &mut weights, 1);
    }
    let mut group_index = vec![0usize; n];
    match &perm {
        None => {
            let parts = Out::split_index(&mut group_index, &sizes);
            parts.into_par_iter().enumerate().for_each(|(g, part)| part.fill(g));
        }
        Some(p) => {
            let mut s = 0;
            for (g, &size) in sizes.iter().enumerate() {
                for &i in &p[s..s + size] {
                    group_index[i] = g;
                }
                s += size;
            }
        }
    }

    let nf = n as f64;
    let group_values: Vec<f64> = stats.iter().zip(&sizes).map(|(s, &m)| s.value_sum / m as f64).collect();
    let group_empirical_values = stats.iter().zip(&sizes).map(|(s, &m)| s.emp_sum / m as f64).collect();
    let group_dual_values = stats.iter().zip(&sizes).map(|(s, &m)| s.lam * eps + s.dual_sum / m as f64).collect();
    let value = stats.iter().map(|s| s.value_sum).sum::<f64>() / nf;
    let empirical_value = stats.iter().map(|s| s.emp_sum).sum::<f64>() / nf;
    let dual_value = stats.iter().zip(&sizes).map(|(s, &m)| m as f64 * s.lam * eps + s.dual_sum).sum::<f64>() / nf;
    Solution {
        value,
        empirical_value,
        dual_value,
        group_values,
        group_empirical_values,
        group_dual_values,
        lam: stats.iter().map(|s| s.lam).collect(),
        budget_used: stats.iter().zip(&sizes).map(|(s, &m)| s.transport_sum / m as f64).collect(),
        group_sizes: sizes,
        group_labels: labels,
        group_index,
        loc,
        mass,
        shift,
        weights,
        support,
        eps,
    }
}

/// Moves row p of `v` (width w) to row perm[p].
fn scatter(perm: &[usize], v: &mut Vec<f64>, w: usize) {
    let mut dst = vec![0.0; v.len()];
    for (p, &i) in perm.iter().enumerate() {
        dst[w * i..w * i + w].copy_from_slice(&v[w * p..w * p + w]);
    }
    *v = dst;
}

fn solve_group(x: &[f64], out: Out<'_>, ctx: &Ctx<'_>, parallel: bool) -> GroupStats {
    // n·ε overflows only for ε beyond any transport (> 1e300): then nothing binds
    let budget = match x.len() as f64 * ctx.eps {
        b if b.is_finite() => b,
        _ => f64::MAX,
    };
    let parallel = parallel && x.len() > CHUNK;
    let mut outs = out.split_sizes(x.chunks(CHUNK).map(<[f64]>::len));

    // 1. ℓ(ξ_i) (parked in the weights slot until step 3) and the pooled hull
    //    edges (slope, cost) of the group, chunk by chunk, in sample order.
    // Each hull vertex is a distinct candidate, so a sample has at most
    // `cands.len()` edges: every chunk writes into its own slot of one buffer
    // (untouched pages of a zeroed allocation cost nothing), then the slots
    // are packed in order.
    let max_edges = ctx.cands.len().max(1);
    let mut edges: Vec<(f64, f64)> = vec![(0.0, 0.0); x.len() * max_edges];
    let collect_edges = |((xc, oc), slot): ChunkWork<'_, '_>| {
        let mut h = Vec::new();
        let mut k = 0;
        for (i, &xi) in xc.iter().enumerate() {
            let lxi = ctx.loss.eval(xi);
            oc.weights[i].write(lxi);
            hull(xi, lxi, &ctx.cands, &mut h);
            for w in h.windows(2) {
                slot[k] = (w[1].slope, w[1].cost - w[0].cost);
                k += 1;
            }
        }
        k
    };
    let counts: Vec<usize> = if parallel {
        x.par_chunks(CHUNK)
            .zip(outs.par_iter_mut())
            .zip(edges.par_chunks_mut(CHUNK * max_edges))
            .map(collect_edges)
            .collect()
    } else {
        x.chunks(CHUNK).zip(outs.iter_mut()).zip(edges.chunks_mut(CHUNK * max_edges)).map(collect_edges).collect()
    };
    let mut len = 0;
    for (c, &k) in counts.iter().enumerate() {
        let from = c * CHUNK * max_edges;
        edges.copy_within(from..from + k, len);
        len += k;
    }
    edges.truncate(len);
    // 2. λ*: the slope where the budget n·ε runs out.
    let t = threshold(&mut edges, budget);
    drop(edges);

    // 3. the budget left for the edges exactly at λ*, shared in sample order:
    //    each chunk starts with what the chunks before it left.
    let left = t.map_or(0.0, |t| (budget - t.above).max(0.0));
    let tie_start: Vec<f64> = match t {
        Some(t) if t.ties > 1 => {
            let tie_sum = |(xc, oc): (&[f64], &Out<'_>)| {
                let mut h = Vec::new();
                let mut tie = 0.0;
                for (i, &xi) in xc.iter().enumerate() {
                    // SAFETY: written in step 1
                    hull(xi, unsafe { oc.weights[i].assume_init() }, &ctx.cands, &mut h);
                    tie += h.windows(2).filter(|w| w[1].slope == t.slope).map(|w| w[1].cost - w[0].cost).sum::<f64>();
                }
                tie
            };
            let sums: Vec<f64> = if parallel {
                x.par_chunks(CHUNK).zip(outs.par_iter()).map(tie_sum).collect()
            } else {
                x.chunks(CHUNK).zip(outs.iter()).map(tie_sum).collect()
            };
            let mut rest = left;
            sums.iter()
                .map(|s| {
                    let start = rest;
                    rest = (rest - s).max(0.0);
                    start
                })
                .collect()
        }
        // at most one edge at λ*: every chunk may offer it the whole rest
        _ => vec![left; outs.len()],
    };
    let slope = t.map(|t| t.slope);
    let lam = slope.unwrap_or(0.0);

    // 4. place every sample's mass; sum value, empirical value, dual and transport.
    let work = |(xc, (oc, tie0)): (&[f64], (Out<'_>, f64))| place_chunk(xc, oc, tie0, slope, lam, ctx);
    let parts: Vec<[f64; 4]> = if parallel {
        x.par_chunks(CHUNK).zip(outs.into_par_iter().zip(tie_start.into_par_iter())).map(work).collect()
    } else {
        x.chunks(CHUNK).zip(outs.into_iter().zip(tie_start)).map(work).collect()
    };
    let mut s = GroupStats { lam, ..Default::default() };
    for p in parts {
        s.value_sum += p[0];
        s.emp_sum += p[1];
        s.dual_sum += p[2];
        s.transport_sum += p[3];
    }
    s
}

/// Places the samples of one chunk (ℓ(ξ_i) waits in `out.weights`); returns
/// the sums [value, empirical, dual, transport].
fn place_chunk(x: &[f64], out: Out<'_>, mut tie_left: f64, t: Option<f64>, lam: f64, ctx: &Ctx<'_>) -> [f64; 4] {
    let mut h: Vec<Vertex> = Vec::new();
    let mut acc = [0.0f64; 4];
    for (i, &xi) in x.iter().enumerate() {
        // SAFETY: written in step 1 of `solve_group`
        let lxi = unsafe { out.weights[i].assume_init() };
        hull(xi, lxi, &ctx.cands, &mut h);
        // walk the chain: edges above λ* whole, an edge at λ* from the shared rest
        let mut pos = 0;
        let mut frac = 0.0;
        for j in 1..h.len() {
            let s = h[j].slope;
            let take_all = match t {
                None => true,
                Some(t) => s > t,
            };
            if take_all {
                pos = j;
                continue;
            }
            if Some(s) == t {
                let c = h[j].cost - h[j - 1].cost;
                if tie_left >= c {
                    tie_left -= c;
                    pos = j;
                } else {
                    frac = tie_left / c;
                    tie_left = 0.0;
                    if frac >= 1.0 {
                        pos = j;
                        frac = 0.0;
                    }
                }
            }
            break;
        }
        let a = h[pos];
        let b = if frac > 0.0 { h[pos + 1] } else { a };
        let (m0, m1) = (1.0 - frac, frac);
        out.loc[2 * i].write(a.loc);
        out.loc[2 * i + 1].write(b.loc);
        out.mass[2 * i].write(m0);
        out.mass[2 * i + 1].write(m1);
        out.shift[2 * i].write(xi - a.loc);
        out.shift[2 * i + 1].write(xi - b.loc);
        let d = ctx.loss.slope(xi);
        let slope_at = |v: &Vertex| if v.cand == STAY { d } else { ctx.cand_slopes[v.cand] };
        out.weights[i].write(if d != 0.0 { (m0 * slope_at(&a) + m1 * slope_at(&b)) / d } else { 1.0 });
        acc[0] += lxi + m0 * a.gain + m1 * b.gain;
        acc[1] += lxi;
        // dual: max over candidates and staying of ℓ(c) − λ|c − ξ|
        let best = ctx.cands.iter().fold(lxi, |bst, &(c, lc)| bst.max(lc - lam * (c - xi).abs()));
        acc[2] += best;
        acc[3] += m0 * a.cost + m1 * b.cost;
    }
    acc
}
