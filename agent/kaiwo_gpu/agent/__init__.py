"""The node agent: discovers and samples GPUs (amdsmi or simulated) and streams to a coordinator.

Its backends, health classifier and uplink arrive with the node-agent issue; this package
holds its place in the kaiwo_gpu namespace so the layout and import contracts hold now.
"""
