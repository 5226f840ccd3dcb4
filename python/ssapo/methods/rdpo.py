"""rdpo: robust DPO (Chowdhury et al., 2024) on the self-labels: the loss that is
unbiased for clean DPO when labels flip at the known rate `label_smoothing`
(docs/METHOD.md §5.5)."""

from ssapo.methods import Method

METHOD = Method(
    name="rdpo",
    help="self-annotation rounds, robust DPO (unbiased under flips at rate label_smoothing)",
    leader_loss="rdpo",
)
