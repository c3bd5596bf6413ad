"""Context parallelism for sparseforge patterns on ``torch.distributed``.

    import sparseforge.distributed as sfd
    layout = sfd.plan_shards(pattern, seq_len, world_size)
    q_local = sfd.shard(q, layout)                # this rank's tokens of [B, H, L, D]
    out_local = sfd.attention(q_local, k_local, v_local, pattern, layout)
    out = sfd.unshard(out_local, layout)          # the whole sequence, on every rank

``plan_shards`` balances the pattern's tile work over the ranks and lists, for every
pair of ranks, exactly the key blocks one needs from the other (``layout.py``);
``attention`` moves only those (``exchange.py``) and attends with ``sf.attention`` on
each (query run, key run) part, the pattern rewritten over the part (``parts.py``), or
on original positions where it has no such form (``attention.py``). See
docs/distributed.md.
"""

from .attention import attention, shard, unshard
from .exchange import counters
from .layout import LAYOUTS, ShardLayout, plan_shards

__all__ = ["LAYOUTS", "ShardLayout", "attention", "counters", "plan_shards", "shard", "unshard"]
