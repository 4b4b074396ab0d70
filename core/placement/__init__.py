"""Where a model goes and how it gets there: the memory plan, device maps, tensor-parallel shards, the
torch.distributed glue, and loading (resolve -> open -> plan -> build -> assign weights -> runner)."""
