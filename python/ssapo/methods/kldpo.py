"""kldpo: KLDPO (Xu et al., 2025) on the self-labels: DPO with detached per-pair
weights exp((ℓ − mean ℓ)/τ), τ = `kldpo_tau`, clamped at `kldpo_max_weight`,
the KL-ball worst case that up-weights high-loss pairs (docs/METHOD.md §5.5)."""

from ssapo.methods import Method

METHOD = Method(
    name="kldpo",
    help="self-annotation rounds, KLDPO (DPO weighted by exp((loss - mean)/kldpo_tau), clamped)",
    leader_loss="kldpo",
)
