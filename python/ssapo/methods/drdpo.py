"""drdpo: Dr. DPO (Wu et al., 2024) on the self-labels: each micro-batch's DPO
losses combined as −β′·log mean exp(−ℓ/β′), β′ = `drdpo_beta`, so that
high-loss pairs count less (docs/METHOD.md §5.5)."""

from ssapo.methods import Method

METHOD = Method(
    name="drdpo",
    help="self-annotation rounds, Dr. DPO (log-mean-exp of the batch's losses, drdpo_beta)",
    leader_loss="drdpo",
)
