"""AdamW with float32 state whatever the weights' dtype, and its learning-rate schedule."""

import mlx.core as mx
import mlx.optimizers as optim


class MixedPrecisionAdamW(optim.AdamW):
    """AdamW whose moments are float32; low-precision weights get a float32 master copy.

    The update is computed in float32 on the master copy and rounded into the
    weight, so updates smaller than a bfloat16 step still accumulate.
    """

    def init_single(self, parameter: mx.array, state: dict):
        state["m"] = mx.zeros(parameter.shape, mx.float32)
        state["v"] = mx.zeros(parameter.shape, mx.float32)
        if parameter.dtype != mx.float32:
            state["master"] = parameter.astype(mx.float32)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        master = state.get("master", parameter)
        updated = super().apply_single(gradient.astype(mx.float32), master, state)
        if "master" in state:
            state["master"] = updated
        return updated.astype(parameter.dtype)


def learning_rate_schedule(config):
    """Linear warmup from 0 to learning_rate, then cosine decay to the final rate at `steps`."""
    decay = optim.cosine_decay(
        config.learning_rate,
        max(config.steps - config.warmup_steps, 1),
        end=config.final_learning_rate,
    )
    if config.warmup_steps == 0:
        return decay
    warmup = optim.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optim.join_schedules([warmup, decay], [config.warmup_steps])


def build_optimizer(config) -> MixedPrecisionAdamW:
    return MixedPrecisionAdamW(
        learning_rate=learning_rate_schedule(config),
        betas=[config.beta1, config.beta2],
        weight_decay=config.weight_decay,
    )
