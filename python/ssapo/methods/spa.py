"""spa: SPA (Kim et al., ICLR 2025; docs/METHOD.md §5.3): self-annotation, SPA's
leader (de-coupled confidence, label smoothing of the least confident pairs)
with λ_t = spa_lambdas[t−1] (the last value repeats)."""

from ssapo.methods import Method


def spa_lambda(cfg, t: int) -> dict:
    """Round t's de-coupling λ_t."""
    return {"spa_lambda": cfg.spa_lambdas[min(t, len(cfg.spa_lambdas)) - 1]}


METHOD = Method(name="spa", help="SPA's leader on the self-labels", leader_loss="spa", leader_params=spa_lambda)
