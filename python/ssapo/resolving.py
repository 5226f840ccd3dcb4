"""`ResolvingTrainer`: an `SSAPOTrainer` whose pairs' atoms the follower
solves again during training (the loop's `resolve_every`), read from the
resolver when each micro-batch's loss is computed and kept in every checkpoint.

    trainer = ResolvingTrainer(model, resolver=follower.Resolver(...), args=args, train_dataset=ds, ...)
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ssapo.atoms import COLUMNS as ATOM_COLUMNS
from ssapo.leader_columns import PAIR_INDEX
from ssapo.trainer import SSAPOTrainer


class ResolvingTrainer(SSAPOTrainer):
    """SSAPOTrainer whose pairs' atoms are re-solved during training (the loop's
    `resolve_every`): every row of `train_dataset` carries `pair_index`, its
    position in `resolver.atoms` (an `ssapo.atoms.Atoms`); each micro-batch's
    atoms are read from there when its loss is computed (not when it is
    collated: accelerate's data loader collates one batch ahead), and every
    `resolver.every` optimizer steps `resolver.resolve(step, model)` (an
    `ssapo.follower.Resolver`) solves the follower again on the margins of the
    policy being trained and replaces them in place, so the steps after step s
    train on the atoms of step s. The resolver (atoms and history) is kept in
    every checkpoint: a resumed stage continues with the atoms it had."""

    def __init__(self, *args, resolver, **kwargs):
        super().__init__(*args, **kwargs)
        self.resolver = resolver
        self.add_callback(_ResolveCallback(self))
        self.add_checkpoint_state("resolver", resolver)

    def _current_atoms(self, inputs: dict) -> dict:
        """`inputs` without pair_index, with the pairs' atoms as the resolver has them now."""
        inputs = dict(inputs)
        index = inputs.pop(PAIR_INDEX).cpu().numpy()
        for key in ATOM_COLUMNS:
            if key in inputs:
                value = getattr(self.resolver.atoms, key)[index]
                inputs[key] = torch.as_tensor(value, dtype=torch.float32, device=inputs[key].device)
        return inputs

    def _compute_loss(self, model, inputs, return_outputs):
        return super()._compute_loss(model, self._current_atoms(inputs), return_outputs)

    def scoring_model(self):
        """The policy as the re-solve's margin pass calls it: a module whose forward gathers its sharded
        parameters. Under FSDP the FSDP-wrapped model (its root's forward unshards the root's own parameters,
        the embeddings, final norm and head; `unwrap_model` would strip it); otherwise the unwrapped model
        (under DeepSpeed ZeRO-3 the engine's gather/release hooks live on the module itself; under DDP or
        one process it is whole)."""
        if self.is_fsdp_enabled:
            return self.model_wrapped
        return self.accelerator.unwrap_model(self.model)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if PAIR_INDEX not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + [PAIR_INDEX]


class _ResolveCallback(TrainerCallback):
    def __init__(self, trainer: ResolvingTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kw):
        every = self.trainer.resolver.every
        if state.global_step % every == 0 and state.global_step < state.max_steps:
            self.trainer.resolver.resolve(state.global_step, self.trainer.scoring_model())
        return control
