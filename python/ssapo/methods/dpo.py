"""dpo: DPO on the labelled seed only (docs/METHOD.md §5.1); the result is π_0."""

from ssapo.methods import Method

METHOD = Method(name="dpo", help="the seed model π_0 only (DPO on the labelled seed)", rounds=False)
