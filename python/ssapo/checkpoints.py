"""What a leader stage writes: its mid-round checkpoints and its trained model.

- Mid-round checkpoints (`CheckpointMixin`, a base of `SSAPOTrainer`): with
  `save_strategy="steps"` every `save_steps` optimizer steps a `checkpoint-N`
  directory is written into `output_dir` (transformers' own: weights,
  optimizer, scheduler, RNG of every rank, trainer state) plus the leader's
  counters; it is marked complete only once every rank has written
  (`ssapo_checkpoint.json`), and only then are older ones rotated
  (`save_total_limit`). `last_checkpoint(output_dir)` is the newest complete
  one; `trainer.train(resume_from_checkpoint=last_checkpoint(d))` on a trainer
  built exactly as the first (same start model, data, arguments) continues to
  the same weights as an uninterrupted run. The precomputed reference
  log-probabilities are cached in `output_dir/ref_logps/` under a key of the
  data and the reference's weights, so every rank reads the file the main rank
  wrote and a resumed run reads the same values.
- `save_trained(trainer, path, save_dtype="float32")`: the trained weights in
  full precision (every rank must call it): under DeepSpeed the engine's fp32
  master weights, gathered parameter by parameter
  (`deepspeed.utils.safe_get_full_fp32_param`; not the 16-bit copy that
  `save_model` gathers, which would round every round's start to bf16), under
  FSDP the FULL_STATE_DICT (fp32 parameters), else the fp32 parameters; a LoRA
  adapter merged into the full-precision base, a model card naming SSAPO and its
  paper, written to a temp directory and renamed into place; `push_to_hub`
  when asked. `save_dtype="bfloat16"` halves the files of a final export.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from typing import Optional

import torch
from accelerate.utils import is_peft_model

from ssapo.engines import deepspeed_fp32_state_dict, full_state_dict
from ssapo.io import atomic_write, write_json
from ssapo.loading import unsharded_loading

logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "ssapo_checkpoint.json"  # written last, once every rank has written its part
LEADER_STATE = "ssapo_leader_state_{}.json"  # one per rank: the counters behind leader_stats
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def is_complete(checkpoint: str) -> bool:
    try:
        with open(os.path.join(checkpoint, CHECKPOINT_MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    m = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(checkpoint)))
    return bool(m) and isinstance(marker, dict) and marker.get("global_step") == int(m.group(1))


def last_checkpoint(work_dir) -> Optional[str]:
    """The newest complete `checkpoint-N` directory that an `SSAPOTrainer`
    wrote into `work_dir` (its `output_dir`), or None: no such directory, or
    none complete. A checkpoint is complete once its `ssapo_checkpoint.json`
    marker is there, written after every rank saved its part; a directory that
    a kill cut short is skipped (the resumed run writes it again)."""
    work_dir = os.fspath(work_dir)
    if not os.path.isdir(work_dir):
        return None
    steps = []
    for name in os.listdir(work_dir):
        m = _CHECKPOINT_RE.match(name)
        if m and os.path.isdir(os.path.join(work_dir, name)):
            steps.append((int(m.group(1)), name))
    for _, name in sorted(steps, reverse=True):
        path = os.path.join(work_dir, name)
        if is_complete(path):
            return path
    return None


class CheckpointMixin:
    """`SSAPOTrainer`'s side of a mid-round checkpoint: what every rank adds to
    transformers' `checkpoint-N` (its leader counters, `LEADER_STATE`, and the
    states given to `add_checkpoint_state`), the completion marker written once
    every rank has, the rotation after it, and reading the counters and states
    back when `train()` resumes. Reads the trainer's counters (`_clamped`,
    `_atoms`, `_flagged`, `_seen`, `_grad_norms`, `_step_losses`, `confidence`)
    and `_checkpoint_states`, which `SSAPOTrainer.__init__` sets."""

    def add_checkpoint_state(self, name: str, obj) -> None:
        """Keeps `obj`'s state in every checkpoint: `obj.state_dict()` (tensors,
        lists, dicts, numbers, strings) is written by every rank as
        `ssapo_state_<name>_<rank>.pt`, and `train(resume_from_checkpoint=...)`
        calls `obj.load_state_dict(state)` before training continues. For state
        that changes during a round outside the model and optimizer (e.g. the
        follower's atom table that a mid-round re-solve replaces)."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
            raise ValueError(f"name: letters, digits, '_', '.', '-' only, got {name!r}")
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise ValueError(f"obj: needs state_dict() and load_state_dict(state), got {type(obj).__name__}")
        self._checkpoint_states[name] = obj

    def _save_checkpoint(self, model, trial):
        """transformers' checkpoint (weights, optimizer, scheduler, RNG, trainer
        state; trl adds the model card), then every rank's leader counters, a
        barrier, the completion marker, and only then the rotation of older
        checkpoints (so a kill mid-save never leaves no complete checkpoint)."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        marker = os.path.join(folder, CHECKPOINT_MARKER)
        if self.args.should_save and os.path.exists(marker):
            os.remove(marker)  # a stale marker from an earlier run of this step: rewritten below
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate below, once this checkpoint is complete
        self._in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
            self._in_checkpoint = False
        os.makedirs(folder, exist_ok=True)
        write_json(os.path.join(folder, LEADER_STATE.format(self.args.process_index)), self._leader_state())
        for name, obj in self._checkpoint_states.items():
            state = obj.state_dict()
            atomic_write(
                os.path.join(folder, f"ssapo_state_{name}_{self.args.process_index}.pt"),
                lambda tmp, state=state: torch.save(state, tmp),
            )
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            write_json(marker, {"global_step": self.state.global_step, "num_processes": self.args.world_size})
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        """transformers' `save_model`, except inside a checkpoint under DeepSpeed: there the engine's own
        sharded checkpoint, which `_save_checkpoint` writes next (weights, fp32 masters and optimizer state,
        each rank its part; what a resumed stage loads), is the checkpoint's model. transformers would first
        gather the 16-bit weights to rank 0 (`zero3_save_16bit_model: true`) or write that same DeepSpeed
        checkpoint a second time (false). A stage's model is written by `save_trained`, not here."""
        if getattr(self, "_in_checkpoint", False) and self.is_deepspeed_enabled:
            return
        return super().save_model(output_dir, _internal_call=_internal_call)

    def _leader_state(self) -> dict:
        return {
            "clamped": self._clamped,
            "atoms": self._atoms,
            "flagged": self._flagged,
            "seen": self._seen,
            "grad_norms": list(self._grad_norms),
            "step_losses": [float(x) for x in self._step_losses],
            "confidence": self.confidence.values,
            "global_step": self.state.global_step,
            "reference_hash": self._precompute_model_hash,
            "train_fingerprint": self._train_fingerprint(),
        }

    def _train_fingerprint(self) -> Optional[str]:
        # the prepared (tokenized) rows, before trl adds the reference columns; datasets' content fingerprint
        return getattr(self, "_train_rows_fingerprint", None) or getattr(self.train_dataset, "_fingerprint", None)

    def _load_leader_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, LEADER_STATE.format(self.args.process_index))
        if not os.path.exists(path):
            logger.warning(
                "%s: no leader counters for process %d (written with another number of processes?); "
                "leader_stats count from the resumed step on",
                checkpoint,
                self.args.process_index,
            )
            return
        with open(path) as f:
            st = json.load(f)
        # the resumed trainer must be the interrupted one: same start model (hence reference), same data
        for key, now, what in (
            ("reference_hash", self._precompute_model_hash, "reference model's weights"),
            ("train_fingerprint", self._train_fingerprint(), "train_dataset"),
        ):
            if st.get(key) is not None and now is not None and st[key] != now:
                raise ValueError(
                    f"resume_from_checkpoint: {checkpoint} was written by a run with another {what}; build the "
                    "resumed trainer exactly as the interrupted one (the start model, not the checkpoint's weights, "
                    "which train() loads; the same rows and atoms)"
                )
        self._clamped, self._atoms, self._flagged, self._seen = st["clamped"], st["atoms"], st["flagged"], st["seen"]
        self._grad_norms = [float(g) for g in st["grad_norms"]]
        self._step_losses = [
            torch.tensor(x, dtype=torch.float32, device=self.accelerator.device) for x in st["step_losses"]
        ]
        self.confidence._values = [float(v) for v in st["confidence"]]
        for name, obj in self._checkpoint_states.items():
            state_path = os.path.join(checkpoint, f"ssapo_state_{name}_{self.args.process_index}.pt")
            if not os.path.exists(state_path):
                raise ValueError(
                    f"resume_from_checkpoint: {checkpoint} has no state {name!r} for process "
                    f"{self.args.process_index} (add_checkpoint_state({name!r}, ...) was not used there)"
                )
            obj.load_state_dict(torch.load(state_path, weights_only=True))


