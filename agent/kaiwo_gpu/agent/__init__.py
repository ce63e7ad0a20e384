"""The node agent: discovers and samples GPUs (amdsmi or simulated) and streams to a coordinator.

backend (the protocol) <- amdsmi_backend | simulated; health (pure verdicts with
hysteresis) <- sampler (one tick) <- uplink (the Connect stream) <- service (the process).
"""
