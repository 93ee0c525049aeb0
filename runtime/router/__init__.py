"""Data parallelism: a cache-aware HTTP router in front of N engine replicas (`sgl router`, `--dp-size N`)."""
