"""Generated protobuf and gRPC code of the kaiwo-gpu API v1 (do not edit)."""
