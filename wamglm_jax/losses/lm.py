"""Token cross-entropy of a decoder LM on masked targets (stage 2 and its LM warm-up)."""
import jax
import jax.numpy as jnp


def lm_loss(logits, tokens, loss_mask, token_weights=None):
    """Token cross-entropy of positions t-1 -> tokens[t] where loss_mask[t] == 1.

    token_weights float[V] (optional): each target's CE is multiplied by the weight of its
    token id and the sum divided by the sum of those weights (a weighted mean; all ones = the
    plain mean). Returns dict(loss: the weighted mean, the training objective; ce: the plain
    mean; token_accuracy: argmax hits among the targets; loss_tokens: their number)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)    # float[B,T-1,V]
    tgt = tokens[:, 1:]                                                         # int[B,T-1]
    w = loss_mask[:, 1:].astype(jnp.float32)                                    # float[B,T-1]
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    n = jnp.maximum(w.sum(), 1.0)
    ce = (nll * w).sum() / n
    if token_weights is None:
        loss = ce
    else:
        tw = w * jnp.asarray(token_weights, jnp.float32)[tgt]
        loss = (nll * tw).sum() / jnp.maximum(tw.sum(), 1e-6)
    acc = ((jnp.argmax(logp, -1) == tgt) * w).sum() / n
    return dict(loss=loss, ce=ce, token_accuracy=acc, loss_tokens=w.sum())
