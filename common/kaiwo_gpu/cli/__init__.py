"""The `kaiwo-gpu` command: parses arguments, calls into the library, prints."""
