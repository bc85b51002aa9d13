"""Parallel layouts: topology from flags, collectives that run on gloo and NCCL, TP-aware layers."""
