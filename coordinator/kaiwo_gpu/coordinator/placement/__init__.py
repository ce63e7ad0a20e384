"""Placement: the pure decision core (cluster records, snapshot, indexes, strategies, engine).

Nothing here does I/O, reads a clock or touches grpc: `place(request, snapshot, state)` is a
function of its arguments, and an import-linter contract keeps it so.
"""
