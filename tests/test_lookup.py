"""`lab.models.lookup.lookup_rows`: every model's embedding lookup is `table[ids]`, gradients included,
alone and under `torch.func.vmap` (how sweeps stack members)."""

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from lab.models.lookup import lookup_rows


def test_lookup_rows_is_table_at_ids_with_embeddings_gradient():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(11, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (7, 3), generator=gen)  # repeated ids: their rows' gradients add up
    weights = torch.randn(7, 3, 5, generator=gen, dtype=torch.float64)
    rows = lookup_rows(table, ids)
    assert rows.shape == (7, 3, 5) and torch.equal(rows, table[ids])
    (mine,) = torch.autograd.grad((rows * weights).sum(), table)
    (theirs,) = torch.autograd.grad((F.embedding(ids, table) * weights).sum(), table)
    torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    assert mine[ids.unique()].abs().sum() > 0 and torch.all(mine[[i for i in range(11) if i not in ids]] == 0)


def test_lookup_rows_under_vmap_is_each_members_own_lookup():
    gen = torch.Generator().manual_seed(1)
    tables = torch.randn(4, 9, 6, generator=gen)  # (members, rows, width)
    ids = torch.randint(0, 9, (4, 5, 2), generator=gen)  # each member its own ids
    stacked = vmap(lookup_rows)(tables, ids)
    assert torch.equal(stacked, torch.stack([t[i] for t, i in zip(tables, ids)]))
    loss = lambda table, i: lookup_rows(table, i).square().sum()  # noqa: E731
    grads = vmap(grad(loss))(tables, ids)
    for table, i, g in zip(tables, ids, grads):
        torch.testing.assert_close(g, grad(loss)(table, i))
