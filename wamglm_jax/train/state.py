"""Train state shared by every stage: a plain pytree that Orbax, the sharding rules and jit see."""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """step int32[], params, opt_state, batch_stats ({} when the model has none), rng uint32[2].

    `tx` is static (not saved): the optimizer is rebuilt from the config on resume.
    """
    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any
    rng: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, *, params, tx, rng, batch_stats=None) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   batch_stats={} if batch_stats is None else batch_stats,
                   rng=jnp.asarray(rng, jnp.uint32), tx=tx)

    def apply_gradients(self, grads, *, batch_stats=None) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state,
                            batch_stats=self.batch_stats if batch_stats is None else batch_stats)

    def step_rng(self) -> jax.Array:
        """A per-step key: the same at step k whether or not the run was resumed."""
        return jax.random.fold_in(self.rng, self.step)

    # Orbax saves a plain dict (no static fields); `from_checkpoint` puts it back.
    def to_checkpoint(self) -> dict:
        return dict(step=self.step, params=self.params, opt_state=self.opt_state,
                    batch_stats=self.batch_stats, rng=self.rng)

    def from_checkpoint(self, tree: dict) -> "TrainState":
        return self.replace(**tree)