def save_trained(
    trainer,  # an SSAPOTrainer (ssapo.trainer, which imports this module)
    path,
    *,
    merge_adapter: bool = True,
    base_model: Optional[str] = None,
    model_name: Optional[str] = None,
    dataset_name: Optional[str] = None,
    push_to_hub: Optional[bool] = None,
    trust_remote_code: bool = False,
    save_dtype: str = "float32",
) -> str:
    """Saves the trained policy of `trainer` to `path` (safetensors, tokenizer,
    model card) atomically, through the trainer's own `_save` / `save_model`.
    Returns `path`.

    EVERY process must call it: the weights are gathered, a collective
    (DeepSpeed: the fp32 master weights, see below; FSDP: `save_model`, i.e.
    `accelerator.get_state_dict` with a FULL_STATE_DICT).
    - Everything is written into `<path>.tmp-save` and renamed onto `path` by the
      writing process (`args.should_save`) once complete; the old `path`, if
      any, is replaced; a barrier follows, so on return every rank sees `path`.
    - With a peft model and `merge_adapter` (default), the writer merges the
      saved adapter into the full base weights loaded whole on that process in
      float32 (`base_model`, default the adapter's `base_model_name_or_path`;
      `unsharded_loading`: no ZeRO-3 partitioning, no meta tensors), so a 4-bit
      (QLoRA) run is merged into full-precision weights too. The adapter is kept
      under `path/adapter/`. `merge_adapter=False` saves the adapter alone.
      `trust_remote_code` is passed to that base's `from_pretrained`.
    - Precision: the fp32 master weights of every engine, written as
      `save_dtype` ("float32", the default: a checkpoint the next round starts
      from; "bfloat16": half the size, for a final export), and `config.json`'s
      `dtype` says the same. Under DeepSpeed (ZeRO-3 or 1/2) each trainable
      parameter is the optimizer's fp32 copy, gathered over the ranks
      (`deepspeed_fp32_state_dict`: `deepspeed.utils.safe_get_full_fp32_param`),
      never the bf16 module weights that `save_model` /
      `stage3_gather_16bit_weights_on_model_save` gather: chaining rounds
      through those would round the policy to bf16 at every round boundary (at
      lr 5e-7 most of a round's update). The full fp32 state dict is held on the
      writer in CPU memory (4 bytes a parameter: 32 GB for an 8B model). FSDP's
      FULL_STATE_DICT is already the fp32 parameters (accelerate keeps them fp32
      under bf16 mixed precision and torch unshards them in full precision for
      the state dict; a SHARDED_STATE_DICT config is switched to FULL for this save,
      `full_state_dict`); one process / DDP saves the fp32 parameters themselves.
    - README.md: trl's model card naming SSAPO, its paper (arXiv 2502.18099) and
      citation, tags `trl`, `dpo`, `ssapo`; `model_name` defaults to the name of `path`.
    - Raises ValueError when the engine wrote no weights, or for a `save_dtype`
      other than "float32" / "bfloat16".
    - `push_to_hub` (default `trainer.args.push_to_hub`): process 0 uploads
      `path` to `args.hub_model_id` (default: the name of `path`) with
      `args.hub_token`, `args.hub_private_repo`, `args.hub_revision`.
    """
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype: must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    dtype = SAVE_DTYPES[save_dtype]
    path = os.path.abspath(os.fspath(path))
    args, acc = trainer.args, trainer.accelerator
    writer = args.should_save
    tmp = path + ".tmp-save"
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(trainer.model)
    if trainer.is_deepspeed_enabled:
        # collective: every rank gathers, the writer keeps the full fp32 state dict (the others None)
        state = deepspeed_fp32_state_dict(trainer, trainable_only=is_peft_model(unwrapped), keep=writer)
        trainer._save(tmp, state_dict=_cast_state_dict(state, dtype) if writer else None)
        del state
    else:
        with full_state_dict(trainer):  # FSDP: the full weights here even where checkpoints are sharded
            trainer.save_model(tmp, _internal_call=True)  # collective; writes on the writer only; no hub push here
    acc.wait_for_everyone()
    error: Optional[BaseException] = None
    if writer:
        try:
            _check_weights_written(tmp)
            if merge_adapter and is_peft_model(unwrapped):
                _merge_saved_adapter(unwrapped, tmp, base_model, trust_remote_code)
            _cast_saved(tmp, dtype)
            card = os.path.join(args.output_dir, "README.md")
            trainer.create_model_card(model_name=model_name or os.path.basename(path), dataset_name=dataset_name)
            if os.path.exists(card):
                os.replace(card, os.path.join(tmp, "README.md"))
            _replace_dir(tmp, path)
        except BaseException as e:  # noqa: BLE001  re-raised below, after the other ranks are told
            shutil.rmtree(tmp, ignore_errors=True)
            error = e
    if acc.num_processes > 1:  # the other ranks fail with the writer instead of waiting for it at a barrier
        from accelerate.utils import broadcast_object_list

        status = broadcast_object_list([None if error is None else f"{type(error).__name__}: {error}"], 0)[0]
        if error is None and status is not None:
            raise RuntimeError(f"save_trained: the main process failed to save {path}: {status}")
    if error is not None:
        raise error
    acc.wait_for_everyone()
    if push_to_hub if push_to_hub is not None else args.push_to_hub:
        if args.process_index == 0:
            from huggingface_hub import create_repo, upload_folder

            repo_id = args.hub_model_id or os.path.basename(path)
            repo = create_repo(repo_id, token=args.hub_token, private=args.hub_private_repo, exist_ok=True)
            upload_folder(
                repo_id=repo.repo_id,
                folder_path=path,
                token=args.hub_token,
                revision=args.hub_revision,
                commit_message=f"SSAPO: {os.path.basename(path)}",
            )
        acc.wait_for_everyone()
    return path


