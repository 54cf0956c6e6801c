"""An exact sparse forward for PEFT's trainable token rows during training.

PEFT's ``TrainableTokensLayer`` splices the trained rows into a copy of the whole ``[vocab, hidden]`` matrix on
every forward (``weight.index_copy``), for the embedding and again for a tied LM head. The copy makes the
frozen matrix part of the autograd graph, so backward also computes the head's full ``[vocab, hidden]`` weight
gradient (a matmul as large as the logits' own) and a dense embedding gradient, only to keep the k new rows.

``sparse_token_rows`` gives each such layer a forward that computes the same values without the copy:

* embedding: the frozen lookup, and the new rows looked up from the k trainable rows where the input is one of
  the new ids (``torch.where``: the same values bit for bit);
* LM head: the frozen logits, and the k new ids' logits from a ``[hidden, k]`` matmul written into their
  columns (the same values up to float summation order).

Gradients reach the trainable rows only, as before. The parameters, their names and the saved adapter are
PEFT's own; merging, unmerging and inference are untouched (a merged layer uses its base layer as before).
"""

from __future__ import annotations

import types


def _sparse_forward(self, x, active_adapters, *args, **kwargs):
    import torch
    import torch.nn.functional as F

    adapters = [a for a in active_adapters if a in self.trainable_tokens_delta]
    if self.disable_adapters or self.merged or len(adapters) != 1:
        return self._memreason_dense_forward(x, active_adapters, *args, **kwargs)
    adapter = adapters[0]
    base = self.base_layer
    deltas = self.trainable_tokens_delta[adapter].to(base.weight)
    index = torch.as_tensor(self.token_indices[adapter], device=base.weight.device)
    if isinstance(base, torch.nn.Embedding):
        result = F.embedding(x, base.weight.detach(), padding_idx=base.padding_idx, max_norm=base.max_norm,
                             norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq)
        slot = torch.full((base.weight.shape[0],), -1, dtype=torch.long, device=x.device)
        slot[index] = torch.arange(len(index), device=x.device)
        position = slot[x]
        new = F.embedding(position.clamp(min=0), deltas)
        result = torch.where((position >= 0).unsqueeze(-1), new, result)
        scale = self._get_embed_scale()
        return result * scale.to(result.dtype) if scale is not None else result
    if isinstance(base, torch.nn.Linear):
        result = F.linear(x, base.weight.detach(), base.bias)
        new = F.linear(x, deltas, base.bias[index] if base.bias is not None else None)  # [..., k]
        return result.index_copy_(-1, index, new)  # in place: the frozen matmul does not need its output
    return self._memreason_dense_forward(x, active_adapters, *args, **kwargs)


def sparse_token_rows(model) -> int:
    """Switch every PEFT trainable-token layer in ``model`` to the sparse forward; returns how many.

    Idempotent; ``dense_token_rows`` switches back.
    """
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    count = 0
    for module in model.modules():
        if isinstance(module, TrainableTokensLayer):
            if not hasattr(module, "_memreason_dense_forward"):
                module._memreason_dense_forward = module.forward_adapters
            module.forward_adapters = types.MethodType(_sparse_forward, module)
            count += 1
    return count


def dense_token_rows(model) -> int:
    """Undo ``sparse_token_rows``: PEFT's own forward again; returns how many layers were switched back."""
    count = 0
    for module in model.modules():
        dense = getattr(module, "_memreason_dense_forward", None)
        if dense is not None:
            module.forward_adapters = dense
            del module._memreason_dense_forward
            count += 1
    return count
