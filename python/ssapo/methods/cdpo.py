"""cdpo: conservative DPO on the self-labels: label smoothing `label_smoothing`
on every pair (docs/METHOD.md §5.5)."""

from ssapo.methods import Method

METHOD = Method(
    name="cdpo",
    help="self-annotation rounds, conservative DPO (label smoothing label_smoothing on every pair)",
    leader_loss="cdpo",
)
