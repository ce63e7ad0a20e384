"""Local: what only `kaiwo-gpu up`, the tests and the benchmarks use.

A throwaway etcd, a coordinator child process, the offline demo and synthetic clusters;
nothing in a production coordinator imports this package.
"""
