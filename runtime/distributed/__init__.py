"""Tensor parallelism over torch.distributed: process groups with timeouts (group.py), Megatron
sharding of the Llama family at load time (sharding.py), rank 0's step broadcast and the other ranks'
loop (driver.py), and launching the ranks (launch.py, worker.py)."""
