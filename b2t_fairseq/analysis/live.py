"""``--log-layer-grad-norms N``: each layer's parameter-gradient norm in fairseq's training log, every N updates.

fairseq calls ``model.set_num_updates(n)`` before every forward of a training step (n = updates done so far).
When n is a multiple of N, the logger hooks the gradient accumulation of every layer parameter (over all
--update-freq micro-batches) and counts the target tokens of the update's training forwards; when the next
update starts it logs, as fairseq metrics (so they appear in train_inner / train json lines),

    gnorm_enc{i}, gnorm_dec{i} = || gradient of the summed loss w.r.t. layer i's parameters || / target tokens

which for fairseq's token-level criteria (no --sentence-avg) is the gradient the optimizer steps on, before
clipping: b2t-grad-norms' ``params`` at training time. Each data-parallel worker sees its local gradient and
rank 0's values are printed; with --fp16/--amp the values include the loss scale. With N = 0 (the default)
nothing is attached, so training costs nothing extra.
"""
from collections import defaultdict

import torch
from fairseq.logging import metrics
from fairseq.utils import safe_getattr
from torch import nn

from b2t_fairseq.safety.errors import B2TConfigError


class LayerGradNormLogger(nn.Module):
    """Has no parameters or buffers: checkpoints are the same with and without it."""

    def __init__(self, model, every):
        super().__init__()
        self.every = every
        # plain lists, so the layers (and the model) are not registered a second time as our submodules
        self._layers = [
            (f"gnorm_{stack[:3]}{i}", layer)
            for stack in ("encoder", "decoder")
            for i, layer in enumerate(getattr(getattr(model, stack, None), "layers", None) or [], start=1)
        ]
        self._model = [model]
        self._pad = model.decoder.dictionary.pad()
        self._armed_at = None
        self._handles, self._squares, self._tokens = [], {}, 0

    def set_num_updates(self, num_updates):
        if self._armed_at is not None and num_updates != self._armed_at:
            self._flush()
        if self._armed_at is None and num_updates % self.every == 0:
            self._arm(num_updates)

    def _arm(self, num_updates):
        self._armed_at, self._squares, self._tokens = num_updates, {}, 0
        for key, layer in self._layers:
            for p in layer.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._keeper(key)))
        self._handles.append(self._model[0].register_forward_pre_hook(self._count_tokens, with_kwargs=True))

    def _keeper(self, key):
        def keep(param):
            # .grad holds the sum over the micro-batches so far; the last call of the update wins
            self._squares[param] = (key, param.grad.detach().float().pow(2).sum())

        return keep

    def _count_tokens(self, model, args, kwargs):
        if not (model.training and torch.is_grad_enabled()):  # validation forwards
            return
        # translation: model(src_tokens, src_lengths, prev_output_tokens); language model: model(src_tokens, ...)
        tokens = kwargs.get("prev_output_tokens", kwargs.get("src_tokens"))
        if tokens is None and args:
            tokens = args[2] if len(args) > 2 and hasattr(model, "encoder") else args[0]
        if tokens is not None:
            self._tokens += int(tokens.ne(self._pad).sum())

    def _flush(self):
        for handle in self._handles:
            handle.remove()
        totals = defaultdict(float)
        for key, square in self._squares.values():
            totals[key] = totals[key] + square
        if self._tokens:
            for key, _ in self._layers:
                if key in totals:
                    metrics.log_scalar(key, float(totals[key]) ** 0.5 / self._tokens, priority=1000)
        self._armed_at, self._handles, self._squares, self._tokens = None, [], {}, 0


def attach_layer_grad_norm_logger(model, args):
    """Give ``model`` a :class:`LayerGradNormLogger` if ``--log-layer-grad-norms`` is positive."""
    every = int(safe_getattr(args, "log_layer_grad_norms", None) or 0)
    if every < 0:
        raise B2TConfigError(f"--log-layer-grad-norms must be 0 (off) or a number of updates, got {every}")
    if every:
        model.layer_grad_norm_logger = LayerGradNormLogger(model, every)
    return model
