"""iterative-dpo: self-annotation rounds, no follower, the plain DPO loss (docs/METHOD.md §5.2)."""

from ssapo.methods import Method

METHOD = Method(name="iterative-dpo", help="self-annotation rounds, plain DPO", leader_loss="dpo")
