"""API: the gRPC servicers (allocation and agent streams) and the answers to read RPCs."""