def _cast_state_dict(state_dict: dict, dtype: torch.dtype) -> dict:
    """Floating-point tensors as `dtype`; tied tensors stay one tensor."""
    done: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dtype:
            if id(v) not in done:
                done[id(v)] = v.to(dtype)
            v = done[id(v)]
        out[k] = v
    return out


_ST_SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_ST_FLOATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _cast_saved(directory: str, dtype: torch.dtype) -> None:
    """The weights saved in `directory` (its top-level `*.safetensors`) as
    `dtype` (floating-point tensors; a file already in `dtype` is not
    rewritten), the index's `total_size` to match, and `config.json`'s `dtype`
    (what `from_pretrained`'s default `dtype="auto"` loads them in)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    name = str(dtype).split(".")[1]
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for fname in sorted(os.listdir(directory)):
        f = os.path.join(directory, fname)
        if not fname.endswith(".safetensors") or not os.path.isfile(f):
            continue
        with safe_open(f, framework="pt") as st:
            metadata = st.metadata() or {"format": "pt"}
            header = {k: (st.get_slice(k).get_dtype(), st.get_slice(k).get_shape()) for k in st.keys()}
        if any(kind in _ST_FLOATS and _ST_FLOATS[kind] != dtype for kind, _ in header.values()):
            tensors = _cast_state_dict(load_file(f), dtype)
            atomic_write(f, lambda t, tensors=tensors, metadata=metadata: save_file(tensors, t, metadata=metadata))
            del tensors
        for kind, shape in header.values():
            total += math.prod(shape) * (size if kind in _ST_FLOATS else _ST_SIZES.get(kind, 1))
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            data = json.load(fh)
        data.setdefault("metadata", {})["total_size"] = total
        write_json(index, data)
    config = os.path.join(directory, "config.json")
    if os.path.exists(config):
        with open(config) as fh:
            data = json.load(fh)
        if data.get("dtype") != name or data.get("torch_dtype", name) != name:
            data["dtype"] = name
            if "torch_dtype" in data:
                data["torch_dtype"] = name
            write_json(config, data)


def _check_weights_written(tmp: str) -> None:
    names = set(os.listdir(tmp))
    if not names & {"model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"}:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(
            "trainer: save_model wrote no safetensors weights (DeepSpeed's are gathered here, whatever "
            "stage3_gather_16bit_weights_on_model_save says, and FSDP's are switched to FULL_STATE_DICT for "
            "this save)"
        )


def _merge_saved_adapter(peft_model, tmp: str, base_model: Optional[str], trust_remote_code: bool) -> None:
    """In `tmp`: the adapter that `save_model` wrote, replaced by the merged full
    model (the adapter files move to `tmp/adapter/`)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = peft_model.peft_config.get("default") or next(iter(peft_model.peft_config.values()))
    base = base_model or cfg.base_model_name_or_path
    if not base:
        raise ValueError("base_model: the adapter does not record its base model; pass base_model=<path>")
    adapter_dir = os.path.join(tmp, "adapter")
    os.makedirs(adapter_dir, exist_ok=True)
    for name in os.listdir(tmp):
        if name.startswith("adapter_") or name == "README.md":
            os.replace(os.path.join(tmp, name), os.path.join(adapter_dir, name))
    with unsharded_loading():
        full = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        merged = PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    del full, merged


def _replace_dir(src: str, dst: str) -> None:
    """Renames the finished directory `src` onto `dst`, replacing an old `dst`."""
    if os.path.exists(dst):
        old = dst + ".old-save"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
