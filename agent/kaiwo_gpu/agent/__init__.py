"""The node agent: discovers and samples GPUs (amdsmi or simulated) and streams to a coordinator.

backend (the protocol) <- amdsmi_backend | simulated; health (pure verdicts with
hysteresis) <- sampler (one tick) <- uplink (the Connect stream, performing the pure
uplink_state's reconnect policy) <- service (the process).
"""
