"""ssapo: the follower's worst case around the self-labels, attached to every
pair, and the leader `leader_loss` (default shift_prob, the released code's)
on them (docs/METHOD.md §2-§4)."""

from ssapo.methods import Method

METHOD = Method(
    name="ssapo",
    help="the Stackelberg game: follower atoms on every self-labelled pair, leader leader_loss",
    follower=True,
    leader_loss=lambda cfg: cfg.leader_loss,
)
