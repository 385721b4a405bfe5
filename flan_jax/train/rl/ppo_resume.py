"""PPO checkpoints and exact resume, through the SFT trainer's orbax Checkpointer (flan_jax/train/checkpointing.py).

A checkpoint after iteration i holds the train state (policy and value-head params, both optimizers' states) and JSON
metadata: i, the KL controller's beta, the numpy generator's state (it draws the rollout prompts and the minibatch
order, so it is the prompt position), the reward-normalisation statistics, the held-out history so far and how many
ptx batches were consumed. The rollout key is fold_in(PRNGKey(seed), i), so nothing else is random: a run resumed from
the latest checkpoint repeats an uninterrupted one bit for bit (test_ppo_resume_equals_an_uninterrupted_run).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, Optional

import jax
import numpy as np

from flan_jax.train import checkpointing


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    directory: str
    period: int = 10      # iterations between checkpoints (the last iteration is always saved)
    keep: int = 2

    def __post_init__(self):
        if self.period <= 0 or self.keep <= 0:
            raise ValueError(f"ppo_run.checkpoint_period={self.period}, ppo_run.keep_checkpoints={self.keep}: "
                             "both must be positive")


@dataclasses.dataclass
class Progress:
    """What besides the train state a resumed run needs."""
    iteration: int
    beta: float
    np_rng_state: dict
    reward_stats: Optional[list]    # [mean, std] of the SFT policy's scores, or None (no normalisation)
    history: dict
    ptx_consumed: int = 0

    def meta(self) -> dict:
        out = dataclasses.asdict(self)
        out['history'] = {str(k): v for k, v in self.history.items()}
        return out

    @classmethod
    def from_meta(cls, meta: dict) -> "Progress":
        meta = dict(meta, history={int(k): v for k, v in meta['history'].items()})
        return cls(**meta)


def open_checkpointer(cfg: Optional[CheckpointConfig]) -> Optional[checkpointing.Checkpointer]:
    return None if cfg is None else checkpointing.Checkpointer(cfg.directory, keep=cfg.keep, async_save=False)


def _abstract(state):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), state)


def restore_latest(ckpt: Optional[checkpointing.Checkpointer], template_state) -> Optional[tuple]:
    """(state, Progress) of the latest checkpoint, or None (no checkpointer, or nothing saved yet)."""
    resumed = None if ckpt is None else ckpt.restore_latest(_abstract(template_state))
    return None if resumed is None else (resumed[0], Progress.from_meta(resumed[1]))


def save(ckpt: checkpointing.Checkpointer, state, progress: Progress) -> None:
    """A checkpoint after iteration progress.iteration (ppo.train decides when), written before returning."""
    ckpt.save(progress.iteration, jax.device_get(state), progress.meta())
    ckpt.wait()


class CountingIterator:
    """An iterator that counts what it has yielded (the ptx batches), and can skip ahead to resume."""
    def __init__(self, items: Iterator, skip: int = 0):
        self._items, self.consumed = iter(items), skip
        for _ in itertools.islice(self._items, skip):
            pass

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._items)
        self.consumed += 1
        return item
